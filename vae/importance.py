"""The importance-weighted estimate of log p(x) (Burda et al. 2016).

For each image x, with K particles t_k ~ q(t|x) from the guide,

    log w_k   = log p(x, t_k) - log q(t_k|x) = log p(x|t_k) + log p(t_k) - log q(t_k|x)
    log p(x) >= log (1/K) sum_k w_k = logsumexp_k(log w_k) - log K            (the IW bound)
    ELBO(x)   = E_q[log w]          ~  (1/K) sum_k log w_k

The IW bound is never below the ELBO, grows with K, and tends to log p(x) as K -> infinity.
log p(x, t) comes from the project's `model` with t given (`vae.elbo.log_joint`), and q(t|x) from
its `guide` (`guide.posterior`). Pyro's `RenyiELBO(alpha=0)` computes the same bound for training,
but from the plate's N/B-scaled log-densities and as one number per minibatch; evaluation needs it
per image and unscaled, hence this code. The particles are vectorized: the decoder takes a batch of latents (B, latent_dim),
so each chunk of K_c particles for B images is one batch of K_c * B latents, with x repeated
K_c times, and only the chunks are a loop. Chunks combine by a running log-sum-exp.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from guide import posterior
from vae.elbo import elbo_parts, latents_above, log_joint


def repeat(x: Tensor, num_particles: int) -> Tensor:
    """(B, ...) -> (K * B, ...): x repeated once per particle, particle-major."""
    return x.expand(num_particles, *x.shape).reshape(num_particles * x.shape[0], *x.shape[1:])


@torch.no_grad()
def log_weights(
    x: Tensor, encoder: nn.Module, decoder: nn.Module, num_particles: int, mask: Tensor | None = None
) -> dict[str, Tensor]:
    """K particles t_k ~ q(t|x) per image and their terms, each (K, B): `log_p_x` = log p(x|t_k),
    `log_p_t` = log p(t_k), `log_q` = log q(t_k|x), `log_w` = their sum log p(x, t_k) - log q(t_k|x),
    and the particles `t` (K, B, latent_dim). With a second stochastic layer (vae/hierarchy.py) each particle
    is a pair (t_k, t2_k) ~ q(t|x) q(t2|t): `log_p_t` = log p(t_k|t2_k) + log p(t2_k) and `log_q` adds
    log q(t2_k|t_k), so the bound is the two-layer model's."""
    num_images = x.shape[0]
    q_t, _ = posterior(x, encoder)  # q(t|x), batch (B,)
    t = q_t.sample((num_particles,))  # (K, B, latent_dim)
    above, log_q_above = latents_above(t, encoder)  # a second layer's t2 ~ q(t2|t), (K, B, upper_dim); else none
    log_q = q_t.log_prob(t) + log_q_above  # log q(t|x) (+ log q(t2|t)), (K, B)
    flat = {name: value.reshape(num_particles * num_images, *value.shape[2:]) for name, value in above.items()}
    flat_mask = None if mask is None else repeat(mask, num_particles)
    log_p_x, log_p_t = log_joint(repeat(x, num_particles), t.reshape(num_particles * num_images, -1),
                                 decoder, flat_mask, above=flat)  # (K * B,) each
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
