"""The generative model p(x, t) = p(x|t) p(t).

    p(t)   = N(0, I)                                            the prior over the latent code t
    p(x|t) = prod_pixels Bernoulli(x | sigmoid(x_logits(t)))                   (binarized images)
           or prod_pixels N(x | x_loc(t), x_scale(t)^2)     (dequantized images: the lecture's Gaussian,
                                                             its mean and diagonal scale from the network)

`Decoder` maps t to p(x|t): its layers give the likelihood's parameters per pixel, its `likelihood`
turns them into the distribution, and it holds the `prior` it decodes from. `model` is the Pyro program
that samples t from the prior and scores the observed image (vae/elbo.py reads log p(x|t) and log p(t)
off it for a given t). Likelihoods and priors beyond the lecture's are extensions, picked by the config
groups `likelihood=` and `prior=` (vae/likelihoods.py, vae/priors.py).
"""
from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from torch import Tensor, nn
from torch.nn import functional as F


# --- p(t): the lecture's prior, and the interface every prior keeps -------------------------------

class Prior(nn.Module):
    """p(t) over `latent_dim` dimensions. Every prior (here and in vae/priors.py) has
        forward(num_images, like)   p(t) for each image, batch (num_images,), event (latent_dim,), on the
                                    device and in the dtype of the tensor `like`; a prior with latents of
                                    its own samples them here, in `model` (vae/hierarchy.py: t2, then p(t|t2))
        draw(num, generator)        num draws t ~ p(t) (num, latent_dim) from a seeded CPU generator"""

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim


class StandardNormal(Prior):
    """p(t) = N(0, I): the lecture's prior, with no parameters."""

    def forward(self, num_images: int, like: Tensor) -> dist.Distribution:
        t_loc = like.new_zeros(num_images, self.latent_dim)  # (B, latent_dim)
        t_scale = like.new_ones(num_images, self.latent_dim)  # (B, latent_dim)
        return dist.Normal(t_loc, t_scale).to_event(1)

    def draw(self, num: int, generator: torch.Generator) -> Tensor:
        return torch.randn(num, self.latent_dim, generator=generator)


# --- p(x|t) per pixel: the lecture's two likelihoods, and the interface every likelihood keeps ---

class Likelihood(nn.Module):
    """The distribution of each pixel given the decoder's output. Every likelihood (here and in
    vae/likelihoods.py) has, for images of `image_channels` channels:
        params_per_pixel    how many outputs per pixel and channel the decoder gives it
        forward(out)        out (..., C * params_per_pixel, H, W) -> one distribution per pixel, batch (..., C, H, W)
        observe(images)     intensities in [0, 1] (N, C, H, W) -> the observations it scores
        log_bin_width       each pixel's log p(x) plus this bounds the log-probability of its 8-bit level
                            (bits/dim); None where the observations are not those levels
        min_scale           the floor of a learned scale; None where there is no scale
        learned_scale(p)    the per-pixel scale the network learns (floored at `min_scale`), else None"""

    params_per_pixel = 1
    log_bin_width: float | None = None
    min_scale: float | None = None

    def observe(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    def learned_scale(self, p_x: dist.Distribution) -> Tensor | None:
        return None


class Bernoulli(Likelihood):
    """p(x|t) = prod_pixels Bernoulli(x | sigmoid(x_logits)): one logit per pixel, for binarized images."""

    def __init__(self, image_channels: int = 1) -> None:
        super().__init__()
        if image_channels != 1:
            raise ValueError(f"likelihood=bernoulli with {image_channels}-channel images: binarizing colour is no "
                             "model of them; use likelihood=discretized_logistic or gaussian")

    def forward(self, x_logits: Tensor) -> dist.Bernoulli:
        return dist.Bernoulli(logits=x_logits)

    def observe(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Dynamic binarization: x ~ Bernoulli(intensity), a fresh draw every epoch."""
        return torch.bernoulli(images, generator=generator)


class Gaussian(Likelihood):
    """p(x|t) = prod_pixels N(x | x_loc, x_scale^2), the mean and the diagonal scale both from the
    network: x_loc = sigmoid(.) inside (0, 1) like the dequantized data, x_scale = min_scale +
    softplus(.) kept above `min_scale`. It is a density of dequantized pixels x = (level + u) / 256,
    so log p(x) - log 256 per pixel bounds the 8-bit level's log-probability (Theis et al. 2016)."""

    params_per_pixel = 2  # x_loc and x_scale
    log_bin_width = -math.log(256)

    def __init__(self, image_channels: int = 1, min_scale: float = 1e-3) -> None:
        super().__init__()
        check_positive("min_scale", min_scale)
        self.min_scale = min_scale

    def forward(self, out: Tensor) -> dist.Normal:
        loc, raw_scale = out.chunk(2, dim=-3)  # along the channels: (..., C, H, W) each
        return dist.Normal(torch.sigmoid(loc), self.min_scale + F.softplus(raw_scale))

    def observe(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return dequantize(images, generator)

    def learned_scale(self, p_x: dist.Normal) -> Tensor:
        return p_x.scale


def check_positive(key: str, value: object) -> None:
    """A likelihood's scale option `key` must be a finite number > 0 (vae/likelihoods.py checks its own with it)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"likelihood.{key}={value!r}: must be a finite number > 0")


def dequantize(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Uniform dequantization of 8-bit intensities: x = (level + u) / 256 in [0, 1), u ~ U[0, 1),
    a fresh u every epoch."""
    noise = torch.rand(images.shape, generator=generator, device=images.device)
    return (images * 255 + noise) / 256


# --- The decoder and the model ---------------------------------------------------------------------

class Decoder(nn.Module):
    """t (..., latent_dim) -> p(x|t) over images of `image_shape` (C, H, W), one distribution per image.

    A dense layer lifts t to a small feature map; each transposed convolution doubles its height and
    width, mirroring the encoder, to `likelihood.params_per_pixel` outputs per pixel and channel, which
    `likelihood` turns into each pixel's distribution. ELU activations (smooth: no unit is switched off
    for good). `prior` is p(t) (N(0, I) by default), trained with the decoder if it has parameters.
    `at_resolution(c)` gives layers to add before each transposed convolution, at width c: none here
    (vae/resnet.py adds residual blocks)."""

    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int, channels: list[int], hidden_dim: int,
                 likelihood: Likelihood, prior: Prior | None = None) -> None:
        super().__init__()
        check_image_shape(image_shape, channels)
        image_channels, height, width = image_shape
        feature_shape = (channels[-1], height // 2 ** len(channels), width // 2 ** len(channels))
        self.image_shape, self.latent_dim, self.likelihood = tuple(image_shape), latent_dim, likelihood
        self.prior = prior if prior is not None else StandardNormal(latent_dim)
        self.lift = nn.Sequential(nn.Linear(latent_dim, hidden_dim), nn.ELU(),
                                  nn.Linear(hidden_dim, math.prod(feature_shape)), nn.ELU(), nn.Unflatten(1, feature_shape))
        widths = list(reversed(channels)) + [image_channels * likelihood.params_per_pixel]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [*self.at_resolution(c_in), nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1),
                       nn.ELU()]
        self.upsample = nn.Sequential(*layers[:-1])  # no activation on the output

    def at_resolution(self, channels: int) -> list[nn.Module]:
        return []

    def forward(self, t: Tensor) -> dist.Distribution:
        """p(x|t) for t (..., latent_dim), any leading batch dims (particles): batch (...,), event (C, H, W)."""
        batch_shape = t.shape[:-1]
        out = self.upsample(self.lift(t.reshape(-1, self.latent_dim)))  # (B, C * params_per_pixel, H, W)
        out = out.reshape(*batch_shape, *out.shape[1:])
        return self.likelihood(out).to_event(3)  # each pixel's distribution, the image one event


def model(x: Tensor, index: Tensor, decoder: Decoder, num_data: int, mask: Tensor | None = None,
          kl_weight: float = 1.0) -> None:
    """p(x, t) = p(x|t) p(t) for the minibatch `x` (B, C, H, W) at positions `index` (B,).

    The plate spans the whole dataset of `num_data` images and is told which of them this minibatch
    holds, so Pyro scales every image's log-density by num_data / B: the minibatch ELBO is an unbiased
    estimate of the full-data ELBO.
    `mask` (B, C, H, W) bool, True where a pixel is observed: site "x" then scores the observed pixels
    alone, log p(x_obs|t) = sum_{observed} log p(x_pixel|t); a missing pixel adds log 1 = 0.
    `kl_weight` = beta scales log p(t) here and log q(t|x) in `guide` alike: E_q[log p(x|t)] - beta KL(q || p),
    the KL warm-up (beta rises to 1 from 1 / its steps: poutine.scale needs beta > 0); beta = 1 is the ELBO.
    """
    pyro.module("decoder", decoder)
    with pyro.plate("data", size=num_data, subsample=index):
        with poutine.scale(scale=kl_weight):
            t = pyro.sample("t", decoder.prior(x.shape[0], like=x))  # log p(t), times beta
        p_x = decoder(t)  # p(x|t), event (C, H, W)
        if mask is not None:  # mask the pixels, inside the image event
            p_x = p_x.base_dist.mask(mask).to_event(p_x.reinterpreted_batch_ndims)
        pyro.sample("x", p_x, obs=x)  # log p(x|t), or log p(x_obs|t) under the mask


def check_image_shape(image_shape: tuple[int, int, int], channels: list[int]) -> None:
    """Each conv layer halves height and width, so both must divide by 2**len(channels) (guide.Encoder too)."""
    factor = 2 ** len(channels)
    if image_shape[1] % factor or image_shape[2] % factor:
        raise ValueError(f"image shape {tuple(image_shape)} cannot be taken by a network with {len(channels)} stride-2 "
                         f"layers (channels={list(channels)}): height and width must be divisible by {factor}")
