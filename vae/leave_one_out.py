"""The score-function ELBO gradient with K particles per image and a leave-one-out baseline.

For image x_i, K samples t_1..t_K ~ q(t|x_i) (one vectorized pass of `model` and `guide`):

    f_k   = log p(x_i, t_k) - log q(t_k|x_i)              the learning signal of particle k
    b_k   = 1/(K-1) * sum_{j != k} f_j                    leave-one-out baseline, independent of t_k
    ELBO(x_i)      ~ 1/K * sum_k f_k
    grad ELBO(x_i) ~ 1/K * sum_k [(f_k - b_k) * grad log q(t_k|x_i) + grad log p(x_i, t_k)]

b_k is built from the other particles only, so E[b_k * grad log q(t_k|x_i)] = 0 and the
estimate stays unbiased; it centres each image's signal on that image's own mean, which
removes the hundreds of nats that log p(x|t) carries (Kool et al. 2019, "Buy 4 REINFORCE
samples, get a baseline for free!"; Mnih & Rezende 2016, VIMCO, for the IW bound).
The last term is the gradient that does not go through the sample: the decoder's, and
the encoder's for reparameterized sites, whose score term is zero.

Pyro's own baselines (TraceGraph_ELBO: a decaying average, a network, a given value) are per site
and never see the other particles of the same image, hence this ELBO of our own.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from pyro.infer import Trace_ELBO
from torch import Tensor


class LeaveOneOut_ELBO(Trace_ELBO):
    """Trace_ELBO with `num_particles` >= 2 particles, each score term centred by the mean
    learning signal of the other particles of the same image.

    The K particles are vectorized (`vectorize_particles`): Pyro wraps model and guide in a
    plate of K at dim -2, so the decoder sees t of shape (K, B, latent_dim) in one batch."""

    def __init__(self, num_particles: int = 8, **kwargs) -> None:
        if num_particles < 2:
            raise ValueError(f"num_particles={num_particles}: a leave-one-out baseline needs at least 2")
        kwargs.setdefault("max_plate_nesting", 1)  # the "data" plate; the particles go left of it
        super().__init__(num_particles=num_particles, vectorize_particles=True, **kwargs)

    def elbo_and_surrogate(self, model: Callable, guide: Callable, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """(the ELBO estimate, the surrogate ELBO whose gradient is the estimator above)."""
        ((model_trace, guide_trace),) = self._get_traces(model, guide, args, kwargs)  # K particles at once
        model_sites = [s for s in model_trace.nodes.values() if s["type"] == "sample"]
        guide_sites = [s for s in guide_trace.nodes.values() if s["type"] == "sample"]
        log_p = sum(s["log_prob"] for s in model_sites)  # log p(x, t_k), (K, B), scaled by N/B
        log_q = sum(s["log_prob"] for s in guide_sites)  # log q(t_k|x), (K, B)
        score = sum(torch.as_tensor(s["score_parts"].score_function) for s in guide_sites)  # log q; 0 if reparam
        entropy = sum(torch.as_tensor(s["score_parts"].entropy_term) for s in guide_sites)  # log q if reparam
        f = (log_p - log_q).detach()  # learning signal f_k, (K, B)
        k = self.num_particles
        b = (f.sum(0, keepdim=True) - f) / (k - 1)  # leave-one-out baseline b_k, (K, B)
        direct = log_p.sum() - entropy.sum()
        score_terms = ((f - b) * score).sum()
        return f.sum() / k, (direct + score_terms) / k  # (ELBO, surrogate ELBO)

    def loss(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        with torch.no_grad():
            elbo, _ = self.elbo_and_surrogate(model, guide, *args, **kwargs)
        return -elbo.item()

    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs) -> Tensor:
        elbo, surrogate = self.elbo_and_surrogate(model, guide, *args, **kwargs)
        return -elbo + (surrogate.detach() - surrogate)  # value -ELBO, gradient -grad ELBO

    def loss_and_grads(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        elbo, surrogate = self.elbo_and_surrogate(model, guide, *args, **kwargs)
        (-surrogate).backward(retain_graph=self.retain_graph)
        return -elbo.item()
