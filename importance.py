"""The importance-weighted estimate of log p(x) (Burda et al. 2016), and the likelihood task.

For each image x, with K particles t_k ~ q(t|x) from the guide,

    log w_k   = log p(x, t_k) - log q(t_k|x) = log p(x|t_k) + log p(t_k) - log q(t_k|x)
    log p(x) >= log (1/K) sum_k w_k = logsumexp_k(log w_k) - log K            (the IW bound)
    ELBO(x)   = E_q[log w]          ~  (1/K) sum_k log w_k

The IW bound is never below the ELBO, grows with K, and tends to log p(x) as K -> infinity.
log p(x, t) comes from tracing the project's `model` with t given, and q(t|x) from its
`guide`. The particles are vectorized: the decoder takes a batch of latents (B, latent_dim),
so each chunk of K_c particles for B images is one batch of K_c * B latents, with x repeated
K_c times, and only the chunks are a loop. Chunks combine by a running log-sum-exp.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from torch import Tensor, nn

from data import bits_per_dim
from elbo import dataset_elbo, elbo_parts
from guide import guide
from model import model
from runs import TrainedRun

log = logging.getLogger(__name__)


def posterior(x: Tensor, encoder: nn.Module) -> dist.Distribution:
    """q(t|x) from the guide, batch (B,), event (latent_dim,)."""
    index = torch.arange(x.shape[0], device=x.device)
    return poutine.trace(guide).get_trace(x, index, encoder, x.shape[0]).nodes["t"]["fn"]


def log_joint(x: Tensor, t: Tensor, decoder: nn.Module, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(log p(x|t), log p(t)), each (B,), for images x (B, C, H, W) and latents t (B, latent_dim).

    Under `mask` (True = observed) the first is log p(x_obs|t): missing pixels add nothing.
    """
    index = torch.arange(x.shape[0], device=x.device)
    conditioned = poutine.condition(model, data={"t": t})
    trace = poutine.trace(conditioned).get_trace(x, index, decoder, x.shape[0], mask=mask)  # scale 1
    log_p_x = trace.nodes["x"]["fn"].log_prob(x)  # log p(x|t), (B,)
    log_p_t = trace.nodes["t"]["fn"].log_prob(t)  # log p(t), (B,)
    return log_p_x, log_p_t


def repeat(x: Tensor, num_particles: int) -> Tensor:
    """(B, ...) -> (K * B, ...): x repeated once per particle, particle-major."""
    return x.expand(num_particles, *x.shape).reshape(num_particles * x.shape[0], *x.shape[1:])


@torch.no_grad()
def log_weights(
    x: Tensor, encoder: nn.Module, decoder: nn.Module, num_particles: int, mask: Tensor | None = None
) -> dict[str, Tensor]:
    """K particles t_k ~ q(t|x) per image and their terms, each (K, B): `log_p_x` = log p(x|t_k),
    `log_p_t` = log p(t_k), `log_q` = log q(t_k|x), `log_w` = their sum log p(x, t_k) - log q(t_k|x),
    and the particles `t` (K, B, latent_dim)."""
    num_images = x.shape[0]
    q_t = posterior(x, encoder)  # q(t|x), batch (B,)
    t = q_t.sample((num_particles,))  # (K, B, latent_dim)
    log_q = q_t.log_prob(t)  # log q(t|x), (K, B)
    flat_mask = None if mask is None else repeat(mask, num_particles)
    log_p_x, log_p_t = log_joint(repeat(x, num_particles), t.reshape(num_particles * num_images, -1),
                                 decoder, flat_mask)  # (K * B,) each
    log_p_x = log_p_x.reshape(num_particles, num_images)
    log_p_t = log_p_t.reshape(num_particles, num_images)
    return {"log_p_x": log_p_x, "log_p_t": log_p_t, "log_q": log_q, "log_w": log_p_x + log_p_t - log_q, "t": t}


@torch.no_grad()
def iw_estimates(
    x: Tensor, encoder: nn.Module, decoder: nn.Module, num_particles: int, particles_per_chunk: int = 100
) -> dict[str, Tensor]:
    """Per image (B,): `log_px` = logsumexp_k log w_k - log K (the IW bound on log p(x)),
    `elbo` = mean_k log w_k and `recon` = mean_k log p(x|t_k) over the same K particles, and the
    exact `kl` = KL(q(t|x) || p(t)) from elbo.py."""
    log_sum_w = torch.full((x.shape[0],), -math.inf, device=x.device)  # running logsumexp_k log w_k
    sum_log_w = torch.zeros(x.shape[0], device=x.device)
    sum_log_p_x = torch.zeros(x.shape[0], device=x.device)
    for start in range(0, num_particles, particles_per_chunk):  # chunks of vectorized particles
        terms = log_weights(x, encoder, decoder, min(particles_per_chunk, num_particles - start))
        log_sum_w = torch.logaddexp(log_sum_w, terms["log_w"].logsumexp(0))
        sum_log_w += terms["log_w"].sum(0)
        sum_log_p_x += terms["log_p_x"].sum(0)
    return {
        "log_px": log_sum_w - math.log(num_particles),  # log (1/K) sum_k w_k, (B,)
        "elbo": sum_log_w / num_particles,  # (B,)
        "recon": sum_log_p_x / num_particles,  # (B,)
        "kl": elbo_parts(x, encoder, decoder)["kl"],  # (B,)
    }


def dataset_iw(
    x: Tensor, encoder: nn.Module, decoder: nn.Module, num_particles: int,
    batch_size: int = 100, particles_per_chunk: int = 100,
) -> dict[str, Tensor]:
    """`iw_estimates` for every image of x (N, C, H, W), `batch_size` images at a time."""
    parts = [iw_estimates(x_batch, encoder, decoder, num_particles, particles_per_chunk)
             for x_batch in x.split(batch_size)]
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def mean_and_standard_error(values: Tensor) -> tuple[float, float]:
    """The mean over images and its standard error std / sqrt(N)."""
    values = values.double()
    standard_error = (values.std() / math.sqrt(len(values))).item() if len(values) > 1 else math.nan
    return values.mean().item(), standard_error


def images_to_evaluate(num_images: int, max_images: int | None, sample_seed: int | None) -> Tensor:
    """Indices into a split of `num_images`: all of them; the first `max_images`; or, with a
    `sample_seed`, `max_images` drawn uniformly without replacement, whose mean is an unbiased
    estimate of the whole split's mean (the first images of a split need not be typical)."""
    if max_images is None or max_images >= num_images:
        return torch.arange(num_images)
    if sample_seed is None:
        return torch.arange(max_images)
    return torch.randperm(num_images, generator=torch.Generator().manual_seed(sample_seed))[:max_images].sort().values


def evaluate_likelihood(
    run: TrainedRun, out_dir: Path, num_particles: int = 5000, batch_size: int = 100,
    particles_per_chunk: int = 100, max_images: int | None = None, sample_seed: int | None = None,
    whole_split_particles: int | None = 100, split: str = "test",
) -> dict[str, float]:
    """Test NLL = -(1/N) sum_i log p(x_i) by the IW bound with K = `num_particles`, its standard
    error, and the ELBO beside it (one sample per image, as in training, and K samples); bits/dim
    too for the Gaussian likelihood. Writes the per-image values (and their indices) to likelihood.npz.

    On a random sample of the split (`sample_seed`), also the whole split's NLL by a difference
    estimator: its mean log p_K(x) = mean ELBO + mean gap, with gap_i = log p_K(x_i) - ELBO(x_i).
    The ELBO is cheap, so it is averaged over every image (`whole_split_particles` each); the gap
    varies far less from image to image than log p(x) does, so the sample pins its mean down with
    a small standard error. Unbiased for what K particles on every image would give. The standard
    error is the sample's; the whole-split ELBO's own Monte Carlo error, about
    sd(log w) / sqrt(N K'), is far smaller and left out."""
    all_x, _ = run.split(train=split == "train")
    index = images_to_evaluate(len(all_x), max_images, sample_seed)
    x = all_x[index.to(all_x.device)]
    started = time.perf_counter()
    iw = dataset_iw(x, run.encoder, run.decoder, num_particles, batch_size, particles_per_chunk)
    seconds = time.perf_counter() - started
    nll, nll_se = mean_and_standard_error(-iw["log_px"])
    elbo_k, elbo_k_se = mean_and_standard_error(iw["elbo"])
    result = {
        "split": split, "num_images": len(x), "num_particles": num_particles,
        "nll": nll, "nll_standard_error": nll_se,
        "elbo": dataset_elbo(x, run.encoder, run.decoder)["elbo"],  # one t per image, as train.py logs
        "elbo_k_samples": elbo_k, "elbo_k_samples_standard_error": elbo_k_se,
        "kl": iw["kl"].mean().item(), "seconds": seconds, "images_per_second": len(x) / seconds,
    }
    if sample_seed is not None and len(x) < len(all_x) and whole_split_particles:
        whole = dataset_iw(all_x, run.encoder, run.decoder, whole_split_particles, batch_size, particles_per_chunk)
        elbo_whole = whole["elbo"].double().mean().item()  # (1/N) sum_i ELBO(x_i), every image
        gap, gap_se = mean_and_standard_error(iw["log_px"] - iw["elbo"])  # log p_K(x) - ELBO, on the sample
        result.update({
            "whole_split_images": len(all_x), "whole_split_particles": whole_split_particles,
            "whole_split_elbo": elbo_whole, "whole_split_nll_with_whole_split_particles": -whole["log_px"].mean().item(),
            "whole_split_nll": -(elbo_whole + gap), "whole_split_nll_standard_error": gap_se,
            "gap_iw_minus_elbo": gap,
        })
        log.info(f"whole {split} split: NLL {result['whole_split_nll']:.2f} +- {gap_se:.2f} nats (ELBO "
                 f"{elbo_whole:.2f} over {len(all_x)} images + IW gap {gap:.2f} from the sample)")
    if run.cfg.model.likelihood == "gaussian":
        result["bits_per_dim"] = bits_per_dim(-nll, run.image_shape)
        result["bits_per_dim_standard_error"] = nll_se / (math.prod(run.image_shape) * math.log(2))
    np.savez(out_dir / "likelihood.npz", index=index.numpy(), **{key: value.cpu().numpy() for key, value in iw.items()})
    log.info(f"{split} NLL {nll:.2f} +- {nll_se:.2f} nats (K={num_particles}, {len(x)} images), "
             f"ELBO {result['elbo']:.2f}; {result['images_per_second']:.1f} images/s")
    return result
