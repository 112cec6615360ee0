"""The ELBO of each image and its two parts, for evaluation.

    ELBO(x) = E_q[log p(x|t)] - KL(q(t|x) || p(t))
            =  reconstruction  -  KL

The reconstruction is estimated with one t sampled from the guide (not its mean, which would
overstate the bound); the KL between the two diagonal Gaussians is exact. Both come from the
same Pyro `model` and `guide` that training uses (`guide.posterior`, `model.log_joint`).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import kl_divergence

from guide import Encoder, posterior
from model import Decoder, log_joint, prior


@torch.no_grad()
def elbo_parts(x: Tensor, encoder: Encoder, decoder: Decoder) -> dict[str, Tensor]:
    """Per-image `elbo`, `recon` = log p(x|t) and `kl` = KL(q(t|x) || p(t)), each (B,), in nats."""
    q_t, t = posterior(x, encoder)  # q(t|x), t ~ q(t|x)
    recon, _ = log_joint(x, t, decoder)  # log p(x|t), (B,)
    kl = kl_divergence(q_t, prior(len(x), decoder.latent_dim, like=x))  # KL(q || p), (B,)
    return {"elbo": recon - kl, "recon": recon, "kl": kl}


def dataset_elbo(x: Tensor, encoder: Encoder, decoder: Decoder, batch_size: int = 1000) -> dict[str, float]:
    """Mean per-image ELBO, reconstruction and KL over all of `x`, in nats per image."""
    totals = {"elbo": 0.0, "recon": 0.0, "kl": 0.0}
    for x_batch in x.split(batch_size):
        parts = elbo_parts(x_batch, encoder, decoder)
        for key in totals:
            totals[key] += parts[key].sum().item()
    return {key: total / len(x) for key, total in totals.items()}
