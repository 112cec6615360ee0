"""The importance-weighted bound as a training objective (Burda et al. 2016), per image.

For image x_i, K samples t_1..t_K ~ q(t|x_i) (one vectorized pass of `model` and `guide`):

    log w_ik = log p(x_i, t_k) - log q(t_k|x_i)
    L_K(x_i) = log (1/K) sum_k w_ik = logsumexp_k(log w_ik) - log K     <= log p(x_i)

L_1 is the ELBO; L_K never decreases with K and tends to log p(x_i). On a minibatch of B of the
N training images the objective is (N/B) sum_i L_K(x_i), an unbiased estimate of sum_n L_K(x_n).

Pyro's `RenyiELBO(alpha=0)` also takes the log-mean-exp per image (the data plate is common to
every site, so it is not summed first), but of the log-densities as the trace holds them, already
scaled by the plate's N/B: sum_i log (1/K) sum_k exp((N/B) log w_ik). That is not N/B times the
per-image bound (it weighs the particles by w^(N/B), nearly a max over them, and divided by N/B it
exceeds L_K(x_i)); the two agree only when the minibatch is the whole data set, N = B, which the
test checks. Hence this ELBO: it reads the same (K, B) log-densities of
Pyro's vectorized particles, takes the plate's N/B out of each site, log-mean-exps per image, and
applies N/B once, outside.

The gradient is that of the bound through the reparameterized samples (the IWAE estimator);
it needs a reparameterized guide (`estimator.reparameterized=true`, refused otherwise by
vae/config.py).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from pyro.infer import Trace_ELBO
from torch import Tensor


class IWAE_ELBO(Trace_ELBO):
    """The per-image importance-weighted bound with `num_particles` = K samples per image."""

    def __init__(self, num_particles: int = 5, **kwargs) -> None:
        if num_particles < 1:
            raise ValueError(f"num_particles={num_particles}: the importance-weighted bound needs at least 1")
        kwargs.setdefault("max_plate_nesting", 1)  # the "data" plate; the particles go left of it
        super().__init__(num_particles=num_particles, vectorize_particles=True, **kwargs)

    def bound(self, model: Callable, guide: Callable, *args, **kwargs) -> Tensor:
        """(N/B) sum_i L_K(x_i), differentiable through the reparameterized samples."""
        ((model_trace, guide_trace),) = self._get_traces(model, guide, args, kwargs)  # K particles at once
        scales = set()

        def unscaled(site: dict) -> Tensor:  # a site's (K, B) log-density, the plate's N/B taken out
            scale = float(site["scale"])
            scales.add(scale)
            return site["log_prob"] / scale

        log_p = sum(unscaled(s) for s in model_trace.nodes.values() if s["type"] == "sample")  # log p(x, t_k)
        log_q = sum(unscaled(s) for s in guide_trace.nodes.values() if s["type"] == "sample")  # log q(t_k|x)
        if len(scales) != 1:
            raise ValueError(f"IWAE_ELBO needs every sample site in one subsampled plate, one scale; got {sorted(scales)}")
        log_w = (log_p - log_q).reshape(self.num_particles, -1)  # (K, B); Pyro adds no particle dim for K=1
        per_image = torch.logsumexp(log_w, dim=0) - math.log(self.num_particles)  # L_K(x_i), (B,)
        return scales.pop() * per_image.sum()

    def loss(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        with torch.no_grad():
            return -self.bound(model, guide, *args, **kwargs).item()

    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs) -> Tensor:
        return -self.bound(model, guide, *args, **kwargs)

    def loss_and_grads(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward(retain_graph=self.retain_graph)
        return loss.item()
