"""The beta-NLL (`trainer.nll_beta`): the Gaussian likelihood's pixels weighed by their scale, a
training objective that the model does not know about.

Seitzer et al. (2022): each pixel's log N(x | x_loc, x_scale^2) is multiplied by the fixed weight
w = stop_gradient(x_scale^(2 beta)), the weights scaled to average one over each image, so the
objective keeps the ELBO's total weight against the KL. The mean's gradient at a pixel,
(x - x_loc) / x_scale^2 under the ELBO, becomes proportional to (x - x_loc) / x_scale^(2 - 2 beta):
at beta = 1 every pixel's error counts alike, as in a squared error, and a scale collapsed on the
background cannot drown the strokes' gradient. The weights are positive and held fixed, so each
pixel's best scale for its mean is the ELBO's. `target="loc"` weighs the mean's gradient only (the
"faithful" heteroscedastic fit of Stirn et al. 2023): the value and the scale's gradient are the
ELBO's, the mean's gradient is w (x - x_loc) / x_scale^2.

It is applied as a Pyro effect handler around `model` (`beta_nll(model, beta, target)`, built in
vae/build.py for training only): the observed site "x" is scored by `BetaNLL` instead of the
Gaussian, t and the guide are untouched. Evaluation reads the model itself, so every test number
stays the ELBO's. docs/results.md ("Likelihoods of gray levels") measures it.
"""
from __future__ import annotations

from collections.abc import Callable

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.poutine.messenger import Messenger
from torch import Tensor, nn

TARGETS = ("both", "loc")  # what the weight acts on: the pixel's whole log-density, or its mean's gradient


class BetaNLL(dist.TorchDistribution):
    """A training objective, not a density: each pixel's log-density under the Gaussian `base` times
    w = stop_gradient(scale^(2 beta)), scaled to average one over each image's `event_dims` pixels
    (one scale for all pixels: w = 1); with `target="loc"`, the Gaussian's value with the mean's
    gradient weighed by w."""

    arg_constraints = {}

    def __init__(self, base: dist.Normal, beta: float, event_dims: int, target: str = "both",
                 validate_args: bool | None = None) -> None:
        self.base, self.beta, self.target = base, beta, target
        weight = base.scale.detach() ** (2 * beta)  # sg(scale^(2 beta)), per pixel
        pixels = tuple(range(-event_dims, 0))
        self.weight = weight / weight.mean(dim=pixels, keepdim=True)  # mean one over each image
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    @property
    def support(self) -> constraints.Constraint:
        return self.base.support

    def log_prob(self, value: Tensor) -> Tensor:
        if self.target == "loc":  # the value of loc, the gradient w d/d loc: loc's gradient weighed, not the scale's
            loc = self.base.loc.detach() + self.weight * (self.base.loc - self.base.loc.detach())
            return dist.Normal(loc, self.base.scale).log_prob(value)
        return self.weight * self.base.log_prob(value)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        return self.base.sample(sample_shape)


class BetaNLLMessenger(Messenger):
    """Scores the observed site `site` (p(x|t), an image event over a Normal) by `BetaNLL`."""

    def __init__(self, beta: float, target: str = "both", site: str = "x") -> None:
        super().__init__()
        self.beta, self.target, self.site = beta, target, site

    def _pyro_sample(self, msg: dict) -> None:
        if msg["name"] != self.site:
            return
        p_x = msg["fn"]  # Independent(Normal (B, C, H, W), 3)
        if not isinstance(p_x, dist.Independent) or not isinstance(p_x.base_dist, dist.Normal):
            raise TypeError(f"the beta-NLL weighs a Gaussian's pixels; site {self.site!r} is {type(p_x).__name__}")
        event_dims = p_x.reinterpreted_batch_ndims
        msg["fn"] = BetaNLL(p_x.base_dist, self.beta, event_dims, self.target).to_event(event_dims)


def weighs(likelihood: nn.Module) -> bool:
    """Whether the beta-NLL can weigh `likelihood`'s pixels: each a Normal (read off one pixel's output)."""
    return isinstance(likelihood(torch.zeros(1, likelihood.params_per_pixel, 1, 1)), dist.Normal)


def beta_nll(model: Callable, beta: float, target: str = "both") -> Callable:
    """`model` with its site "x" scored by the beta-NLL of `beta` on `target` (beta = 0: `model` itself)."""
    return BetaNLLMessenger(beta, target)(model) if beta else model
