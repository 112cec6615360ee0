"""The doubly reparameterized gradient (DReG) of the importance-weighted bound (Tucker, Lawson, Gu &
Maddison, "Doubly Reparameterized Gradient Estimators for Monte Carlo Objectives", ICLR 2019).

The objective is IWAE_ELBO's (vae/iwae.py), per image x with K particles t_k = t(eps_k; phi) ~ q_phi(t|x):

    log w_k = log p_theta(x, t_k) - log q_phi(t_k|x),   w~_k = w_k / sum_j w_j   (normalized weights)
    L_K(x)  = log (1/K) sum_k w_k,   on a minibatch (N/B) sum_i L_K(x_i)

and so is the loss value. Only the gradient differs:

    decoder (model parameters theta):  sum_k w~_k  d log p_theta(x, t_k) / d theta       (IWAE's, unchanged)
    encoder (guide parameters phi):    sum_k w~_k^2 [d log w_k / d t_k] d t_k / d phi    (DReG)

where d log w_k / d t_k is taken with phi held fixed inside q (only the path through the sample). IWAE's
encoder gradient sum_k w~_k [d log w_k/d t_k dt_k/dphi - d log q_phi(t_k|x)/d phi] has the same
expectation (the score term is rewritten by a second reparameterization), but its signal-to-noise ratio
falls like 1/sqrt(K) while DReG's does not. At K = 1 DReG is the path-derivative ("sticking the
landing") gradient of the ELBO (Roeder et al. 2017).

One surrogate gives both gradients (one forward, one backward): with sg() the stop-gradient,

    S = (N/B) sum_i sum_k sg(w~_ik) [log p_theta(x_i, t_ik) - log q_sg(phi)(t_ik|x_i)]

where log q is re-scored under the guide site's Normal with its loc and scale detached (the path through
the sample t_ik kept), and a gradient hook on each guide sample t_ik multiplies the gradient reaching it by
sg(w~_ik): theta sees sg(w~) d log p / d theta, phi sees sg(w~) * w~ * d log w / dt * dt/dphi. The loss is
-(bound + S - sg(S)): the bound's value, S's gradient; `differentiable_loss` and `loss_and_grads` both.

It needs a reparameterized guide whose every latent site is a diagonal Gaussian, Independent(Normal)
(guide.py with posterior=gaussian). Any other site (a flow posterior, posterior=iaf, whose log q under
detached parameters would need the flow's inverse) is refused with one line before any work (`refuses`,
which vae/config.py asks), and at the first step if it comes anyway; a score-function guide is refused by
vae/config.py's check_estimator, as for IWAE_ELBO.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from omegaconf import DictConfig
from torch import Tensor
from torch.distributions import Independent, Normal

from guide import DiagonalNormal
from vae.iwae import IWAE_ELBO
from vae.rules import targets


def detached_log_prob(site: dict) -> Tensor:
    """log q(value) of a guide site under its own Independent(Normal) with loc and scale detached: the
    gradient reaches the guide's parameters only through the sample `value`. One line for any other site."""
    from vae.config import ConfigError  # here: vae/config.py may import this module

    fn = site["fn"]
    if not (isinstance(fn, Independent) and isinstance(fn.base_dist, Normal)):
        raise ConfigError(f"DReG_ELBO: guide site {site['name']!r} is {type(fn).__name__}, not a diagonal Gaussian "
                          "(Independent Normal): its log q under detached parameters is not written here; use "
                          "posterior=gaussian, or estimator=iwae with this posterior")
    if not fn.has_rsample:
        raise ConfigError(f"DReG_ELBO: guide site {site['name']!r} is not reparameterized; DReG differentiates "
                          "through the samples (estimator.reparameterized=true)")
    base = fn.base_dist
    return Independent(Normal(base.loc.detach(), base.scale.detach()), fn.reinterpreted_batch_ndims).log_prob(site["value"])


class DReG_ELBO(IWAE_ELBO):
    """The per-image importance-weighted bound with `num_particles` = K samples per image, its encoder
    gradient by DReG (its decoder gradient and its value are IWAE_ELBO's)."""

    @classmethod
    def refuses(cls, cfg: DictConfig) -> str | None:
        """Why this objective cannot train `cfg` (vae/config.py asks before any work), else None."""
        if targets(cfg, "posterior", DiagonalNormal):
            return None
        return (f"posterior._target_={cfg.posterior._target_} with estimator.elbo._target_=vae.dreg.DReG_ELBO: DReG "
                "re-scores log q(t|x) under the guide's Gaussian with its parameters detached; use posterior=gaussian, "
                "or estimator=iwae with this posterior")

    def bound(self, model: Callable, guide: Callable, *args, **kwargs) -> Tensor:
        """(N/B) sum_i L_K(x_i) in value; its gradient IWAE's for the model's parameters, DReG's for the guide's."""
        ((model_trace, guide_trace),) = self._get_traces(model, guide, args, kwargs)  # K particles at once
        scales = set()

        def unscaled(site: dict, log_prob: Tensor) -> Tensor:  # a site's (K, B) log-density, the plate's N/B out
            scale = float(site["scale"])
            scales.add(scale)
            return log_prob / scale

        latents = [s for s in guide_trace.nodes.values() if s["type"] == "sample" and not s["is_observed"]]
        log_p = sum(unscaled(s, s["log_prob"]) for s in model_trace.nodes.values() if s["type"] == "sample")
        log_q = sum(unscaled(s, s["log_prob"]) for s in guide_trace.nodes.values() if s["type"] == "sample")
        log_q_sg = sum(detached_log_prob(s) for s in latents)  # log q_sg(phi)(t_k|x)
        if len(scales) != 1:
            raise ValueError(f"DReG_ELBO needs every sample site in one subsampled plate, one scale; got {sorted(scales)}")
        scale = scales.pop()
        shape = log_p.shape  # (K, B), or (B,) for K=1: Pyro adds no particle dim then
        log_w = (log_p - log_q).reshape(self.num_particles, -1)  # (K, B)
        bound = scale * (torch.logsumexp(log_w, dim=0) - math.log(self.num_particles)).sum()  # IWAE_ELBO's value
        if not torch.is_grad_enabled():
            return bound
        w_tilde = torch.softmax(log_w.detach(), dim=0).reshape(shape)  # sg(w~_k), per image
        for site in latents:  # the gradient reaching each sample t_k, times sg(w~_k): w~_k^2 for the guide
            value = site["value"]
            if value.requires_grad:
                factor = w_tilde.reshape(w_tilde.shape + (1,) * (value.dim() - w_tilde.dim()))
                value.register_hook(lambda grad, factor=factor: grad * factor)
        surrogate = scale * (w_tilde * (log_p - log_q_sg)).sum()
        return bound.detach() + surrogate - surrogate.detach()
