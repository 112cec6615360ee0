"""The generative model p(x, t) = p(x|t) p(t).

    p(t)   = N(0, I)                                            the prior over the latent code t
    p(x|t) = prod_pixels Bernoulli(x | sigmoid(x_logits(t)))                   (binarized images)
           or prod_pixels N(x | x_loc(t), x_scale(t)^2)                     (dequantized images)
           or prod_pixels N(logit x | x_loc(t), x_scale(t)^2) |d logit x / dx|    (the same, in logit space)
           or prod_pixels DiscretizedLogistic(x | x_loc(t), x_scale(t))   (the 256 levels as they are)
              or a mixture of K of them per pixel, its weights from the network too (`components=K`)

The scale of the last three is the network's output per pixel (`scale="pixel"`, the diagonal
covariance of the derivation), one learned value per channel (`"shared"`), or fixed (`"fixed"`).

`Decoder` is the network that maps t to the likelihood's parameters; it never samples.
`model` is the Pyro program that samples t from the prior and scores the observed image;
`log_joint` reads log p(x|t) and log p(t) off that same program for a given t (evaluation).
"""
from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions import constraints, transforms
from torch import Tensor, nn
from torch.distributions.utils import broadcast_all
from torch.nn import functional as F

LIKELIHOODS = ("bernoulli", "gaussian", "logit_gaussian", "discretized_logistic")
SCALES = ("pixel", "shared", "fixed")  # where the Gaussian's or the logistic's scale comes from


def check_image_shape(image_shape: tuple[int, int, int], channels: list[int]) -> None:
    """Each conv layer halves height and width, so both must divide by 2**len(channels)."""
    _, height, width = image_shape
    factor = 2 ** len(channels)
    if height % factor or width % factor:
        raise ValueError(
            f"image shape {tuple(image_shape)} cannot be taken by a network with "
            f"{len(channels)} stride-2 layers (channels={list(channels)}): height and width "
            f"must be divisible by {factor}"
        )


class ResidualBlock(nn.Module):
    """x + conv(elu(conv(elu(x)))): a pre-activation residual block (He et al. 2016) of two 3x3
    convolutions that keeps the shape (B, channels, H, W). The second convolution starts at zero,
    so a new block is the identity and a deeper network starts as the shallow one it extends."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(nn.ELU(), nn.Conv2d(channels, channels, 3, padding=1),
                                      nn.ELU(), nn.Conv2d(channels, channels, 3, padding=1))
        nn.init.zeros_(self.residual[-1].weight)
        nn.init.zeros_(self.residual[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.residual(x)


class Decoder(nn.Module):
    """t (..., latent_dim) -> parameters of p(x|t) over images of `image_shape` (C, H, W).

    A dense layer lifts t to a small feature map; each transposed convolution doubles its
    height and width, mirroring the encoder. Returns `x_logits` for the Bernoulli likelihood,
    `(x_loc, x_scale)` for the others, `(logits, x_loc, x_scale)` (each (..., C, H, W, K)) for a
    mixture of K discretized logistics. The Gaussian's mean is a sigmoid, inside (0, 1) like the
    dequantized data; the logit-space Gaussian's and the logistic's loc are unbounded (the
    logistic's end bins take the tails: loc < 0 puts the mass on level 0). The scale is kept above
    `min_scale`; `squeeze` is the logit transform's lambda, logit(lambda + (1 - 2 lambda) x).
    Hidden layers use ELU (smooth, so no unit is ever switched off for good). `residual_blocks`
    = R adds R `ResidualBlock`s at each resolution below the output's, as in the encoder (R = 0:
    the plain network, with the same parameter names).
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        latent_dim: int,
        channels: list[int],
        hidden_dim: int,
        likelihood: str = "bernoulli",
        scale: str = "pixel",
        min_scale: float = 1e-3,
        fixed_scale: float = 0.1,
        squeeze: float = 1e-3,
        components: int = 1,
        residual_blocks: int = 0,
    ) -> None:
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"model.likelihood={likelihood!r}: choose one of {LIKELIHOODS}")
        if scale not in SCALES:
            raise ValueError(f"model.scale={scale!r}: choose one of {SCALES}")
        if components > 1 and (likelihood != "discretized_logistic" or scale != "pixel"):
            raise ValueError(f"model.components={components}: a mixture needs model.likelihood=discretized_logistic "
                             f"and model.scale=pixel (not {likelihood}, {scale})")
        check_image_shape(image_shape, channels)
        image_channels, height, width = image_shape
        downsample = 2 ** len(channels)
        feature_shape = (channels[-1], height // downsample, width // downsample)
        self.image_shape = tuple(image_shape)
        self.latent_dim = latent_dim
        self.likelihood = likelihood
        self.scale = None if likelihood == "bernoulli" else scale
        self.min_scale = min_scale
        self.fixed_scale = fixed_scale
        self.squeeze = squeeze
        self.components = components
        if self.scale == "shared":  # one scale per colour channel, learned with the networks
            self.raw_scale = nn.Parameter(torch.zeros(image_channels, 1, 1))

        self.lift = nn.Sequential(
            nn.Linear(latent_dim, hidden_dim),
            nn.ELU(),
            nn.Linear(hidden_dim, feature_shape[0] * feature_shape[1] * feature_shape[2]),
            nn.ELU(),
            nn.Unflatten(1, feature_shape),
        )
        params_per_pixel = 2 if self.scale == "pixel" else 1  # (loc, scale) or the logits / loc alone
        if components > 1:
            params_per_pixel = 3 * components  # (weight logits, loc, scale) of each component
        widths = list(reversed(channels)) + [image_channels * params_per_pixel]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [ResidualBlock(c_in) for _ in range(residual_blocks)]  # at c_in's resolution
            layers += [nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1), nn.ELU()]
        self.upsample = nn.Sequential(*layers[:-1])  # no activation on the output

    def forward(self, t: Tensor) -> Tensor | tuple[Tensor, ...]:
        """t (..., latent_dim) -> the parameters (..., C, H, W): any leading batch dims (particles)."""
        batch_shape = t.shape[:-1]
        out = self.upsample(self.lift(t.reshape(-1, self.latent_dim)))  # (B, C * params_per_pixel, H, W)
        out = out.reshape(*batch_shape, *out.shape[1:])  # (..., C * params_per_pixel, H, W)
        if self.likelihood == "bernoulli":
            return out  # x_logits (..., C, H, W)
        if self.components > 1:  # channels ordered (3, K, C): each part (..., C, H, W, K)
            logits, x_loc, raw_scale = out.unflatten(-3, (3, self.components, -1)).movedim(-4, -1).unbind(-5)
            return logits, x_loc, self.min_scale + F.softplus(raw_scale)
        loc, raw_scale = out.chunk(2, dim=-3) if self.scale == "pixel" else (out, None)  # along the channels
        x_loc = torch.sigmoid(loc) if self.likelihood == "gaussian" else loc  # (..., C, H, W)
        if self.scale == "pixel":
            x_scale = self.min_scale + F.softplus(raw_scale)  # (..., C, H, W), > min_scale
        elif self.scale == "shared":
            x_scale = (self.min_scale + F.softplus(self.raw_scale)).expand_as(x_loc)  # (C, 1, 1) -> (..., C, H, W)
        else:
            x_scale = torch.full_like(x_loc, self.fixed_scale)
        return x_loc, x_scale


# --- The likelihoods of gray levels that Pyro does not provide ready-made ------------------------
#
# The discretized logistic of 8-bit pixels (Salimans et al. 2017, PixelCNN++): each pixel is one of
# the 256 levels 0, 1/255, ..., 1, with the mass a logistic(loc, scale) puts on the level's bin,
#     P(x = k/255) = F(k/255 + 1/510) - F(k/255 - 1/510)     F the logistic CDF, 0 < k < 255,
#     P(x = 0) = F(1/510),  P(x = 1) = 1 - F(1 - 1/510)      the end bins take the tails,
# so the 256 masses sum to one and -log2 P / D is the data's bits per dimension, exactly.
# The logit-space Gaussian of dequantized pixels is Pyro's TransformedDistribution of a Normal.

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


def logit_gaussian(y_loc: Tensor, y_scale: Tensor, squeeze: float) -> dist.TorchDistribution:
    """x in (0, 1) with y = logit(squeeze + (1 - 2 squeeze) x) ~ N(y_loc, y_scale^2): the logit transform
    of density models of images (Dinh et al. 2017, RealNVP). `log_prob(x)` counts the transform's
    Jacobian, log |dy/dx|, so it is a density of x and gives bits/dim like the plain Gaussian."""
    to_unit = transforms.AffineTransform(-squeeze / (1 - 2 * squeeze), 1 / (1 - 2 * squeeze))  # u -> x
    return dist.TransformedDistribution(dist.Normal(y_loc, y_scale), [transforms.SigmoidTransform(), to_unit])


def logit_gaussian_mean(y_loc: Tensor, y_scale: Tensor, squeeze: float, nodes: int = 32) -> Tensor:
    """E[x] of `logit_gaussian` by Gauss-Hermite quadrature over y (exact to float precision at 32 nodes
    for the scales a decoder outputs)."""
    z, weights = np.polynomial.hermite_e.hermegauss(nodes)  # for the weight exp(-z^2 / 2)
    z = torch.as_tensor(z, dtype=y_loc.dtype, device=y_loc.device)
    weights = torch.as_tensor(weights / weights.sum(), dtype=y_loc.dtype, device=y_loc.device)
    u = torch.sigmoid(y_loc.unsqueeze(-1) + y_scale.unsqueeze(-1) * z)  # (..., nodes)
    return ((u * weights).sum(-1) - squeeze) / (1 - 2 * squeeze)


def prior(num_images: int, latent_dim: int, like: Tensor) -> dist.Distribution:
    """p(t) = N(0, I) for each of `num_images` images, batch (num_images,), event (latent_dim,),
    on the device and in the dtype of the tensor `like`."""
    t_loc = like.new_zeros(num_images, latent_dim)  # (B, latent_dim)
    t_scale = like.new_ones(num_images, latent_dim)  # (B, latent_dim)
    return dist.Normal(t_loc, t_scale).to_event(1)


def likelihood(decoder: Decoder, t: Tensor) -> dist.Distribution:
    """p(x|t) as one distribution per image, its event the whole (C, H, W) image."""
    if decoder.likelihood == "bernoulli":
        x_logits = decoder(t)
        return dist.Bernoulli(logits=x_logits).to_event(3)
    params = decoder(t)  # (x_loc, x_scale), or (logits, x_loc, x_scale) of a mixture
    if decoder.likelihood == "gaussian":
        return dist.Normal(*params).to_event(3)
    if decoder.likelihood == "logit_gaussian":
        return logit_gaussian(*params, decoder.squeeze).to_event(3)  # with the transform's Jacobian
    if len(params) == 3:
        return DiscretizedLogisticMixture(*params).to_event(3)
    return DiscretizedLogistic(*params).to_event(3)


def mean_image(decoder: Decoder, t: Tensor) -> Tensor:
    """E[x|t] (B, C, H, W): the Bernoulli probabilities, the Gaussian mean, the logit-space
    Gaussian's mean (by quadrature) or the discretized logistic's mean over its levels, for pictures."""
    if decoder.likelihood == "bernoulli":
        return torch.sigmoid(decoder(t))
    if decoder.likelihood == "gaussian":
        return decoder(t)[0]  # x_loc
    if decoder.likelihood == "logit_gaussian":
        return logit_gaussian_mean(*decoder(t), decoder.squeeze)
    return likelihood(decoder, t).base_dist.mean


def model(x: Tensor, index: Tensor, decoder: Decoder, num_data: int, mask: Tensor | None = None,
          kl_weight: float = 1.0) -> None:
    """p(x, t) = p(x|t) p(t) for the minibatch `x` (B, C, H, W) at positions `index` (B,).

    The plate spans the whole dataset of `num_data` images and is told which of them this
    minibatch holds, so Pyro scales every image's log-density by num_data / B and the minibatch
    ELBO is an unbiased estimate of the full-data ELBO.

    `mask` (B, C, H, W) bool, True where a pixel is observed: the site "x" then scores only
    the observed pixels, log p(x_obs|t) = sum_{observed} log p(x_pixel|t); a missing pixel
    contributes log 1 = 0 whatever value `x` holds there.

    `kl_weight` = beta scales log p(t) here and log q(t|x) in `guide` alike, so the objective is
    E_q[log p(x|t)] - beta KL(q || p): the KL warm-up of `trainer.kl_warmup_epochs` (beta rising
    linearly to 1, from 1 / its steps: poutine.scale needs beta > 0); beta = 1 is the ELBO.
    """
    pyro.module("decoder", decoder)
    with pyro.plate("data", size=num_data, subsample=index):
        with poutine.scale(scale=kl_weight):
            t = pyro.sample("t", prior(x.shape[0], decoder.latent_dim, like=x))  # log p(t), times beta
        p_x = likelihood(decoder, t)  # p(x|t), event (C, H, W)
        if mask is not None:  # mask the pixels, inside the image event
            p_x = p_x.base_dist.mask(mask).to_event(p_x.reinterpreted_batch_ndims)
        pyro.sample("x", p_x, obs=x)  # log p(x|t), or log p(x_obs|t) under the mask


def log_joint(x: Tensor, t: Tensor, decoder: Decoder, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(log p(x|t), log p(t)), each (B,), read off `model` with the latent site fixed to t (B, latent_dim).

    The plate spans just these B images (scale 1). Under `mask` (True = observed) the first term is
    log p(x_obs|t): the missing pixels add nothing.
    """
    index = torch.arange(x.shape[0], device=x.device)
    trace = poutine.trace(poutine.condition(model, data={"t": t})).get_trace(x, index, decoder, x.shape[0], mask=mask)
    return trace.nodes["x"]["fn"].log_prob(x), trace.nodes["t"]["fn"].log_prob(t)  # log p(x|t), log p(t)
