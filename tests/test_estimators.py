"""The two gradient estimators of the ELBO: both unbiased, the score function far noisier.

On a tiny fixed problem we draw many single-sample gradient estimates of the encoder's
parameters with each estimator. Their means must agree within Monte-Carlo error (both estimate
grad ELBO), and the score-function estimates must vary much more.

The score function's estimates vary hundreds of times more than the reparameterized ones, so
a plain comparison of means could not tell a biased score estimator (its score term scaled by 0.8,
say) from the right one. The comparison therefore subtracts a control variate from each estimate:
c * grad log q(t|x) at the same t, whose expectation is zero (E_q[grad log q] = 0), with c fitted per
coordinate. The mean is unchanged; its standard error shrinks about eightfold, and the check
rejects the 0.8-scaled estimator (tested below).
"""
from __future__ import annotations

from functools import partial

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Trace_ELBO
from torch import nn

from guide import Encoder, ScoreFunctionNormal, guide
from model import Bernoulli, Decoder, model

IMAGE_SHAPE = (1, 4, 4)
NUM_SAMPLES = 3000


@pytest.fixture(scope="module")
def problem():
    pyro.set_rng_seed(1)
    encoder = Encoder(IMAGE_SHAPE, latent_dim=2, channels=[2], hidden_dim=4)
    decoder = Decoder(IMAGE_SHAPE, latent_dim=2, channels=[2], hidden_dim=4, likelihood=Bernoulli())
    x = torch.bernoulli(torch.full((3, *IMAGE_SHAPE), 0.4))
    return encoder, decoder, x


def flat(gradients) -> torch.Tensor:
    return torch.cat([g.flatten() for g in gradients])


class RowOffsets(nn.Module):
    """The encoder's (t_loc, t_scale, h) of each row of a batch, its t_loc and t_scale plus offsets of that
    row's own (zero, parameters): the gradient of a loss in row r's offsets is its gradient in row r's
    (t_loc, t_scale), from which the chain rule gives the encoder's (`per_draw`)."""

    def __init__(self, encoder: Encoder, num_rows: int) -> None:
        super().__init__()
        self.encoder, self.posterior = encoder, encoder.posterior
        latent_dim = encoder.t_loc.out_features
        self.loc = nn.Parameter(torch.zeros(num_rows, latent_dim))
        self.scale = nn.Parameter(torch.zeros(num_rows, latent_dim))

    def forward(self, x):
        t_loc, t_scale, h = self.encoder(x)
        return t_loc + self.loc, t_scale + self.scale, h


def per_draw(encoder: Encoder, x: torch.Tensor, row_grads: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """(num_draws, num_encoder_params): each draw's gradient in the encoder's parameters, from the gradients
    (row_grads, each (num_draws * B, latent_dim)) in the rows' t_loc and t_scale, draw s holding rows s * B to
    (s + 1) * B - 1 (the B images of x): sum_i J_i^T g_(s, i), J_i the Jacobian of image i's (t_loc, t_scale)
    in the parameters, the same for every draw (x is fixed)."""
    t_loc, t_scale, _ = encoder(x)
    outputs = torch.cat([t_loc.flatten(), t_scale.flatten()])  # (2 B L,)
    params = list(encoder.parameters())
    jacobian = torch.stack([flat(torch.autograd.grad(output, params, retain_graph=True, allow_unused=True,
                                                     materialize_grads=True)) for output in outputs])  # (2 B L, P)
    num_draws = len(row_grads[0]) // len(x)
    return torch.cat([g.reshape(num_draws, -1) for g in row_grads], 1) @ jacobian


def encoder_gradients(problem, reparameterized: bool, x=None, num_samples=NUM_SAMPLES,
                      score_factor: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(estimates, scores), each (num_samples, num_encoder_params): independent single-sample
    estimates of grad(-ELBO) by Trace_ELBO, and grad log q(t|x) at each estimate's own t.

    Each draw is Trace_ELBO's estimate on the B images of x with one t per image; the draws are taken
    at once, in one batch of num_samples copies of x (num_data = its size: the plate's scale is 1, as
    for one copy alone; Trace_ELBO gives each row the learning signal of its own image and t), and
    each draw's gradient is read off its rows (`per_draw`; test_one_batch_gives_each_draws_own_estimate
    checks it against Trace_ELBO on one draw at a time).

    `score_factor` replaces Trace_ELBO by a hand-written score-function surrogate whose score term
    is scaled by that factor: a biased estimator, for the check to reject."""
    encoder, decoder, x_problem = problem
    x = x_problem if x is None else x
    rows = x.repeat(num_samples, 1, 1, 1)  # row s * B + i: draw s of image i
    index = torch.arange(len(rows))
    offsets = RowOffsets(encoder, len(rows))
    pyro.clear_param_store()  # the offsets of an earlier call are not these
    model_fn = partial(model, decoder=decoder, num_data=len(rows))
    guide_fn = partial(guide, encoder=offsets, num_data=len(rows), reparameterized=reparameterized)
    traced_guide = poutine.trace(guide_fn)  # records t and q(t|x) of the draws the ELBO makes
    if score_factor is None:
        loss = Trace_ELBO().differentiable_loss(model_fn, traced_guide, rows, index)
    else:  # per draw, -(log p(x, t) + factor * log q(t|x) * (log p(x, t) - log q(t|x))), the signal held constant
        guide_trace = traced_guide.get_trace(rows, index)
        model_trace = poutine.trace(poutine.replay(model_fn, trace=guide_trace)).get_trace(rows, index)
        model_trace.compute_log_prob()
        guide_trace.compute_log_prob()
        log_p = sum(model_trace.nodes[name]["log_prob"] for name in ("t", "x")).reshape(num_samples, -1).sum(1)
        log_q = guide_trace.nodes["t"]["log_prob"].reshape(num_samples, -1).sum(1)
        loss = -(log_p + score_factor * log_q * (log_p - log_q).detach()).sum()
    site = traced_guide.trace.nodes["t"]
    log_q_t = site["fn"].log_prob(site["value"].detach()).sum()  # log q(t|x) at each row's t, t held fixed
    estimates = per_draw(encoder, x, torch.autograd.grad(loss, [offsets.loc, offsets.scale], retain_graph=True))
    scores = per_draw(encoder, x, torch.autograd.grad(log_q_t, [offsets.loc, offsets.scale]))
    return estimates, scores


def one_draw(problem, reparameterized: bool, score_factor: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One draw as Trace_ELBO (or the surrogate) gives it alone: its loss on the B images (num_data = B),
    differentiated by autograd in the encoder's parameters; and grad log q(t|x) at its t."""
    encoder, decoder, x = problem
    index = torch.arange(len(x))
    model_fn = partial(model, decoder=decoder, num_data=len(x))
    guide_fn = partial(guide, encoder=encoder, num_data=len(x), reparameterized=reparameterized)
    params = list(encoder.parameters())
    traced_guide = poutine.trace(guide_fn)
    if score_factor is None:
        loss = Trace_ELBO().differentiable_loss(model_fn, traced_guide, x, index)
    else:
        guide_trace = traced_guide.get_trace(x, index)
        log_p = poutine.trace(poutine.replay(model_fn, trace=guide_trace)).get_trace(x, index).log_prob_sum()
        log_q = guide_trace.log_prob_sum()
        loss = -(log_p + score_factor * log_q * (log_p - log_q).detach())
    site = traced_guide.trace.nodes["t"]
    log_q_t = site["fn"].log_prob(site["value"].detach()).sum()
    return flat(torch.autograd.grad(loss, params, retain_graph=True)), flat(torch.autograd.grad(log_q_t, params))


def noise_from(monkeypatch, eps: torch.Tensor) -> None:
    """From here on, the guide's draws t = t_loc + t_scale * eps take eps from the flat `eps` in turn,
    a batch of rows taking as many as a draw at a time does (rsample, and the score function's sample)."""
    taken = [0]

    def rsample(self, sample_shape=torch.Size()):
        shape = torch.Size(sample_shape) + self.batch_shape
        noise = eps[taken[0]: taken[0] + shape.numel()].reshape(shape)
        taken[0] += shape.numel()
        return self.loc + self.scale * noise

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            return rsample(self, sample_shape)

    monkeypatch.setattr(dist.Normal, "rsample", rsample)
    monkeypatch.setattr(ScoreFunctionNormal, "sample", sample)


@pytest.mark.parametrize("reparameterized,score_factor", [(True, None), (False, None), (False, 0.8)],
                         ids=["reparam", "score", "surrogate"])
def test_one_batch_gives_each_draws_own_estimate(problem, monkeypatch, reparameterized, score_factor):
    """encoder_gradients takes its draws in one batch: each is, to float rounding, the estimate (and the
    score) that Trace_ELBO or the surrogate gives for that draw alone, on the same t."""
    num_draws = 4
    eps = torch.randn(2 * num_draws * len(problem[2]) * 2, generator=torch.Generator().manual_seed(5))
    noise_from(monkeypatch, eps)  # the batch takes the first half, the draws one by one the same again
    batched = encoder_gradients(problem, reparameterized, num_samples=num_draws, score_factor=score_factor)
    noise_from(monkeypatch, eps)
    alone = [torch.stack(draws) for draws in zip(*(one_draw(problem, reparameterized, score_factor)
                                                    for _ in range(num_draws)))]
    for got, expected in zip(batched, alone, strict=True):
        assert expected.abs().max() > 0.01  # gradients to compare, not zeros
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(alone[0][0], alone[0][1])  # four draws of their own, not one four times


def with_control_variate(samples: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Each estimate minus c * grad log q(t|x), c = cov(estimate, score) / var(score) per coordinate:
    the same expectation (E_q[grad log q] = 0), a much smaller variance for the score function."""
    estimates, scores = samples
    centred_e, centred_s = estimates - estimates.mean(0), scores - scores.mean(0)
    var_s = (centred_s**2).mean(0)
    c = torch.where(var_s > 0, (centred_e * centred_s).mean(0) / var_s.clamp_min(1e-30), torch.zeros_like(var_s))
    return estimates - c * scores


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


def agree(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """Do the two estimators' means agree within Monte-Carlo error, coordinate by coordinate?"""
    z = z_scores(with_control_variate(a), with_control_variate(b))
    return bool(z.abs().max() < 4.5 and (z**2).mean() < 2.0)  # (z**2).mean() is about 1 for the same mean


def test_estimators_agree_within_monte_carlo_error(gradient_samples):
    z = z_scores(*(with_control_variate(gradient_samples[name]) for name in ("reparam", "score")))
    assert agree(gradient_samples["reparam"], gradient_samples["score"]), z


def test_agreement_check_detects_a_different_mean(problem, gradient_samples):
    """The same check rejects estimates of a different quantity (the gradient for other images)."""
    pyro.set_rng_seed(3)
    other_x = 1 - problem[2]
    other = encoder_gradients(problem, True, x=other_x, num_samples=300)
    assert not agree(gradient_samples["reparam"], other)


def test_agreement_check_detects_a_score_term_scaled_by_0_8(problem, gradient_samples):
    """A realistic bug, a score-function estimator whose score term is 0.8 of what it should be (its
    mean 0.8 of the gradient's), is rejected; the same hand-written surrogate with factor 1 agrees."""
    pyro.set_rng_seed(4)
    assert not agree(gradient_samples["reparam"], encoder_gradients(problem, False, score_factor=0.8))
    pyro.set_rng_seed(4)
    assert agree(gradient_samples["reparam"], encoder_gradients(problem, False, score_factor=1.0, num_samples=1000))


def test_score_function_variance_is_larger(gradient_samples):
    reparam_var = gradient_samples["reparam"][0].var(0).mean()
    score_var = gradient_samples["score"][0].var(0).mean()
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
