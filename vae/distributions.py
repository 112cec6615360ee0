"""The distributions of pixel values that Pyro does not provide ready-made (vae/likelihoods.py uses them).

The discretized logistic of 8-bit pixels (Salimans et al. 2017, PixelCNN++): each pixel is one of
the 256 levels 0, 1/255, ..., 1, with the mass a logistic(loc, scale) puts on the level's bin,

    P(x = k/255) = F(k/255 + 1/510) - F(k/255 - 1/510)     F the logistic CDF, 0 < k < 255,
    P(x = 0) = F(1/510),  P(x = 1) = 1 - F(1 - 1/510)      the end bins take the tails,

so the 256 masses sum to one and -log2 P / D is the data's bits per dimension, exactly; and a
mixture of K of them per pixel. The logit-space Gaussian of dequantized pixels is Pyro's
TransformedDistribution of a Normal, with its mean by quadrature.
"""
from __future__ import annotations

import numpy as np
import pyro.distributions as dist
import torch
from pyro.distributions import constraints, transforms
from torch import Tensor
from torch.distributions.utils import broadcast_all
from torch.nn import functional as F

LEVELS = 256  # 8-bit data


class DiscretizedLogistic(dist.TorchDistribution):
    """A logistic(loc, scale) on the real line, rounded to the nearest of the 256 levels in [0, 1]."""

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.unit_interval  # the levels k/255 (a discrete subset of it)
    has_rsample = False

    def __init__(self, loc: Tensor, scale: Tensor, validate_args: bool | None = None) -> None:
        self.loc, self.scale = broadcast_all(loc, scale)
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(self, batch_shape: torch.Size, _instance=None) -> DiscretizedLogistic:
        new = self._get_checked_instance(DiscretizedLogistic, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc, new.scale = self.loc.expand(batch_shape), self.scale.expand(batch_shape)
        super(DiscretizedLogistic, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        half_bin = 0.5 / (LEVELS - 1)
        centred = value - self.loc
        upper = (centred + half_bin) / self.scale  # the bin's edges, standardized
        lower = (centred - half_bin) / self.scale
        log_lowest = F.logsigmoid(upper)  # log F(upper): the lowest level's mass
        log_highest = F.logsigmoid(-lower)  # log (1 - F(lower)): the highest level's mass
        # log(F(upper) - F(lower)) computed on the side of loc where both CDF values are small,
        # F(u) - F(l) = F(-l) - F(-u), as log F(a) + log(1 - F(b) / F(a)) with a > b: no cancellation
        right = centred > 0
        a, b = torch.where(right, -lower, upper), torch.where(right, -upper, lower)
        log_a = F.logsigmoid(a)
        log_inner = log_a + torch.log(-torch.expm1(F.logsigmoid(b) - log_a))
        level = torch.round(value * (LEVELS - 1))
        return torch.where(level == 0, log_lowest, torch.where(level == LEVELS - 1, log_highest, log_inner))

    @property
    def mean(self) -> Tensor:
        """E[x] = sum_k (k/255) P(k) = 1/255 sum_{k=1..255} P(x >= k/255), exact, one level at a time."""
        total = torch.zeros_like(self.loc)
        for k in range(1, LEVELS):
            total += torch.sigmoid(-((k - 0.5) / (LEVELS - 1) - self.loc) / self.scale)  # P(x >= k/255)
        return total / (LEVELS - 1)

    @torch.no_grad()
    def sample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        """A logistic draw loc + scale * log(u / (1 - u)), rounded to its level: exactly P above."""
        shape = self._extended_shape(sample_shape)
        u = torch.rand(shape, dtype=self.loc.dtype, device=self.loc.device).clamp(1e-6, 1 - 1e-6)
        y = self.loc.expand(shape) + self.scale.expand(shape) * (torch.log(u) - torch.log1p(-u))
        return torch.round(y * (LEVELS - 1)).clamp(0, LEVELS - 1) / (LEVELS - 1)


class DiscretizedLogisticMixture(dist.TorchDistribution):
    """sum_k w_k DiscretizedLogistic(loc_k, scale_k) per pixel, the K components along the parameters'
    last dim (PixelCNN++'s likelihood without its channel coupling): a pixel that is either dark or
    bright given t, as a digit's edge is, gets one mode for each instead of a broad one between them."""

    arg_constraints = {"logits": constraints.real, "loc": constraints.real, "scale": constraints.positive}
    support = constraints.unit_interval
    has_rsample = False

    def __init__(self, logits: Tensor, loc: Tensor, scale: Tensor, validate_args: bool | None = None) -> None:
        self.logits, self.loc, self.scale = broadcast_all(logits, loc, scale)  # (..., K)
        super().__init__(self.loc.shape[:-1], validate_args=validate_args)

    def expand(self, batch_shape: torch.Size, _instance=None) -> DiscretizedLogisticMixture:
        new = self._get_checked_instance(DiscretizedLogisticMixture, _instance)
        shape = torch.Size(batch_shape) + self.loc.shape[-1:]
        new.logits, new.loc, new.scale = self.logits.expand(shape), self.loc.expand(shape), self.scale.expand(shape)
        super(DiscretizedLogisticMixture, new).__init__(torch.Size(batch_shape), validate_args=False)
        new._validate_args = self._validate_args
        return new

    def components(self) -> DiscretizedLogistic:
        return DiscretizedLogistic(self.loc, self.scale)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        log_weights = F.log_softmax(self.logits, dim=-1)  # log w_k
        return torch.logsumexp(log_weights + self.components().log_prob(value.unsqueeze(-1)), dim=-1)

    @property
    def mean(self) -> Tensor:
        return (F.softmax(self.logits, dim=-1) * self.components().mean).sum(-1)

    @torch.no_grad()
    def sample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        """A component k ~ Categorical(w), then a draw of that component."""
        shape = self._extended_shape(sample_shape)
        k = dist.Categorical(logits=self.logits).sample(sample_shape).unsqueeze(-1)  # (..., 1)
        draws = self.components().sample(sample_shape)  # (..., K), one per component
        return draws.gather(-1, k).squeeze(-1).reshape(shape)


class LogitNormal(dist.TransformedDistribution):
    """x in (0, 1) with y = logit(lam + (1 - 2 lam) x) ~ N(y_loc, y_scale^2), lam = `logit_lambda`: the
    logit transform of density models of images (Dinh et al. 2017, RealNVP). `log_prob(x)` counts the
    transform's Jacobian, log |dy/dx|, so it is a density of x and gives bits/dim like the plain Gaussian."""

    def __init__(self, y_loc: Tensor, y_scale: Tensor, logit_lambda: float, validate_args: bool | None = None) -> None:
        self.logit_lambda = logit_lambda
        to_unit = transforms.AffineTransform(-logit_lambda / (1 - 2 * logit_lambda), 1 / (1 - 2 * logit_lambda))  # u -> x
        super().__init__(dist.Normal(y_loc, y_scale), [transforms.SigmoidTransform(), to_unit], validate_args=validate_args)

    def expand(self, batch_shape: torch.Size, _instance=None) -> LogitNormal:
        new = self._get_checked_instance(LogitNormal, _instance)
        new.logit_lambda = self.logit_lambda
        return super().expand(batch_shape, _instance=new)

    @property
    def scale(self) -> Tensor:
        """y's scale, in logit space."""
        return self.base_dist.scale

    @property
    def mean(self) -> Tensor:
        """E[x] by Gauss-Hermite quadrature over y (exact to float precision at 32 nodes for the scales
        a decoder outputs)."""
        y_loc, y_scale, lam = self.base_dist.loc, self.base_dist.scale, self.logit_lambda
        z, weights = np.polynomial.hermite_e.hermegauss(32)  # for the weight exp(-z^2 / 2)
        z = torch.as_tensor(z, dtype=y_loc.dtype, device=y_loc.device)
        weights = torch.as_tensor(weights / weights.sum(), dtype=y_loc.dtype, device=y_loc.device)
        u = torch.sigmoid(y_loc.unsqueeze(-1) + y_scale.unsqueeze(-1) * z)  # (..., nodes)
        return ((u * weights).sum(-1) - lam) / (1 - 2 * lam)
