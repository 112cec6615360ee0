"""Baselines for the score-function estimator, added to the guide from outside it.

With `TraceGraph_ELBO`, a baseline b subtracted from the learning signal keeps the gradient unbiased
(E_q[grad log q(t|x)] = 0, so E_q[b grad log q] = 0 for any b that does not depend on t) and cuts
its variance (Ranganath et al. 2014; Mnih & Gregor 2014, NVIL):

    grad ELBO = E_q[(log p(x, t) - log q(t|x) - b(x)) * grad log q(t|x)]

Pyro reads a site's baselines from its `infer={"baseline": {...}}`: `use_decaying_avg_baseline` and
`baseline_beta` (an average of past signals, `estimator.baseline`), and `baseline_value`, here the
learned b(x) of `BaselineNet` (`estimator.baseline_net`). `with_baselines(guide, ...)` hands them to
the guide's site "t" through an effect handler, so `guide.guide` stays the lecture's q(t|x). The
learning signal of image i is then N/B * (log p(x_i, t_i) - log q(t_i|x_i)) - avg - N/B * b(x_i)
(TraceGraph_ELBO's costs carry the plate's scale N/B, so b(x) is scaled alike). The leave-one-out
baseline over K particles is an ELBO of its own (vae/leave_one_out.py). docs/results.md ("The
estimators") measures each.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pyro
from pyro.poutine.messenger import Messenger
from torch import Tensor, nn


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


class BaselineMessenger(Messenger):
    """Gives the sample site `site` Pyro's baseline options `options`, and `value` as its
    `baseline_value` when given."""

    def __init__(self, options: dict[str, Any], value: Tensor | None = None, site: str = "t") -> None:
        super().__init__()
        self.options, self.value, self.site = options, value, site

    def _pyro_sample(self, msg: dict) -> None:
        if msg["name"] != self.site:
            return
        baseline = dict(self.options)
        if self.value is not None:
            baseline["baseline_value"] = self.value
        msg["infer"] = {**msg["infer"], "baseline": baseline}


def with_baselines(guide: Callable, num_data: int, options: dict[str, Any] | None = None,
                   baseline_net: BaselineNet | None = None) -> Callable:
    """`guide(x, index, ...)` with the baselines of site "t": Pyro's `options`, and N/B * b(x) of
    `baseline_net` (registered with Pyro as "baseline", trained with the guide). None: `guide` itself."""
    if not options and baseline_net is None:
        return guide

    def guide_with_baselines(x: Tensor, index: Tensor, *args: Any, **kwargs: Any) -> Any:
        value = None
        if baseline_net is not None:  # restored weights in the param store win over fresh ones
            pyro.module("baseline", baseline_net, update_module_params=True)
            value = num_data / x.shape[0] * baseline_net(x)  # N/B * b(x) (B,)
        with BaselineMessenger(dict(options or {}), value):
            return guide(x, index, *args, **kwargs)

    return guide_with_baselines
