"""A second stochastic layer: p(x, t, t2) = p(x|t) p(t|t2) p(t2), inferred bottom-up by q(t|x) q(t2|t),
as the two-layer model of the IWAE paper (Burda et al. 2016, section 5: 82.90 nats on MNIST against 84.78
with one layer; there with MLPs, here under the lecture's CNN networks).

    p(t2)    = N(0, I)                                      over `upper_dim` dimensions
    p(t|t2)  = N(t_loc(t2), diag t_scale(t2)^2)             an MLP        (`prior=two_layer`: TwoLayerPrior)
    q(t|x)   = the encoder's Gaussian, as in the lecture, or flows on it      (`posterior.beneath`)
    q(t2|t)  = N(t2_loc(t), diag t2_scale(t)^2)             an MLP        (`posterior=bottom_up`: BottomUp)

    ELBO = E_q[log p(x|t) + log p(t|t2) + log p(t2) - log q(t|x) - log q(t2|t)]

In Pyro a hierarchy is two sample sites under the plate "data": the prior samples "t2" and gives `model`
p(t|t2) for its site "t"; `guide` samples "t" and then asks its posterior for the latents above it
(`guide.Posterior.above`), here "t2" ~ q(t2|t). Trace_ELBO, the IW bound (vae/iwae.py) and the KL warm-up
see all four log-densities, each scaled by the plate's N/B; the evaluation reads the same sites
(`vae.elbo.log_joint(..., above=)`, `vae.elbo.latents_above`). The marginal p(t) = int p(t|t2) p(t2) dt2 has no
closed form: the KL is estimated by sampling, as for the learned priors of vae/priors.py.

The score-function estimators are refused (t2 is drawn by reparameterization, and q(t2|t) would need its
own surrogate), and so is DReG (it re-scores a diagonal q(t|x) alone). Both pieces start where the lecture
is: the last layer of each MLP starts at zero, so p(t|t2) = N(0, I) and q(t2|t) = N(0, I) at the first
step, log p(t2) - log q(t2|t) = 0 for every draw, and the two-layer model's first ELBO is the lecture's.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pyro
import pyro.distributions as dist
import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.nn import functional as F

from guide import MIN_T_SCALE, DiagonalNormal, Posterior
from model import Prior
from vae.rules import is_positive_int, is_positive_ints, targets


class ConditionalGaussian(nn.Module):
    """u (..., in_dim) -> (loc, scale) (..., out_dim) of a diagonal Gaussian: an MLP with ELU activations and
    `hidden_dims` hidden units, scale = MIN_T_SCALE + softplus(.). Its last layer starts at zero weights and
    the bias of N(0, I), so it starts as N(0, I) whatever u is."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dims: Sequence[int]) -> None:
        super().__init__()
        widths = [in_dim, *hidden_dims]
        layers: list[nn.Module] = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(w_in, w_out), nn.ELU()]
        last = nn.Linear(widths[-1], 2 * out_dim)
        nn.init.zeros_(last.weight)
        with torch.no_grad():  # loc 0, scale MIN_T_SCALE + softplus(b) = 1
            last.bias[:out_dim] = 0.0
            last.bias[out_dim:] = math.log(math.expm1(1.0 - MIN_T_SCALE))
        self.net = nn.Sequential(*layers, last)

    def forward(self, u: Tensor) -> tuple[Tensor, Tensor]:
        loc, raw_scale = self.net(u).chunk(2, dim=-1)
        return loc, MIN_T_SCALE + F.softplus(raw_scale)


def check_layer(key: str, upper_dim: object, hidden_dims: object) -> None:
    """The two keys each piece takes, one line naming the key."""
    if not is_positive_int(upper_dim):
        raise ValueError(f"{key}.upper_dim={upper_dim!r}: must be a positive integer, the dimension of t2")
    if not is_positive_ints(hidden_dims):
        raise ValueError(f"{key}.hidden_dims={hidden_dims!r}: must be a non-empty list of positive integers")


def partner_refusal(cfg: DictConfig, key: str, wanted: type, option: str) -> str | None:
    """The one line when the config's `key` (prior or posterior) is not the other half of the hierarchy,
    or the two halves disagree on t2's dimension; None when they fit."""
    if not targets(cfg, key, wanted):
        return (f"prior=two_layer and posterior=bottom_up go together (got {key}._target_={cfg[key]._target_}): the model's "
                f"second latent t2 needs q(t2|t) in the guide, and q(t2|t) needs t2 in the model; set {key}={option}")
    dims = cfg.prior.get("upper_dim"), cfg.posterior.get("upper_dim")
    if dims[0] != dims[1]:
        return (f"prior.upper_dim={dims[0]!r} with posterior.upper_dim={dims[1]!r}: p(t2) and q(t2|t) are over the "
                "same t2; give them one value (posterior.upper_dim follows prior.upper_dim unless set)")
    return None


class TwoLayerPrior(Prior):
    """p(t) = int p(t|t2) p(t2) dt2 with p(t2) = N(0, I) over `upper_dim` dimensions and p(t|t2) a diagonal
    Gaussian whose mean and scale an MLP (`hidden_dims`) gives: in `model`, forward samples site "t2" and
    gives p(t|t2) for site "t"."""

    def __init__(self, latent_dim: int, upper_dim: int = 8, hidden_dims: Sequence[int] = (128, 128)) -> None:
        super().__init__(latent_dim)
        check_layer("prior", upper_dim, hidden_dims)
        self.upper_dim = upper_dim
        self.down = ConditionalGaussian(upper_dim, latent_dim, hidden_dims)  # t2 -> p(t|t2)

    @classmethod
    def refuses(cls, cfg: DictConfig) -> str | None:
        return partner_refusal(cfg, "posterior", BottomUp, "bottom_up")

    def forward(self, num_images: int, like: Tensor) -> dist.Distribution:
        t2_loc = like.new_zeros(num_images, self.upper_dim)  # (B, upper_dim)
        t2 = pyro.sample("t2", dist.Normal(t2_loc, torch.ones_like(t2_loc)).to_event(1))  # log p(t2)
        t_loc, t_scale = self.down(t2)  # (..., B, latent_dim) each; particles left of B
        return dist.Normal(t_loc, t_scale).to_event(1)  # p(t|t2), for model's site "t"

    @torch.no_grad()
    def draw(self, num: int, generator: torch.Generator) -> Tensor:
        """t2 ~ N(0, I), then t ~ p(t|t2): `num` draws of the marginal p(t), from the seeded CPU generator."""
        t2 = torch.randn(num, self.upper_dim, generator=generator)
        eps = torch.randn(num, self.latent_dim, generator=generator)
        device = next(self.parameters()).device
        t_loc, t_scale = (value.cpu() for value in self.down(t2.to(device)))
        return t_loc + t_scale * eps


class BottomUp(Posterior):
    """q(t, t2|x) = q(t|x) q(t2|t): q(t|x) is the posterior `beneath` builds (the lecture's DiagonalNormal, or
    flows on the encoder's Gaussian: vae/flows.py), then in `guide`, `above(t)` samples site "t2" from q(t2|t),
    a diagonal Gaussian whose mean and scale an MLP (`hidden_dims`) gives."""

    def __init__(self, latent_dim: int, context_dim: int, upper_dim: int = 8, hidden_dims: Sequence[int] = (128, 128),
                 beneath: Callable[..., Posterior] = DiagonalNormal) -> None:
        super().__init__(latent_dim, context_dim)
        check_layer("posterior", upper_dim, hidden_dims)
        self.upper_dim = upper_dim
        self.beneath = beneath(latent_dim=latent_dim, context_dim=context_dim)  # q(t|x)
        self.up = ConditionalGaussian(latent_dim, upper_dim, hidden_dims)  # t -> q(t2|t)
        self.reparameterized_only = ("a second stochastic layer draws t2 ~ q(t2|t) by reparameterization; use "
                                     "estimator=reparam or estimator=iwae")

    @classmethod
    def refuses(cls, cfg: DictConfig) -> str | None:
        return partner_refusal(cfg, "prior", TwoLayerPrior, "two_layer")

    def forward(self, q_0: dist.Distribution, h: Tensor) -> dist.Distribution:
        return self.beneath(q_0, h)  # q(t|x)

    def point(self, t_0: Tensor, h: Tensor) -> Tensor:
        return self.beneath.point(t_0, h)

    def above(self, t: Tensor) -> Tensor:
        t2_loc, t2_scale = self.up(t)  # (..., B, upper_dim) each
        return pyro.sample("t2", dist.Normal(t2_loc, t2_scale).to_event(1))  # log q(t2|t)
