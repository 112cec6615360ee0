"""Likelihoods of gray levels beyond the lecture's two (model.py), each picked by `likelihood=NAME`
(conf/likelihood/NAME.yaml) and checking its own keys when it is built.

    gaussian                the lecture's Gaussian (model.Gaussian) with the scale options below
    logit_gaussian          the same in logit space: logit(lam + (1 - 2 lam) x) ~ N (RealNVP's transform)
    discretized_logistic    the 256 levels as they are (PixelCNN++), each a logistic's mass on its bin
    discretized_logistic_mixture   a mixture of K of them per pixel, its weights from the network too

Where the scale comes from (`likelihood.scale`): the network's output per pixel (`pixel`, the
derivation's diagonal covariance), one value per colour channel learned with the networks (`shared`),
or `fixed_scale` for every pixel (`fixed`). A learned scale is kept above `min_scale`.
docs/results.md ("Likelihoods of gray levels") measures them side by side.
"""
from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import model
from model import Likelihood, check_positive, dequantize
from vae.distributions import LEVELS, DiscretizedLogistic as DiscretizedLogisticDistribution
from vae.distributions import DiscretizedLogisticMixture as MixtureDistribution
from vae.rules import is_positive_int
from vae.distributions import LogitNormal

SCALES = ("pixel", "shared", "fixed")


class Scale(nn.Module):
    """Splits the decoder's output into (location outputs, x_scale), each (..., C, H, W), by `source`:
    `pixel` (half the outputs are the scale's), `shared` (one learned value per channel) or `fixed`."""

    def __init__(self, image_channels: int, source: str = "pixel", min_scale: float = 1e-3,
                 fixed_scale: float = 0.1) -> None:
        super().__init__()
        if source not in SCALES:
            raise ValueError(f"likelihood.scale={source!r}: must be one of {SCALES}")
        check_positive("min_scale", min_scale)
        check_positive("fixed_scale", fixed_scale)
        if source == "fixed" and fixed_scale < min_scale:
            raise ValueError(f"likelihood.fixed_scale={fixed_scale}: below likelihood.min_scale={min_scale}, "
                             "the floor of every scale of the likelihood")
        self.source, self.min_scale, self.fixed_scale = source, min_scale, fixed_scale
        self.params_per_pixel = 2 if source == "pixel" else 1  # (location, scale) or the location alone
        if source == "shared":  # one scale per colour channel, learned with the networks
            self.raw_scale = nn.Parameter(torch.zeros(image_channels, 1, 1))

    def forward(self, out: Tensor) -> tuple[Tensor, Tensor]:
        if self.source == "pixel":
            loc, raw_scale = out.chunk(2, dim=-3)  # along the channels
            return loc, self.min_scale + F.softplus(raw_scale)
        if self.source == "shared":
            return out, (self.min_scale + F.softplus(self.raw_scale)).expand_as(out)  # (C, 1, 1) -> (..., C, H, W)
        return out, torch.full_like(out, self.fixed_scale)

    def learned(self, p_x: dist.Distribution) -> Tensor | None:
        return None if self.source == "fixed" else p_x.scale


class Gaussian(model.Gaussian):
    """The lecture's Gaussian, x_loc = sigmoid(.), with its scale from `scale`: at scale=pixel it is
    model.Gaussian itself."""

    def __init__(self, image_channels: int = 1, scale: str = "pixel", min_scale: float = 1e-3,
                 fixed_scale: float = 0.1) -> None:
        super().__init__(image_channels, min_scale)
        self.scale = Scale(image_channels, scale, min_scale, fixed_scale)
        self.params_per_pixel = self.scale.params_per_pixel

    def forward(self, out: Tensor) -> dist.Normal:
        if self.scale.source == "pixel":
            return super().forward(out)
        loc, x_scale = self.scale(out)
        return dist.Normal(torch.sigmoid(loc), x_scale)

    def learned_scale(self, p_x: dist.Normal) -> Tensor | None:
        return self.scale.learned(p_x)


class LogitGaussian(Likelihood):
    """y = logit(lam + (1 - 2 lam) x) ~ N(y_loc, y_scale^2) per pixel of dequantized x, lam =
    `logit_lambda` keeping y finite at x = 0 and 1; y_loc unbounded. A density of x (the transform's
    Jacobian counted), so log p(x) - log 256 per pixel bounds the level's log-probability as for the
    Gaussian. Its mean (for pictures) is taken by quadrature."""

    log_bin_width = -math.log(256)

    def __init__(self, image_channels: int = 1, scale: str = "pixel", min_scale: float = 1e-3,
                 fixed_scale: float = 0.1, logit_lambda: float = 1e-3) -> None:
        super().__init__()
        if isinstance(logit_lambda, bool) or not isinstance(logit_lambda, (int, float)) or not 0 < logit_lambda < 0.5:
            raise ValueError(f"likelihood.logit_lambda={logit_lambda!r}: must be a number between 0 and 0.5")
        self.scale = Scale(image_channels, scale, min_scale, fixed_scale)
        self.params_per_pixel, self.min_scale, self.logit_lambda = self.scale.params_per_pixel, min_scale, logit_lambda

    def forward(self, out: Tensor) -> LogitNormal:
        return LogitNormal(*self.scale(out), self.logit_lambda)

    def observe(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return dequantize(images, generator)

    def learned_scale(self, p_x: LogitNormal) -> Tensor | None:
        return self.scale.learned(p_x)


class DiscretizedLogistic(Likelihood):
    """Each pixel one of the 256 levels, with the mass a logistic(x_loc, x_scale) puts on its bin;
    x_loc unbounded (the end bins take the tails: x_loc < 0 puts the mass on level 0). Its log p is
    the level's log-probability itself."""

    log_bin_width = 0.0

    def __init__(self, image_channels: int = 1, scale: str = "pixel", min_scale: float = 1e-3,
                 fixed_scale: float = 0.1) -> None:
        super().__init__()
        self.scale = Scale(image_channels, scale, min_scale, fixed_scale)
        self.params_per_pixel, self.min_scale = self.scale.params_per_pixel, min_scale

    def forward(self, out: Tensor) -> DiscretizedLogisticDistribution:
        return DiscretizedLogisticDistribution(*self.scale(out))

    def observe(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The nearest level (the data's own levels stay as they are)."""
        return torch.round(images * (LEVELS - 1)) / (LEVELS - 1)

    def learned_scale(self, p_x: DiscretizedLogisticDistribution) -> Tensor | None:
        return self.scale.learned(p_x)


class DiscretizedLogisticMixture(DiscretizedLogistic):
    """sum_k w_k DiscretizedLogistic(x_loc_k, x_scale_k) per pixel, K = `components`, the weights'
    logits, locations and scales all from the network per pixel (PixelCNN++'s likelihood without its
    channel coupling): a pixel that is either dark or bright given t gets one mode for each."""

    def __init__(self, image_channels: int = 1, components: int = 5, min_scale: float = 1e-3) -> None:
        super().__init__(image_channels, "pixel", min_scale)
        if not is_positive_int(components):
            raise ValueError(f"likelihood.components={components!r}: must be a positive integer")
        self.components = components
        self.params_per_pixel = 3 * components  # (weight logits, loc, scale) of each component

    def forward(self, out: Tensor) -> MixtureDistribution:
        """out's channels ordered (3, K, C): each part (..., C, H, W, K)."""
        logits, x_loc, raw_scale = out.unflatten(-3, (3, self.components, -1)).movedim(-4, -1).unbind(-5)
        return MixtureDistribution(logits, x_loc, self.min_scale + F.softplus(raw_scale))
