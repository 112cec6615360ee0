"""The amortized guide q(t|x) = N(t_loc(x), diag t_scale(x)^2).

One `Encoder` network serves every image (amortization): instead of fitting a separate
(t_loc_i, t_scale_i) for each image i, it learns the map x -> (t_loc, t_scale), so the guide
scales to any dataset size and infers t for a new image in one forward pass.

`guide` samples t and picks how Trace_ELBO differentiates the ELBO with respect to the encoder,

    ELBO = E_q[log p(x|t) + log p(t) - log q(t|x)]

  reparameterized: t = t_loc + t_scale * eps, eps ~ N(0, I); gradients flow through the sample,
                   grad ELBO = E_eps[grad (log p(x, t) - log q(t|x))]   (low variance)
  score function:  the sample is a constant; the log-derivative trick gives
                   grad ELBO = E_q[(log p(x, t) - log q(t|x)) * grad log q(t|x)]
                   (unbiased, but high variance: log p(x|t) is hundreds of nats early on)

A baseline b(x) subtracted from the score function's learning signal keeps it unbiased
(E_q[grad log q(t|x)] = 0) and cuts its variance; vae/baselines.py hands it to site "t" from outside.

The encoder's `posterior` says what q(t|x) is, given that Gaussian: the lecture's `DiagonalNormal`
is the Gaussian itself; an extension may build a richer density on it (`posterior=`: the inverse
autoregressive flows of vae/flows.py). `posterior` reads q(t|x) and one sample t ~ q(t|x) off the
guide, and `latent_point` a point t(x) for the uses that take one latent per image, for evaluation.
"""
from __future__ import annotations

from typing import Callable

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from model import check_image_shape

MIN_T_SCALE = 1e-5  # keeps log q(t|x) finite when softplus underflows


class ScoreFunctionNormal(dist.Normal):
    """A Normal that tells Pyro it cannot be reparameterized.

    Trace_ELBO then draws t without a gradient path and builds the score-function surrogate.
    The flag is a class attribute, so it survives the `expand` that `pyro.plate` performs and
    the `.to_event(1)` wrapper (the instance-level `dist.Normal(...).has_rsample_(False)` of
    pyro-ppl 1.9.2 is lost in the plate's re-expansion and then fails in `.to_event`).
    """

    has_rsample = False


class Posterior(nn.Module):
    """What q(t|x) is, given the encoder's Gaussian q_0(t|x) = N(t_loc, diag t_scale^2) and its features h.
    Every posterior (here and in vae/flows.py) has, for `latent_dim` latents and features of `context_dim`:

        forward(q_0, h)        q(t|x), batch (B,), event (latent_dim,), from q_0 (batch (B,)) and h (B, context_dim)
        point(t_0, h)          the point of q(t|x) that the point t_0 of q_0 maps to (B, latent_dim)
        above(t)               samples the latents above t from q(.|t) in `guide`: none in the lecture's model;
                               a second stochastic layer's t2 ~ q(t2|t) (vae/hierarchy.py)
        reparameterized_only   None, or why the score function cannot train it (vae/config.py refuses that)
    """

    reparameterized_only: str | None = None

    def __init__(self, latent_dim: int, context_dim: int) -> None:
        super().__init__()
        self.latent_dim, self.context_dim = latent_dim, context_dim

    def above(self, t: Tensor) -> None:
        return None


class DiagonalNormal(Posterior):
    """q(t|x) = q_0(t|x) = N(t_loc, diag t_scale^2): the lecture's posterior, with no parameters of its own."""

    def forward(self, q_0: dist.Distribution, h: Tensor) -> dist.Distribution:
        return q_0

    def point(self, t_0: Tensor, h: Tensor) -> Tensor:
        return t_0


class Encoder(nn.Module):
    """x (B, C, H, W) -> (t_loc, t_scale, h): the Gaussian of q(t|x), each (B, latent_dim), and the
    features h (B, hidden_dim) that a richer posterior reads. `posterior` builds q(t|x) from them, given
    (latent_dim, context_dim = hidden_dim): the lecture's `DiagonalNormal` by default.

    Each stride-2 convolution halves height and width; a dense layer then reads the features.
    ELU activations, as in the decoder. `at_resolution(c)` gives the layers added after each
    convolution, at its resolution and width c: none here; vae/resnet.py adds residual blocks.
    """

    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int, channels: list[int], hidden_dim: int,
                 posterior: Callable[..., Posterior] = DiagonalNormal) -> None:
        super().__init__()
        check_image_shape(image_shape, channels)
        image_channels, height, width = image_shape
        downsample = 2 ** len(channels)
        widths = [image_channels] + list(channels)
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1), nn.ELU(), *self.at_resolution(c_out)]
        feature_dim = channels[-1] * (height // downsample) * (width // downsample)
        self.features = nn.Sequential(
            *layers, nn.Flatten(), nn.Linear(feature_dim, hidden_dim), nn.ELU()
        )
        self.t_loc = nn.Linear(hidden_dim, latent_dim)
        self.t_scale = nn.Linear(hidden_dim, latent_dim)
        self.posterior = posterior(latent_dim=latent_dim, context_dim=hidden_dim)  # built last: the layers' init stays

    def at_resolution(self, channels: int) -> list[nn.Module]:
        return []

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = self.features(x)  # (B, hidden_dim)
        t_loc = self.t_loc(h)  # (B, latent_dim)
        t_scale = MIN_T_SCALE + F.softplus(self.t_scale(h))  # (B, latent_dim), > 0
        return t_loc, t_scale, h


def guide(
    x: Tensor,
    index: Tensor,
    encoder: Encoder,
    num_data: int,
    reparameterized: bool = True,
    kl_weight: float = 1.0,
) -> None:
    """q(t|x) for the minibatch `x` (B, C, H, W) at positions `index` (B,) of `num_data` images.

    Same plate ("data") and latent site ("t") as `model`, so Pyro pairs them in the ELBO.
    `kl_weight` scales log q(t|x) as `model` scales log p(t) (the KL warm-up; 1 is the ELBO).
    """
    pyro.module("encoder", encoder)
    with pyro.plate("data", size=num_data, subsample=index):
        t_loc, t_scale, h = encoder(x)  # (B, latent_dim) each; the features h (B, hidden_dim)
        if reparameterized:
            q_t = dist.Normal(t_loc, t_scale).to_event(1)  # t = t_loc + t_scale * eps
        else:
            q_t = ScoreFunctionNormal(t_loc, t_scale).to_event(1)  # E_q[(log p - log q) * grad log q]
        with poutine.scale(scale=kl_weight):
            t = pyro.sample("t", encoder.posterior(q_t, h))  # log q(t|x), times beta
            encoder.posterior.above(t)  # the latents above t, if any: log q(t2|t) (vae/hierarchy.py)


def posterior(x: Tensor, encoder: Encoder) -> tuple[dist.Distribution, Tensor]:
    """(q(t|x), one sample t ~ q(t|x)) for the images x (B, C, H, W), read off `guide`.

    The distribution has batch (B,) and event (latent_dim,); the sample is (B, latent_dim).
    The plate spans just these B images (scale 1).
    """
    index = torch.arange(x.shape[0], device=x.device)
    site = poutine.trace(guide).get_trace(x, index, encoder, x.shape[0]).nodes["t"]
    return site["fn"], site["value"]  # q(t|x), t


@torch.no_grad()
def latent_point(x: Tensor, encoder: Encoder) -> Tensor:
    """One latent point per image (B, latent_dim), for the uses that take one (reconstructions,
    interpolations, the linear probe): t_loc(x), the mean of the Gaussian q(t|x); with a richer
    posterior, the point t_loc maps to (a central point of q, not necessarily its mean)."""
    t_loc, _, h = encoder(x)
    return encoder.posterior.point(t_loc, h)
