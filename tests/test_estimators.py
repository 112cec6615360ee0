"""The two gradient estimators of the ELBO: both unbiased, the score function far noisier.

On a tiny fixed problem we draw many single-sample gradient estimates of the encoder's
parameters with each estimator. Their means must agree within Monte-Carlo error (both estimate
grad ELBO), and the score-function estimates must vary much more.
"""
from __future__ import annotations

from functools import partial

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO

from guide import Encoder, guide
from model import Decoder, model

IMAGE_SHAPE = (1, 4, 4)
NUM_SAMPLES = 1500


@pytest.fixture(scope="module")
def problem():
    pyro.set_rng_seed(1)
    encoder = Encoder(IMAGE_SHAPE, latent_dim=2, channels=[2], hidden_dim=4)
    decoder = Decoder(IMAGE_SHAPE, latent_dim=2, channels=[2], hidden_dim=4)
    x = torch.bernoulli(torch.full((3, *IMAGE_SHAPE), 0.4))
    return encoder, decoder, x


def encoder_gradients(problem, reparameterized: bool, x=None, num_samples=NUM_SAMPLES) -> torch.Tensor:
    """(num_samples, num_encoder_params): independent single-sample estimates of grad(-ELBO)."""
    encoder, decoder, x_problem = problem
    x = x_problem if x is None else x
    index = torch.arange(len(x))
    elbo = Trace_ELBO()
    model_fn = partial(model, decoder=decoder, num_data=len(x))
    guide_fn = partial(guide, encoder=encoder, num_data=len(x), reparameterized=reparameterized)
    params = list(encoder.parameters())
    samples = []
    for _ in range(num_samples):
        loss = elbo.differentiable_loss(model_fn, guide_fn, x, index)
        samples.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    return torch.stack(samples)


def z_scores(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per coordinate: (difference of means) / (its Monte-Carlo standard error).

    Coordinates that never vary (weights of units that are always off) must agree exactly."""
    standard_error = (a.var(0) / len(a) + b.var(0) / len(b)).sqrt()
    constant = standard_error == 0
    assert torch.equal(a.mean(0)[constant], b.mean(0)[constant])
    return (a.mean(0) - b.mean(0))[~constant] / standard_error[~constant]


@pytest.fixture(scope="module")
def gradient_samples(problem):
    pyro.set_rng_seed(2)
    return {"reparam": encoder_gradients(problem, True), "score": encoder_gradients(problem, False)}


def test_estimators_agree_within_monte_carlo_error(gradient_samples):
    z = z_scores(gradient_samples["reparam"], gradient_samples["score"])
    assert z.abs().max() < 4.5, z
    assert (z**2).mean() < 2.0  # about 1 when both estimate the same mean


def test_agreement_check_detects_a_different_mean(problem, gradient_samples):
    """The same check rejects estimates of a different quantity (the gradient for other images)."""
    pyro.set_rng_seed(3)
    other_x = 1 - problem[2]
    other = encoder_gradients(problem, True, x=other_x, num_samples=300)
    z = z_scores(gradient_samples["reparam"], other)
    assert z.abs().max() > 4.5


def test_score_function_variance_is_larger(gradient_samples):
    reparam_var = gradient_samples["reparam"].var(0).mean()
    score_var = gradient_samples["score"].var(0).mean()
    assert score_var > 10 * reparam_var, (score_var, reparam_var)


def test_score_mode_sends_no_gradient_through_the_sample(problem):
    """In score mode d(log p(x|t))/d(encoder) is zero: t is a constant to autograd."""
    encoder, decoder, x = problem
    index = torch.arange(len(x))
    for reparameterized, expect_gradient in [(True, True), (False, False)]:
        trace = pyro.poutine.trace(guide).get_trace(x, index, encoder, len(x), reparameterized)
        t = trace.nodes["t"]["value"]
        assert t.requires_grad is expect_gradient
        log_p_x = pyro.poutine.trace(pyro.poutine.replay(model, trace=trace)).get_trace(
            x, index, decoder, len(x)
        ).nodes["x"]["fn"].log_prob(x).sum()  # log p(x|t)
        grads = torch.autograd.grad(log_p_x, list(encoder.parameters()), allow_unused=True)
        reaches_encoder = any(g is not None and g.abs().sum() > 0 for g in grads)
        assert reaches_encoder is expect_gradient
