"""The generative model p(x, t) = p(x|t) p(t).

    p(t)   = N(0, I)                                   the prior over the latent code t
    p(x|t) = prod_pixels Bernoulli(x | sigmoid(x_logits(t)))          (binarized images)
           or prod_pixels N(x | x_loc(t), x_scale(t)^2)            (dequantized images)

`Decoder` is the network that maps t to the likelihood's parameters; it never samples.
`model` is the Pyro program that samples t from the prior and scores the observed image;
`log_joint` reads log p(x|t) and log p(t) off that same program for a given t (evaluation).
"""
from __future__ import annotations

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from torch import Tensor, nn
from torch.nn import functional as F

LIKELIHOODS = ("bernoulli", "gaussian")


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


class Decoder(nn.Module):
    """t (..., latent_dim) -> parameters of p(x|t) over images of `image_shape` (C, H, W).

    A dense layer lifts t to a small feature map; each transposed convolution doubles its
    height and width, mirroring the encoder. Returns `x_logits` for the Bernoulli likelihood,
    `(x_loc, x_scale)` for the Gaussian one, where the network outputs the per-pixel scale too
    (the diagonal covariance of the original derivation), kept above `min_scale`. Hidden layers
    use ELU (smooth, so no unit is ever switched off for good).
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        latent_dim: int,
        channels: list[int],
        hidden_dim: int,
        likelihood: str = "bernoulli",
        min_scale: float = 1e-3,
    ) -> None:
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"model.likelihood={likelihood!r}: choose one of {LIKELIHOODS}")
        check_image_shape(image_shape, channels)
        image_channels, height, width = image_shape
        downsample = 2 ** len(channels)
        feature_shape = (channels[-1], height // downsample, width // downsample)
        self.image_shape = tuple(image_shape)
        self.latent_dim = latent_dim
        self.likelihood = likelihood
        self.min_scale = min_scale

        self.lift = nn.Sequential(
            nn.Linear(latent_dim, hidden_dim),
            nn.ELU(),
            nn.Linear(hidden_dim, feature_shape[0] * feature_shape[1] * feature_shape[2]),
            nn.ELU(),
            nn.Unflatten(1, feature_shape),
        )
        params_per_pixel = 1 if likelihood == "bernoulli" else 2
        widths = list(reversed(channels)) + [image_channels * params_per_pixel]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1), nn.ELU()]
        self.upsample = nn.Sequential(*layers[:-1])  # no activation on the output

    def forward(self, t: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """t (..., latent_dim) -> the parameters (..., C, H, W): any leading batch dims (particles)."""
        batch_shape = t.shape[:-1]
        out = self.upsample(self.lift(t.reshape(-1, self.latent_dim)))  # (B, C * params_per_pixel, H, W)
        out = out.reshape(*batch_shape, *out.shape[1:])  # (..., C * params_per_pixel, H, W)
        if self.likelihood == "bernoulli":
            return out  # x_logits (..., C, H, W)
        loc, raw_scale = out.chunk(2, dim=-3)  # along the channels
        x_loc = torch.sigmoid(loc)  # (..., C, H, W), in (0, 1) like the data
        x_scale = self.min_scale + F.softplus(raw_scale)  # (..., C, H, W), > min_scale
        return x_loc, x_scale


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
    x_loc, x_scale = decoder(t)
    return dist.Normal(x_loc, x_scale).to_event(3)


def mean_image(decoder: Decoder, t: Tensor) -> Tensor:
    """E[x|t] (B, C, H, W): the Bernoulli probabilities or the Gaussian mean, for pictures."""
    if decoder.likelihood == "bernoulli":
        return torch.sigmoid(decoder(t))
    x_loc, _ = decoder(t)
    return x_loc


def model(x: Tensor, index: Tensor, decoder: Decoder, num_data: int, mask: Tensor | None = None) -> None:
    """p(x, t) = p(x|t) p(t) for the minibatch `x` (B, C, H, W) at positions `index` (B,).

    The plate spans the whole dataset of `num_data` images and is told which of them this
    minibatch holds, so Pyro scales every image's log-density by num_data / B and the minibatch
    ELBO is an unbiased estimate of the full-data ELBO.

    `mask` (B, C, H, W) bool, True where a pixel is observed: the site "x" then scores only
    the observed pixels, log p(x_obs|t) = sum_{observed} log p(x_pixel|t); a missing pixel
    contributes log 1 = 0 whatever value `x` holds there.
    """
    pyro.module("decoder", decoder)
    with pyro.plate("data", size=num_data, subsample=index):
        t = pyro.sample("t", prior(x.shape[0], decoder.latent_dim, like=x))  # log p(t)
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
