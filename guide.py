"""The amortized guide q(t|x) = N(t_loc(x), diag t_scale(x)^2), optionally followed by flows.

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

With `model.flows` = F > 0 the Gaussian is only the start (Kingma et al. 2016, inverse
autoregressive flow): t_0 ~ N(t_loc, diag t_scale^2), then t_f = f_f(t_{f-1}; h), f = 1..F, each
the gated affine map t_f,d = s_d * t_{f-1,d} + (1 - s_d) * m_d, where (m_d, logit s_d) come from a
MADE network that reads t_{f-1,<d} (autoregressive) and the encoder's features h, so

    log q(t_F|x) = log N(t_0; t_loc, diag t_scale^2) - sum_f sum_d log s_d       (change of variables)

Sampling is one network pass per flow, and so is log q of a sample just drawn (Pyro's transforms
cache t_{f-1}); log q of any other t inverts the flows, one pass per dimension. The flows need the
reparameterized estimators (vae/config.py refuses the score function: its surrogate would read
the cached inverse as a constant).

`posterior` reads q(t|x) and one sample t ~ q(t|x) off that same program, and `latent_point` a point
t(x) for the uses that take one latent per image, for evaluation.
"""
from __future__ import annotations

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions.transforms import ConditionalAffineAutoregressive
from pyro.nn import ConditionalAutoRegressiveNN
from torch import Tensor, nn
from torch.nn import functional as F

from model import ResidualBlock, check_image_shape

MIN_T_SCALE = 1e-5  # keeps log q(t|x) finite when softplus underflows


class ScoreFunctionNormal(dist.Normal):
    """A Normal that tells Pyro it cannot be reparameterized.

    Trace_ELBO then draws t without a gradient path and builds the score-function surrogate.
    The flag is a class attribute, so it survives the `expand` that `pyro.plate` performs and
    the `.to_event(1)` wrapper (the instance-level `dist.Normal(...).has_rsample_(False)` of
    pyro-ppl 1.9.2 is lost in the plate's re-expansion and then fails in `.to_event`).
    """

    has_rsample = False


class Encoder(nn.Module):
    """x (B, C, H, W) -> (t_loc, t_scale, h): the Gaussian of q(t|x), each (B, latent_dim), and the
    features h (B, hidden_dim) that the `flows` (F conditional IAF steps; none by default) read.

    Each stride-2 convolution halves height and width; a dense layer then reads the features.
    ELU activations, as in the decoder. The flows' MADE networks have `flow_hidden_dims` hidden
    units and a fixed order of the latent dimensions, reversed from one flow to the next, so the
    same config always builds the same masks (they are buffers, not trained parameters).
    `residual_blocks` = R adds R `ResidualBlock`s (model.py) after each convolution, at its
    resolution (R = 0: the plain network, with the same parameter names).
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        latent_dim: int,
        channels: list[int],
        hidden_dim: int,
        flows: int = 0,
        flow_hidden_dims: list[int] | None = None,
        residual_blocks: int = 0,
    ) -> None:
        super().__init__()
        check_image_shape(image_shape, channels)
        image_channels, height, width = image_shape
        downsample = 2 ** len(channels)
        widths = [image_channels] + list(channels)
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1), nn.ELU()]
            layers += [ResidualBlock(c_out) for _ in range(residual_blocks)]
        feature_dim = channels[-1] * (height // downsample) * (width // downsample)
        self.features = nn.Sequential(
            *layers, nn.Flatten(), nn.Linear(feature_dim, hidden_dim), nn.ELU()
        )
        self.t_loc = nn.Linear(hidden_dim, latent_dim)
        self.t_scale = nn.Linear(hidden_dim, latent_dim)
        order = torch.arange(latent_dim)
        self.flows = nn.ModuleList(
            ConditionalAffineAutoregressive(  # Kingma et al.'s gated ("stable") update
                ConditionalAutoRegressiveNN(latent_dim, hidden_dim, list(flow_hidden_dims or [hidden_dim, hidden_dim]),
                                            permutation=order if f % 2 == 0 else order.flip(0)),
                stable=True)
            for f in range(flows)
        )

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
        if len(encoder.flows):  # t = f_F(...f_1(t_0; h)...; h), log q(t|x) by the change of variables
            q_t = dist.TransformedDistribution(q_t, [flow.condition(h) for flow in encoder.flows])
        with poutine.scale(scale=kl_weight):
            pyro.sample("t", q_t)  # log q(t|x), times beta


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
    interpolations, the linear probe): t_loc(x), the mean of the Gaussian q(t|x); with flows, the
    flows' image of it, f_F(...f_1(t_loc; h)...; h) (a central point of q, not its mean)."""
    t_loc, _, h = encoder(x)
    return through_flows(t_loc, h, encoder)


def through_flows(t: Tensor, h: Tensor, encoder: Encoder) -> Tensor:
    """f_F(...f_1(t; h)...; h) (B, latent_dim): the encoder's flows applied to t (B, latent_dim) with
    the features h of the same images; t itself when there are none."""
    for flow in encoder.flows:
        t = flow.condition(h)(t)
    return t
