"""Learned priors p(t): the prior as a distribution with parameters, trained with the decoder.

    mixture   p(t) = sum_k w_k N(t | mu_k, diag sigma_k^2)     (`prior=mixture`, K = `prior.components`)

The weights (as logits), the means and the scales (as logs) of the K components are parameters of
the decoder (`pyro.module("decoder", ...)` registers them with its layers), so SVI fits the prior to
the codes the encoder gives, the aggregate posterior q(t) = (1/N) sum_i q(t|x_i) that maximizes the
ELBO (Hoffman & Johnson 2016); Tomczak & Welling (2018) use it as the baseline of the VampPrior.
KL(q(t|x) || p(t)) then has no closed form: Trace_ELBO estimates it with the same sample t as always,
vae/elbo.py by log q(t|x) - log p(t) at that t, and the IW bound, the anomaly scores and the
generation task read log p(t) and draws of t off this prior. With K = 1 the component starts at
N(0, I), the lecture's prior, and the first step is the standard model's exactly.
"""
from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from model import Prior


class GaussianMixture(Prior):
    """p(t) = sum_k softmax(logits)_k N(t | locs_k, diag exp(log_scales_k)^2), K = `components`.
    The means start at `init_spread` times standard normal draws (K > 1; one component starts at 0), the
    scales at 1, the weights equal."""

    def __init__(self, latent_dim: int, components: int = 10, init_spread: float = 1.0) -> None:
        super().__init__(latent_dim)
        if isinstance(components, bool) or not isinstance(components, int) or components < 1:
            raise ValueError(f"prior.components={components!r}: must be a positive integer")
        if isinstance(init_spread, bool) or not isinstance(init_spread, (int, float)) or not 0 <= init_spread < float("inf"):
            raise ValueError(f"prior.init_spread={init_spread!r}: must be a finite number >= 0")
        self.components = components
        self.logits = nn.Parameter(torch.zeros(components))  # (K,)
        locs = init_spread * torch.randn(components, latent_dim) if components > 1 else torch.zeros(1, latent_dim)
        self.locs = nn.Parameter(locs)  # (K, latent_dim)
        self.log_scales = nn.Parameter(torch.zeros(components, latent_dim))  # (K, latent_dim)

    def forward(self, num_images: int, like: Tensor) -> dist.MixtureSameFamily:
        mixture = dist.Categorical(logits=self.logits.to(like.dtype))
        component = dist.Normal(self.locs.to(like.dtype), self.log_scales.exp().to(like.dtype)).to_event(1)
        return dist.MixtureSameFamily(mixture, component).expand(torch.Size([num_images]))

    @torch.no_grad()
    def draw(self, num: int, generator: torch.Generator) -> Tensor:
        """A component k ~ Categorical(w) for each draw, then t = mu_k + sigma_k * eps, on the CPU."""
        weights = F.softmax(self.logits, dim=0).cpu()
        k = torch.multinomial(weights, num, replacement=True, generator=generator)  # (num,)
        eps = torch.randn(num, self.latent_dim, generator=generator)
        return self.locs.cpu()[k] + self.log_scales.exp().cpu()[k] * eps
