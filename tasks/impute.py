"""Missing data: fill in the unobserved pixels x_m of an image from its observed pixels x_o.

A mask (N, C, H, W) is True where a pixel is observed. The model scores only the observed ones,
log p(x_o|t), through `model(..., mask=mask)`. Every method fills x_m with E[x_m|...]:

    one_pass          E[x_m|t_loc(x~)], x~ = x_o with x_m set to the training mean image
    importance        sum_k w_k E[x_m|t_k] / sum_k w_k, t_k ~ q(t|x~),
                      w_k = p(x_o|t_k) p(t_k) / q(t_k|x~)    (self-normalized; -> E[x_m|x_o] as K grows)
    fitted_importance the same with t_k ~ r_i(t), a Gaussian per image fit to p(t|x_o) by SVI on the
                      masked model, started at q(t|x~) (semi-amortized inference: the encoder never
                      saw a half-blank image, and its q(t|x~) is a poor proposal for one)
    pseudo_gibbs      alternate t ~ q(t|x_o, x_m) and x_m ~ p(x_m|t) (Rezende et al. 2014)
    metropolis_gibbs  the same, with t' ~ q(t|x) accepted with probability
                      min(1, p(x, t') q(t|x) / (p(x, t) q(t'|x))), so that the chain leaves
                      p(t, x_m|x_o) invariant: exact in the limit (Mattei & Frellsen 2018)
    (both Gibbs chains average E[x_m|t] over the steps after burn-in)

Baselines: the training mean image, and the nearest training image on the observed pixels.
Errors are on the missing pixels only: the mean squared error, and the binary cross-entropy
with predictions clipped to [1e-3, 1 - 1e-3] (a hard 0/1 guess would otherwise cost infinity).
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions import constraints
from pyro.infer import SVI, Trace_ELBO
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.utils import save_image

from guide import latent_point, posterior
from model import model
from vae.config import ConfigError
from vae.data import load_split
from vae.elbo import latents_above, log_joint
from vae.importance import repeat
from vae.runs import TrainedRun

MASKS = ("random", "top_half", "bottom_half", "centre_square")
BCE_CLIP = 1e-3


def make_mask(kind: str, shape: tuple[int, ...], fraction: float = 0.5,
              generator: torch.Generator | None = None) -> Tensor:
    """(N, C, H, W) bool, True = observed. `random` hides each pixel with probability `fraction`;
    `top_half` / `bottom_half` hide that half; `centre_square` hides the central H/2 x W/2 square."""
    _, _, h, w = shape
    if kind == "random":
        return torch.rand(shape, generator=generator) >= fraction
    mask = torch.ones(shape, dtype=torch.bool)
    if kind == "top_half":
        mask[:, :, : h // 2] = False
    elif kind == "bottom_half":
        mask[:, :, h // 2 :] = False
    elif kind == "centre_square":
        mask[:, :, h // 4 : h // 4 + h // 2, w // 4 : w // 4 + w // 2] = False
    else:
        raise ValueError(f"mask {kind!r}: choose one of {MASKS}")
    return mask


def fill(x: Tensor, mask: Tensor, value: Tensor | float) -> Tensor:
    """x where observed, `value` (broadcast) where missing."""
    return torch.where(mask, x, torch.as_tensor(value, dtype=x.dtype, device=x.device))


@torch.no_grad()
def impute_one_pass(x: Tensor, mask: Tensor, encoder: nn.Module, decoder: nn.Module, fill_value: Tensor) -> Tensor:
    """E[x|t(x~)] (N, C, H, W): one encoder and decoder pass on the filled-in image x~ (t_loc, or
    its image through the flows: `guide.latent_point`)."""
    return decoder(latent_point(fill(x, mask, fill_value), encoder)).mean


@torch.no_grad()
def importance_mean(x: Tensor, mask: Tensor, decoder: nn.Module, proposal: dist.Distribution,
                    num_particles: int) -> tuple[Tensor, Tensor]:
    """(sum_k w_k E[x|t_k] / sum_k w_k (N, C, H, W), the effective sample size 1 / sum_k w_k^2 (N,))
    with t_k ~ proposal (batch (N,)) and w_k = p(x_o|t_k) p(t_k) / proposal(t_k), self-normalized."""
    t = proposal.sample((num_particles,))  # (K, N, L)
    flat_t = t.flatten(0, 1)  # (K * N, L)
    x_zeros = fill(x, mask, 0.0)  # any valid value where missing: the mask drops it
    log_p_x_o, log_p_t = log_joint(repeat(x_zeros, num_particles), flat_t, decoder,
                                   mask=repeat(mask, num_particles))  # (K * N,) each
    log_w = (log_p_x_o + log_p_t).unflatten(0, t.shape[:2]) - proposal.log_prob(t)  # (K, N)
    weights = log_w.softmax(0)  # self-normalized, (K, N)
    x_mean = decoder(flat_t).mean.unflatten(0, t.shape[:2])  # E[x|t_k], (K, N, C, H, W)
    return (weights[:, :, None, None, None] * x_mean).sum(0), 1 / weights.pow(2).sum(0)


def impute_importance(x: Tensor, mask: Tensor, encoder: nn.Module, decoder: nn.Module, fill_value: Tensor,
                      num_particles: int = 100) -> tuple[Tensor, Tensor]:
    """`importance_mean` with the encoder's q(t|x~) as the proposal."""
    proposal, _ = posterior(fill(x, mask, fill_value), encoder)  # q(t|x~)
    return importance_mean(x, mask, decoder, proposal, num_particles)


def fit_posterior(x: Tensor, mask: Tensor, encoder: nn.Module, decoder: nn.Module, fill_value: Tensor,
                  steps: int = 200, lr: float = 0.05) -> dist.Distribution:
    """r_i(t) = N(loc_i, diag scale_i^2) for each image, fit to p(t|x_o) by SVI: maximize the masked
    ELBO E_r[log p(x_o|t) + log p(t) - log r_i(t)] over (loc_i, scale_i) only, from q(t|x~)."""
    q_t, _ = posterior(fill(x, mask, fill_value), encoder)  # q(t|x~)
    if not (isinstance(q_t, dist.Independent) and isinstance(q_t.base_dist, dist.Normal)):  # start from its samples
        draws = q_t.sample((256,))  # (256, N, L)
        start = dist.Normal(draws.mean(0), draws.std(0))
    else:
        start = q_t.base_dist
    num_images = x.shape[0]
    index = torch.arange(num_images, device=x.device)

    def per_image_guide(x: Tensor, index: Tensor) -> None:
        t_loc = pyro.param("t_loc", start.loc.detach())  # (N, L)
        t_scale = pyro.param("t_scale", start.scale.detach(), constraint=constraints.positive)  # (N, L)
        with pyro.plate("data", size=num_images, subsample=index):
            pyro.sample("t", dist.Normal(t_loc, t_scale).to_event(1))  # r_i(t)

    # log p(x_o|t) p(t); the decoder's weights stay fixed (hidden from SVI, no gradients kept)
    masked_model = poutine.block(partial(model, decoder=decoder, num_data=num_images, mask=mask), hide_types=["param"])
    requires_grad = [p.requires_grad for p in decoder.parameters()]
    decoder.requires_grad_(False)
    try:
        with pyro.get_param_store().scope(), torch.enable_grad():  # a scratch param store
            svi = SVI(masked_model, per_image_guide, pyro.optim.Adam({"lr": lr}), Trace_ELBO())
            x_zeros = fill(x, mask, 0.0)  # any valid value where missing: the mask drops it
            for _ in range(steps):
                svi.step(x_zeros, index)
            loc, scale = pyro.param("t_loc").detach(), pyro.param("t_scale").detach()
    finally:
        for parameter, flag in zip(decoder.parameters(), requires_grad):
            parameter.requires_grad_(flag)
    return dist.Normal(loc, scale).to_event(1)


def impute_fitted_importance(x: Tensor, mask: Tensor, encoder: nn.Module, decoder: nn.Module, fill_value: Tensor,
                             num_particles: int = 500, steps: int = 200, lr: float = 0.05) -> tuple[Tensor, Tensor]:
    """`importance_mean` with the fitted r_i(t) of `fit_posterior` as the proposal."""
    proposal = fit_posterior(x, mask, encoder, decoder, fill_value, steps, lr)
    return importance_mean(x, mask, decoder, proposal, num_particles)


@torch.no_grad()
def impute_gibbs(x: Tensor, mask: Tensor, encoder: nn.Module, decoder: nn.Module, fill_value: Tensor,
                 steps: int = 100, burn_in: int = 20, metropolis: bool = True) -> Tensor:
    """The average of E[x|t] over steps burn_in..steps of a chain on (t, x_m) given x_o;
    Metropolis-within-Gibbs when `metropolis`, else pseudo-Gibbs (every proposal accepted)."""
    x_filled = fill(x, mask, fill_value)
    _, t = posterior(x_filled, encoder)  # t ~ q(t|x~), (N, L)
    x_filled = fill(x, mask, decoder(t).sample())  # x_m ~ p(x_m|t)
    total = torch.zeros_like(x)
    for step in range(steps):
        q_t, proposal = posterior(x_filled, encoder)  # q(t|x) and t' ~ q(t|x), x = (x_o, x_m); (N, L)
        if metropolis:
            log_p_new = sum(log_joint(x_filled, proposal, decoder))  # log p(x|t') + log p(t'), (N,)
            log_p_old = sum(log_joint(x_filled, t, decoder))
            log_ratio = log_p_new - q_t.log_prob(proposal) - log_p_old + q_t.log_prob(t)
            accept = torch.rand_like(log_ratio).log() < log_ratio  # (N,)
            t = torch.where(accept[:, None], proposal, t)
        else:
            t = proposal
        x_filled = fill(x, mask, decoder(t).sample())  # x_m ~ p(x_m|t)
        if step >= burn_in:
            total += decoder(t).mean
    return total / max(steps - burn_in, 1)


def nearest_neighbour(x: Tensor, mask: Tensor, train_images: Tensor, batch_size: int = 250) -> Tensor:
    """The training image (N, C, H, W) closest to each x on its observed pixels (squared distance)."""
    train_flat = train_images.flatten(1)  # (M, D)
    matches = []
    for x_batch, m_batch in zip(x.split(batch_size), mask.split(batch_size)):
        x_o, m = (x_batch * m_batch).flatten(1), m_batch.flatten(1).to(x.dtype)  # (B, D)
        # sum_d m_d (x_d - y_d)^2 = sum m x^2 - 2 (m x) . y + m . y^2, for every training image y
        distance = (x_o**2).sum(1, keepdim=True) - 2 * x_o @ train_flat.T + m @ (train_flat**2).T  # (B, M)
        matches.append(train_images[distance.argmin(1)])
    return torch.cat(matches)


def missing_pixel_errors(prediction: Tensor, truth: Tensor, mask: Tensor) -> dict[str, float]:
    """Mean squared error and clipped binary cross-entropy over the missing pixels only."""
    missing = ~mask
    p, y = prediction[missing], truth[missing]
    return {"mse": F.mse_loss(p, y).item(),
            "bce": F.binary_cross_entropy(p.clamp(BCE_CLIP, 1 - BCE_CLIP), y.clamp(0, 1)).item()}


def in_batches(method: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], x: Tensor, mask: Tensor,
               batch_size: int) -> tuple[Tensor, Tensor]:
    """`method(x_batch, mask_batch) -> (prediction, ess)` on `batch_size` images at a time, joined."""
    outputs = [method(x_batch, m_batch) for x_batch, m_batch in zip(x.split(batch_size), mask.split(batch_size))]
    return torch.cat([prediction for prediction, _ in outputs]), torch.cat([ess for _, ess in outputs])


def impute(
    run: TrainedRun, out_dir: Path, masks: tuple[str, ...] = MASKS, fraction: float = 0.5, max_images: int = 200,
    num_particles: int = 500, fit_steps: int = 200, fit_lr: float = 0.05, steps: int = 100, burn_in: int = 20,
    batch_size: int = 100, num_shown: int = 8, seed: int = 0,
) -> dict:
    """For each mask kind: the missing-pixel errors of every method and baseline on the first
    `max_images` test images (and the importance samplers' mean effective sample size), and a
    figure impute_<mask>.png with one row per method: masked input (missing pixels grey), the
    methods, the baselines, the truth."""
    above, _ = latents_above(torch.zeros(1, run.decoder.latent_dim, device=run.device), run.encoder)
    if above:  # the posterior samples latents above t: one line before any work
        raise ConfigError(f"task=impute with latents above t ({', '.join(above)}: "
                          f"posterior._target_={run.cfg.posterior._target_}): its samplers and chains draw t alone; "
                          "evaluate a one-layer run, or use task=likelihood, generate, represent, anomaly or pixels")
    x, _ = run.split(train=False)
    x = x[:max_images]
    train_images, _ = load_split(run.cfg.data, train=True)
    train_images = train_images.to(run.device)
    mean = train_images.mean(0)  # the mean image (C, H, W), also the fill value
    encoder, decoder = run.encoder, run.decoder
    methods: dict[str, Callable[[Tensor], Tensor | tuple[Tensor, Tensor]]] = {
        "one_pass": lambda m: impute_one_pass(x, m, encoder, decoder, mean),
        "importance": lambda m: in_batches(
            lambda xb, mb: impute_importance(xb, mb, encoder, decoder, mean, num_particles), x, m, batch_size),
        "fitted_importance": lambda m: in_batches(
            lambda xb, mb: impute_fitted_importance(xb, mb, encoder, decoder, mean, num_particles, fit_steps, fit_lr),
            x, m, batch_size),
        "pseudo_gibbs": lambda m: impute_gibbs(x, m, encoder, decoder, mean, steps, burn_in, metropolis=False),
        "metropolis_gibbs": lambda m: impute_gibbs(x, m, encoder, decoder, mean, steps, burn_in, metropolis=True),
        "mean_image": lambda m: mean.expand_as(x),
        "nearest_neighbour": lambda m: nearest_neighbour(x, m, train_images),
    }
    generator = torch.Generator().manual_seed(seed)
    errors = {}
    for kind in masks:
        mask = make_mask(kind, tuple(x.shape), fraction, generator).to(run.device)
        predictions, errors[kind] = {}, {}
        for name, method in methods.items():
            output = method(mask)
            predictions[name], ess = output if isinstance(output, tuple) else (output, None)
            errors[kind][name] = missing_pixel_errors(predictions[name], x, mask)
            if ess is not None:
                errors[kind][name]["effective_sample_size"] = ess.mean().item()
        shown = [fill(x, mask, 0.5)] + [fill(x, mask, p) for p in predictions.values()] + [x]  # rows
        save_image(torch.cat([row[:num_shown] for row in shown]), out_dir / f"impute_{kind}.png", nrow=num_shown)
    return {"num_images": len(x), "fraction": fraction, "rows": ["masked", *methods, "truth"], "errors": errors}
