"""A flow posterior: q(t|x) as the encoder's Gaussian followed by inverse autoregressive flows.

    t_0 ~ N(t_loc(x), diag t_scale(x)^2),   t_f = f_f(t_{f-1}; h), f = 1..F     (`posterior=iaf`)

Each f_f is Kingma et al.'s (2016) gated affine map t_f,d = s_d * t_{f-1,d} + (1 - s_d) * m_d, where
(m_d, logit s_d) come from a MADE network that reads t_{f-1,<d} (autoregressive) and the encoder's
features h, so by the change of variables

    log q(t_F|x) = log N(t_0; t_loc, diag t_scale^2) - sum_f sum_d log s_d

Sampling is one network pass per flow, and so is log q of a sample just drawn (Pyro's transforms
cache t_{f-1}); log q of any other t inverts the flows, one pass per dimension. The flows need a
reparameterized estimator: the score function's surrogate would read the cached inverse as a constant.
Measured against the Gaussian at equal wall time in docs/results.md ("levers").
"""
from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.distributions.transforms import ConditionalAffineAutoregressive
from pyro.nn import ConditionalAutoRegressiveNN
from torch import Tensor, nn

from guide import Posterior
from vae.rules import is_positive_int, is_positive_ints


class InverseAutoregressive(Posterior):
    """q(t|x): the Gaussian, then `flows` conditional IAF steps whose MADE networks have `hidden_dims`
    hidden units (null: two layers of the encoder's feature width). The order of the latent dimensions is
    fixed and reversed from one flow to the next, so the same config builds the same masks (buffers,
    not trained parameters)."""

    reparameterized_only = ("a flow posterior is trained through reparameterized samples; use estimator=reparam "
                            "or estimator=iwae")

    def __init__(self, latent_dim: int, context_dim: int, flows: int = 2, hidden_dims: list[int] | None = None) -> None:
        super().__init__(latent_dim, context_dim)
        if not is_positive_int(flows):
            raise ValueError(f"posterior.flows={flows!r}: must be a positive number of flows (posterior=gaussian for none)")
        if hidden_dims is not None and not is_positive_ints(hidden_dims):
            raise ValueError(f"posterior.hidden_dims={hidden_dims!r}: must be null or a list of positive integers")
        hidden = list(hidden_dims) if hidden_dims is not None else [context_dim, context_dim]
        order = torch.arange(latent_dim)
        self.flows = nn.ModuleList(
            ConditionalAffineAutoregressive(  # Kingma et al.'s gated ("stable") update
                ConditionalAutoRegressiveNN(latent_dim, context_dim, hidden,
                                            permutation=order if f % 2 == 0 else order.flip(0)), stable=True)
            for f in range(flows)
        )

    def forward(self, q_0: dist.Distribution, h: Tensor) -> dist.TransformedDistribution:
        """t = f_F(...f_1(t_0; h)...; h), log q(t|x) by the change of variables."""
        return dist.TransformedDistribution(q_0, [flow.condition(h) for flow in self.flows])

    def point(self, t_0: Tensor, h: Tensor) -> Tensor:
        """f_F(...f_1(t_0; h)...; h) (B, latent_dim): the flows applied to t_0 with the features h of its images."""
        for flow in self.flows:
            t_0 = flow.condition(h)(t_0)
        return t_0

