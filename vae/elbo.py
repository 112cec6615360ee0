"""The ELBO of each image and its two parts, for evaluation.

    ELBO(x) = E_q[log p(x|t)] - KL(q(t|x) || p(t))
            =  reconstruction  -  KL

The reconstruction is estimated with one t sampled from the guide (not its mean, which would
overstate the bound); the KL between the two diagonal Gaussians is exact, and for a guide with
flows (no closed form) it is the one-sample estimate log q(t|x) - log p(t) at that same t. Both come from the
same Pyro `model` and `guide` that training uses: `guide.posterior`, and `model_trace` here, which runs `model`
with t given (`log_joint` reads log p(x|t) and log p(t) off it). A learned prior without a closed-form KL gets
the same one-sample estimate, and so does a second stochastic layer (vae/hierarchy.py):
log q(t|x) + log q(t2|t) - log p(t|t2) - log p(t2), its t2 drawn by the guide's q(t2|t).
For the likelihoods of 8-bit data the mean ELBO is also given in bits per dimension, and for a
learned scale the share of pixels whose scale sits at its floor `likelihood.min_scale` (a likelihood
that rewards precision the data does not have shows up there first).
"""
from __future__ import annotations

import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import kl_divergence

from guide import Encoder, posterior
from model import Decoder, model
from vae.data import bits_per_dim


FLOOR_MARGIN = 1.01  # a scale within 1% of likelihood.min_scale counts as at the floor


def model_trace(x: Tensor, t: Tensor, decoder: Decoder, mask: Tensor | None = None,
                above: dict[str, Tensor] | None = None) -> poutine.Trace:
    """`model` run on the images x (B, C, H, W) with its latent site "t" fixed to t (B, latent_dim), and the latents
    above t (a second layer's t2: `latents_above`) to `above`; the plate spans just these B images (scale 1)."""
    index = torch.arange(x.shape[0], device=x.device)
    trace = poutine.trace(poutine.condition(model, data={"t": t, **(above or {})})).get_trace(
        x, index, decoder, x.shape[0], mask=mask)
    drawn = [name for name, site in trace.nodes.items()  # a latent not given was drawn from its prior
             if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)]
    if drawn:
        raise ValueError(f"log_joint: the model has latents {drawn} above t; give their values (`above`)")
    return trace


def log_prior(trace: poutine.Trace) -> Tensor:
    """log p(t) (B,) of a `model_trace`: with latents above t, log p(t|t2) + log p(t2)."""
    above = [name for name, site in trace.nodes.items() if site["type"] == "sample" and site["is_observed"]
             and name not in ("t", "x") and not site_is_subsample(site)]
    return sum(trace.nodes[name]["fn"].log_prob(trace.nodes[name]["value"]) for name in ["t", *above])


def log_joint(x: Tensor, t: Tensor, decoder: Decoder, mask: Tensor | None = None,
              above: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """(log p(x|t), log p(t)), each (B,), read off `model` with t given (`model_trace`); under `mask`
    (True = observed) log p(x_obs|t)."""
    trace = model_trace(x, t, decoder, mask, above)
    return trace.nodes["x"]["fn"].log_prob(x), log_prior(trace)


def latents_above(t: Tensor, encoder: Encoder) -> tuple[dict[str, Tensor], Tensor]:
    """The latents above t (..., latent_dim) drawn from the guide's q(.|t), and their log q summed (...):
    a second layer's t2 ~ q(t2|t) and log q(t2|t) (vae/hierarchy.py); none and 0 in the lecture's model."""
    trace = poutine.trace(encoder.posterior.above).get_trace(t)
    sites = [site for site in trace.nodes.values() if site["type"] == "sample"]
    log_q = sum((site["fn"].log_prob(site["value"]) for site in sites), t.new_zeros(t.shape[:-1]))
    return {site["name"]: site["value"] for site in sites}, log_q


@torch.no_grad()
def elbo_parts(x: Tensor, encoder: Encoder, decoder: Decoder) -> dict[str, Tensor]:
    """Per-image `elbo`, `recon` = log p(x|t) and `kl` = KL(q(t|x) || p(t)), each (B,), in nats."""
    q_t, t = posterior(x, encoder)  # q(t|x), t ~ q(t|x)
    above, log_q_above = latents_above(t, encoder)  # t2 ~ q(t2|t) of a second layer; else none
    trace = model_trace(x, t, decoder, above=above)  # the model with t (and t2) given
    p_x = trace.nodes["x"]["fn"]  # p(x|t), event (C, H, W)
    recon, log_p_t = p_x.log_prob(x), log_prior(trace)  # log p(x|t), log p(t) (with t2: log p(t|t2) p(t2))
    if above:  # KL(q(t, t2|x) || p(t, t2)), estimated at the same draws
        kl = q_t.log_prob(t) + log_q_above - log_p_t
    else:
        try:
            kl = kl_divergence(q_t, trace.nodes["t"]["fn"])  # KL(q || p), exact, (B,): two diagonal Gaussians
        except NotImplementedError:  # flows, a learned prior: no closed form
            kl = q_t.log_prob(t) - log_p_t  # log q(t|x) - log p(t): E_q of it is KL(q || p), (B,)
    parts = {"elbo": recon - kl, "recon": recon, "kl": kl}
    x_scale = None
    if decoder.likelihood.min_scale is not None:  # (B, C, H, W), (B, C, H, W, K) of a mixture; None if fixed
        x_scale = decoder.likelihood.learned_scale(p_x.base_dist)
    if x_scale is not None:  # a learned scale: how many pixels sit at the floor
        parts["scale_at_floor"] = (x_scale < FLOOR_MARGIN * decoder.likelihood.min_scale).flatten(1).float().mean(1)
    return parts


def dataset_elbo(x: Tensor, encoder: Encoder, decoder: Decoder, batch_size: int = 1000) -> dict[str, float]:
    """Mean per-image ELBO, reconstruction and KL over all of `x`, in nats per image; for 8-bit data
    `bits_per_dim` too, and for a learned scale `scale_at_floor` (the share of all pixels)."""
    totals: dict[str, float] = {}
    for x_batch in x.split(batch_size):
        for key, values in elbo_parts(x_batch, encoder, decoder).items():
            totals[key] = totals.get(key, 0.0) + values.sum().item()
    means = {key: total / len(x) for key, total in totals.items()}
    if decoder.likelihood.log_bin_width is not None:  # 8-bit levels
        means["bits_per_dim"] = bits_per_dim(means["elbo"], tuple(x.shape[1:]), decoder.likelihood.log_bin_width)
    return means
