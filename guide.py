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

With `TraceGraph_ELBO`, `baseline` and `baseline_net` subtract a baseline b(x) from the
learning signal, which keeps the estimate unbiased (E_q[grad log q(t|x)] = 0) and cuts its
variance:  grad ELBO = E_q[(log p(x, t) - log q(t|x) - b(x)) * grad log q(t|x)]

`posterior` reads q(t|x) and one sample t ~ q(t|x) off that same program, for evaluation.
"""
from __future__ import annotations

import math
from typing import Any

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


class Encoder(nn.Module):
    """x (B, C, H, W) -> (t_loc, t_scale), each (B, latent_dim), the parameters of q(t|x).

    Each stride-2 convolution halves height and width; a dense layer then reads the features.
    ELU activations, as in the decoder.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        latent_dim: int,
        channels: list[int],
        hidden_dim: int,
    ) -> None:
        super().__init__()
        check_image_shape(image_shape, channels)
        image_channels, height, width = image_shape
        downsample = 2 ** len(channels)
        widths = [image_channels] + list(channels)
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1), nn.ELU()]
        feature_dim = channels[-1] * (height // downsample) * (width // downsample)
        self.features = nn.Sequential(
            *layers, nn.Flatten(), nn.Linear(feature_dim, hidden_dim), nn.ELU()
        )
        self.t_loc = nn.Linear(hidden_dim, latent_dim)
        self.t_scale = nn.Linear(hidden_dim, latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.features(x)  # (B, hidden_dim)
        t_loc = self.t_loc(h)  # (B, latent_dim)
        t_scale = MIN_T_SCALE + F.softplus(self.t_scale(h))  # (B, latent_dim), > 0
        return t_loc, t_scale


class BaselineNet(nn.Module):
    """x (B, C, H, W) -> b(x) (B,): an input-dependent baseline for the score function (NVIL).

    Trained jointly with the guide (TraceGraph_ELBO adds the loss (signal - baseline)^2) to
    predict each image's learning signal log p(x, t) - log q(t|x), in nats per image, left over
    after the decaying average when both are used. It never sees t, so it keeps the gradient
    unbiased. A small dense network: the baseline only has to be roughly right.
    """

    def __init__(self, image_shape: tuple[int, int, int], hidden_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(math.prod(image_shape), hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)  # b(x) (B,)


def guide(
    x: Tensor,
    index: Tensor,
    encoder: Encoder,
    num_data: int,
    reparameterized: bool = True,
    baseline: dict[str, Any] | None = None,
    baseline_net: BaselineNet | None = None,
) -> None:
    """q(t|x) for the minibatch `x` (B, C, H, W) at positions `index` (B,) of `num_data` images.

    Same plate ("data") and latent site ("t") as `model`, so Pyro pairs them in the ELBO.
    Score function only, read by TraceGraph_ELBO: `baseline` holds Pyro's baseline options for
    site "t" (e.g. `use_decaying_avg_baseline`, `baseline_beta`), and `baseline_net` adds the
    learned b(x). The learning signal of image i is then
        N/B * (log p(x_i, t_i) - log q(t_i|x_i)) - avg - N/B * b(x_i)
    (TraceGraph_ELBO's costs carry the plate's scale N/B, so b(x) is scaled alike).
    """
    pyro.module("encoder", encoder)
    options = dict(baseline or {})
    if baseline_net is not None:  # restored weights in the param store win over fresh ones
        pyro.module("baseline", baseline_net, update_module_params=True)
    with pyro.plate("data", size=num_data, subsample=index):
        t_loc, t_scale = encoder(x)  # (B, latent_dim) each
        if reparameterized:
            q_t = dist.Normal(t_loc, t_scale)  # t = t_loc + t_scale * eps
        else:
            q_t = ScoreFunctionNormal(t_loc, t_scale)  # E_q[(log p - log q) * grad log q]
        if baseline_net is not None:
            options["baseline_value"] = num_data / x.shape[0] * baseline_net(x)  # N/B * b(x) (B,)
        pyro.sample("t", q_t.to_event(1), infer={"baseline": options} if options else {})  # log q(t|x)


def posterior(x: Tensor, encoder: Encoder) -> tuple[dist.Distribution, Tensor]:
    """(q(t|x), one sample t ~ q(t|x)) for the images x (B, C, H, W), read off `guide`.

    The distribution has batch (B,) and event (latent_dim,); the sample is (B, latent_dim).
    The plate spans just these B images (scale 1).
    """
    index = torch.arange(x.shape[0], device=x.device)
    site = poutine.trace(guide).get_trace(x, index, encoder, x.shape[0]).nodes["t"]
    return site["fn"], site["value"]  # q(t|x), t
