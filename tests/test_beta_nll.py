"""The beta-NLL (vae/beta_nll.py), an objective added beside the model: each Gaussian pixel's
log-density weighed by its held-fixed scale^(2 beta) (or its mean's gradient alone), applied to the
model's site "x" by an effect handler in training, never in evaluation."""
from __future__ import annotations

import math

import pyro.poutine as poutine
import pytest
import torch

from conftest import FAST, compose_config
from guide import Encoder
from model import Bernoulli, Decoder, Gaussian, model
from train import train
from vae.beta_nll import BetaNLL, beta_nll, weighs
from vae.build import build_likelihood, build_svi
from vae.config import ConfigError, check_config
from vae.logbook import read_metrics


def test_beta_nll_weighs_each_pixel_by_its_scale_and_keeps_the_elbo_total():
    torch.manual_seed(0)
    loc = torch.rand(3, 1, 4, 4, requires_grad=True)
    scale = (0.001 + torch.rand(3, 1, 4, 4)).requires_grad_()
    x = torch.rand(3, 1, 4, 4)
    for beta in (0.5, 1.0):
        weighted = BetaNLL(torch.distributions.Normal(loc, scale), beta, event_dims=3)
        weight = scale.detach() ** (2 * beta)
        weight = weight / weight.mean(dim=(-3, -2, -1), keepdim=True)
        torch.testing.assert_close(weighted.weight.mean(dim=(-3, -2, -1)), torch.ones(3))  # the ELBO's total
        torch.testing.assert_close(weighted.log_prob(x), weight * torch.distributions.Normal(loc, scale).log_prob(x))
        grad_loc, = torch.autograd.grad(weighted.log_prob(x).sum(), loc)
        torch.testing.assert_close(grad_loc, weight * (x - loc) / scale**2)  # the weight is held fixed
        if beta == 1.0:  # every pixel's error alike: (x - loc) / mean(scale^2), one factor per image
            mean_variance = (scale.detach() ** 2).mean(dim=(-3, -2, -1), keepdim=True)
            torch.testing.assert_close(grad_loc * mean_variance, (x - loc).detach())
    best = (x - loc).detach().abs().requires_grad_()  # at scale = |x - loc|, the ELBO's best scale for this mean,
    grad_at_best, = torch.autograd.grad(  # the weighted objective is flat in the scale too
        BetaNLL(torch.distributions.Normal(loc.detach(), best), 0.5, 3).log_prob(x).sum(), best)
    torch.testing.assert_close(grad_at_best, torch.zeros_like(best), atol=1e-3, rtol=0)
    one_scale = torch.full_like(x, 0.2)  # one scale for all pixels: the weight is one, the log-density the Gaussian's
    torch.testing.assert_close(BetaNLL(torch.distributions.Normal(loc, one_scale), 1.0, 3).log_prob(x),
                               torch.distributions.Normal(loc, one_scale).log_prob(x))


def test_the_beta_nll_on_the_mean_only_keeps_the_gaussians_value_and_its_scale_gradient():
    """target="loc": log_prob and d/d scale are the Gaussian's own; d/d loc is the weighed w (x - loc) / scale^2."""
    torch.manual_seed(1)
    loc = torch.rand(3, 1, 4, 4, requires_grad=True)
    scale = (0.001 + torch.rand(3, 1, 4, 4)).requires_grad_()
    x = torch.rand(3, 1, 4, 4)
    gaussian = torch.distributions.Normal(loc, scale)
    for beta in (0.25, 1.0):
        weighted = BetaNLL(gaussian, beta, event_dims=3, target="loc")
        log_p = weighted.log_prob(x)
        torch.testing.assert_close(log_p, gaussian.log_prob(x))  # the ELBO's value
        grad_loc, grad_scale = torch.autograd.grad(log_p.sum(), (loc, scale))
        elbo_loc, elbo_scale = torch.autograd.grad(gaussian.log_prob(x).sum(), (loc, scale))
        torch.testing.assert_close(grad_scale, elbo_scale)  # the scale is fitted by the ELBO itself
        torch.testing.assert_close(grad_loc, weighted.weight * elbo_loc)  # w (x - loc) / scale^2
        assert not torch.allclose(grad_loc, elbo_loc)


def test_the_handler_scores_x_by_the_beta_nll_and_leaves_t_and_the_plain_model():
    """beta_nll(model) scores x by BetaNLL and t as the model does; beta = 0 is the model itself."""
    decoder = Decoder((1, 8, 8), latent_dim=2, channels=[4], hidden_dim=8, likelihood=Gaussian(min_scale=1e-3))
    x, index, t = torch.rand(4, 1, 8, 8), torch.arange(4), torch.randn(4, 2)
    plain = poutine.trace(poutine.condition(model, data={"t": t})).get_trace(x, index, decoder, 4).nodes
    p_x = decoder(t).base_dist
    x_loc, x_scale = p_x.loc, p_x.scale
    for target in ("both", "loc"):
        weighted = poutine.trace(poutine.condition(beta_nll(model, 0.5, target), data={"t": t})).get_trace(
            x, index, decoder, 4).nodes
        torch.testing.assert_close(weighted["t"]["fn"].log_prob(t), plain["t"]["fn"].log_prob(t))
        by_hand = BetaNLL(torch.distributions.Normal(x_loc, x_scale), 0.5, 3, target).log_prob(x).sum((-3, -2, -1))
        torch.testing.assert_close(weighted["x"]["fn"].log_prob(x), by_hand)
        if target == "both":
            assert not torch.allclose(weighted["x"]["fn"].log_prob(x), plain["x"]["fn"].log_prob(x))
    assert beta_nll(model, 0.0) is model
    bernoulli = Decoder((1, 8, 8), latent_dim=2, channels=[4], hidden_dim=8, likelihood=Bernoulli())
    with pytest.raises(TypeError, match="weighs a Gaussian's pixels"):
        poutine.trace(beta_nll(model, 0.5)).get_trace(x.round(), index, bernoulli, 4)


@pytest.mark.parametrize("target", ["both", "loc"])
def test_training_with_trainer_nll_beta_steps_on_the_beta_nll(target, tmp_path):
    """build_svi hands SVI the model under the handler when trainer.nll_beta > 0: its loss is the
    beta-NLL's, not the ELBO's, on the same draw of t; a run trains on it and tests the ELBO."""
    cfg = compose_config(*FAST, "likelihood=gaussian", "trainer.nll_beta=0.5", f"trainer.nll_beta_target={target}")
    encoder = Encoder((1, 16, 16), 4, channels=[8, 16], hidden_dim=64)
    decoder = Decoder((1, 16, 16), 4, channels=[8, 16], hidden_dim=64, likelihood=build_likelihood(cfg.likelihood, 1))
    x, index = torch.rand(8, 1, 16, 16), torch.arange(8)
    svi = build_svi(cfg, encoder, decoder, 8)
    trace = poutine.trace(svi.model).get_trace(x, index)
    assert isinstance(trace.nodes["x"]["fn"].base_dist, BetaNLL)
    assert trace.nodes["x"]["fn"].base_dist.target == target
    plain = build_svi(compose_config(*FAST, "likelihood=gaussian"), encoder, decoder, 8)
    assert isinstance(poutine.trace(plain.model).get_trace(x, index).nodes["x"]["fn"].base_dist, torch.distributions.Normal)
    train(compose_config(*FAST, "likelihood=gaussian", "trainer.nll_beta=0.5", f"trainer.nll_beta_target={target}",
                         "trainer.epochs=1"), tmp_path)
    metrics = read_metrics(tmp_path)
    assert [m["epoch"] for m in metrics] == [0, 1] and math.isfinite(metrics[-1]["test_elbo"])


@pytest.mark.parametrize("override, message", [
    ("trainer.nll_beta=1.5", "trainer.nll_beta=1.5: must be a number from 0"),
    ("likelihood=discretized_logistic",
     "trainer.nll_beta=0.5 with likelihood._target_=vae.likelihoods.DiscretizedLogistic"),
    ("estimator=iwae", "trainer.nll_beta=0.5 with estimator.elbo._target_=vae.iwae"),
    ("trainer.nll_beta_target=scale", "trainer.nll_beta_target='scale': must be both"),
])
def test_bad_beta_nll_settings_stop_before_any_work(override, message):
    with pytest.raises(ConfigError, match=message):
        check_config(compose_config(*FAST, "likelihood=gaussian", "trainer.nll_beta=0.5", override))


WEIGHED = {  # likelihood overrides -> whether the beta-NLL can weigh its pixels (each a Normal)
    ("likelihood=gaussian",): True,
    ("likelihood=gaussian", "likelihood.scale=shared"): True,
    ("likelihood=gaussian", "likelihood.scale=fixed"): True,
    ("likelihood=bernoulli",): False,
    ("likelihood=logit_gaussian",): False,
    ("likelihood=discretized_logistic",): False,
    ("likelihood=discretized_logistic_mixture",): False,
}


@pytest.mark.parametrize("overrides, weighed", list(WEIGHED.items()), ids=[",".join(o) for o in WEIGHED])
def test_the_beta_nll_is_refused_for_a_likelihood_whose_pixels_it_cannot_weigh(overrides, weighed):
    """check_config asks the likelihood itself (vae.beta_nll.weighs): trainer.nll_beta > 0 passes for
    the Gaussian of every scale, and is refused for every other likelihood, in one line naming it."""
    cfg = compose_config(*FAST, *overrides, "trainer.nll_beta=0.5")
    assert weighs(build_likelihood(cfg.likelihood, 1)) is weighed
    if weighed:
        check_config(cfg)
        return
    with pytest.raises(ConfigError, match=rf"^trainer.nll_beta=0.5 with likelihood._target_={cfg.likelihood._target_}: "
                                          "the beta-NLL weighs the Gaussian's pixels") as error:
        check_config(cfg)
    assert "\n" not in str(error.value)
    check_config(compose_config(*FAST, *overrides))  # trainer.nll_beta=0: the ELBO, with any likelihood
