"""A second stochastic layer (`prior=two_layer posterior=bottom_up`, vae/hierarchy.py), added beside the model.

Known answers: on a linear-Gaussian two-layer model, whose log p(x) is exact, the IW bound of evaluation and
the IW training objective both climb to it as K grows; both sites "t" and "t2" are scaled by N/B in model and
guide; at initialization the two-layer model's log-weights are the lecture's, draw for draw; the prior's draws
follow the marginal p(t); a run trains, resumes exactly and is evaluated; every unsupported pair is refused in
one line.
"""
from __future__ import annotations

import math
import subprocess
import sys
from functools import partial

import pyro
import pytest
import torch
from conftest import FAST, PROJECT_DIR, compose_config, resumed_run, run_numbers, trained_run
from pyro.infer import Trace_ELBO
from test_evaluate import LinearEncoder, LinearGaussianDecoder
from test_mixture_prior import evaluate_likelihood_and_samples
from torch import nn

from guide import MIN_T_SCALE, Encoder, guide, latent_point, posterior
from model import Bernoulli, Decoder, model
from vae.build import build_networks
from vae.config import ConfigError, check_config
from vae.flows import InverseAutoregressive
from vae.hierarchy import BottomUp, TwoLayerPrior
from vae.importance import dataset_iw, log_weights
from vae.iwae import IWAE_ELBO
from vae.runs import load_run

TWO_LAYER = ("prior=two_layer", "posterior=bottom_up", "prior.upper_dim=3", "prior.hidden_dims=[16]",
             "posterior.hidden_dims=[16]")


def linear_gaussian(weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor) -> nn.Linear:
    """The layer whose output ConditionalGaussian reads as loc = weight u + bias and the constant `scale`."""
    out_dim, in_dim = weight.shape
    layer = nn.Linear(in_dim, 2 * out_dim)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[:out_dim] = weight
        layer.bias[:out_dim] = bias
        layer.bias[out_dim:] = torch.log(torch.expm1(scale - MIN_T_SCALE))  # softplus^-1
    return layer


@pytest.fixture
def two_layer_linear():
    """p(t2) = N(0, I_2), p(t|t2) = N(A t2 + a, diag s^2), p(x|t) = N(W t + b, 0.25 I): x ~ N(W a + b,
    W (A A^T + diag s^2) W^T + 0.25 I), exactly. q(t|x) the PPCA posterior's mean with inflated scales, and
    q(t2|t) the exact p(t2|t)'s mean with its scales inflated by 1.5: a proposal, never the posterior."""
    generator = torch.Generator().manual_seed(2)
    weight, bias = torch.randn(16, 3, generator=generator), torch.randn(16, generator=generator)
    a_matrix, a_bias = torch.randn(3, 2, generator=generator), 0.5 * torch.randn(3, generator=generator)
    s = torch.tensor([0.6, 0.8, 0.5])
    decoder = LinearGaussianDecoder(weight, bias, sigma=0.5)
    decoder.prior = TwoLayerPrior(3, upper_dim=2, hidden_dims=[4])
    decoder.prior.down.net = linear_gaussian(a_matrix, a_bias, s)
    encoder = LinearEncoder(decoder, inflate=2.0)
    precision = torch.eye(2) + a_matrix.T @ torch.diag(s**-2) @ a_matrix  # p(t2|t): N(P^-1 A^T S^-2 (t - a), P^-1)
    gain = torch.linalg.solve(precision, a_matrix.T @ torch.diag(s**-2))  # (2, 3)
    encoder.posterior = BottomUp(3, 3, upper_dim=2, hidden_dims=[4])
    encoder.posterior.up.net = linear_gaussian(gain, -gain @ a_bias, 1.5 * torch.linalg.inv(precision).diagonal().sqrt())
    t = a_matrix @ torch.randn(2, 8, generator=generator) + a_bias[:, None] + s[:, None] * torch.randn(3, 8, generator=generator)
    x = decoder(t.T).sample()  # (8, 1, 4, 4) from the model
    covariance = weight @ (a_matrix @ a_matrix.T + torch.diag(s**2)) @ weight.T + 0.25 * torch.eye(16)
    exact = torch.distributions.MultivariateNormal(weight @ a_bias + bias, covariance).log_prob(x.flatten(1))  # (8,)
    return decoder, encoder, x, exact, (a_matrix, a_bias, s)


def test_the_iw_bound_climbs_to_the_exact_two_layer_log_likelihood(two_layer_linear):
    """Evaluation's IW bound (vae/importance.py) and the IW training objective (vae/iwae.py) over pairs
    (t, t2) ~ q(t|x) q(t2|t): below log p(x), the gap shrinking with K, and near zero at K = 2000."""
    decoder, encoder, x, exact, _ = two_layer_linear
    gaps = {}
    for k, seeds in ((1, 20), (10, 20), (2000, 1)):  # the mean gap per image over 8 images and `seeds` draws
        bounds = []
        for seed in range(seeds):
            pyro.set_rng_seed(seed)
            bounds.append(dataset_iw(x, encoder, decoder, k, particles_per_chunk=500)["log_px"])
        gaps[k] = (exact - torch.stack(bounds).mean(0)).mean().item()
    assert gaps[1] > gaps[10] > gaps[2000] > -0.05, gaps  # a bound: never clearly above log p(x)
    assert gaps[1] > 0.5 and gaps[2000] < 0.05, gaps
    pyro.set_rng_seed(0)
    bound = -IWAE_ELBO(num_particles=2000).loss(partial(model, decoder=decoder, num_data=len(x)),
                                                 partial(guide, encoder=encoder, num_data=len(x)), x, torch.arange(len(x)))
    assert abs(exact.sum().item() - bound) < 0.05 * len(x)


def test_both_sites_are_scaled_by_n_over_b(two_layer_linear):
    """Sites "t" and "t2" in guide and model carry the plate's N/B, and the minibatch loss is N/B times the
    per-image sum: with N = 10 B, ten times the loss with N = B, on the same draws."""
    decoder, encoder, x, _, _ = two_layer_linear
    index = torch.arange(len(x))
    guide_trace = pyro.poutine.trace(guide).get_trace(x, index, encoder, 10 * len(x))
    model_trace = pyro.poutine.trace(pyro.poutine.replay(model, trace=guide_trace)).get_trace(x, index, decoder, 10 * len(x))
    for trace in (guide_trace, model_trace):
        assert {name: float(trace.nodes[name]["scale"]) for name in ("t", "t2")} == {"t": 10.0, "t2": 10.0}
    assert float(model_trace.nodes["x"]["scale"]) == 10.0

    def loss(num_data: int) -> float:
        pyro.set_rng_seed(5)
        return Trace_ELBO().loss(partial(model, decoder=decoder, num_data=num_data),
                                 partial(guide, encoder=encoder, num_data=num_data), x, index)

    assert loss(10 * len(x)) == pytest.approx(10 * loss(len(x)), rel=1e-6)


def test_draws_follow_the_marginal_prior(two_layer_linear):
    """t2 ~ N(0, I), t ~ p(t|t2): the draws' mean and covariance are the marginal's, a + 0 and A A^T + diag s^2."""
    decoder, _, _, _, (a_matrix, a_bias, s) = two_layer_linear
    t = decoder.prior.draw(40000, torch.Generator().manual_seed(0))  # (40000, 3)
    torch.testing.assert_close(t.mean(0), a_bias, atol=0.03, rtol=0)
    torch.testing.assert_close(t.T.cov(), a_matrix @ a_matrix.T + torch.diag(s**2), atol=0.08, rtol=0.03)
    again = decoder.prior.draw(40000, torch.Generator().manual_seed(0))
    assert torch.equal(t, again)  # seeded


def test_at_initialization_the_two_layer_model_is_the_lectures():
    """Both MLPs start at N(0, I), so log p(t2) - log q(t2|t) = 0 for every draw: log-weights and the SVI loss
    equal the one-layer model's on the same t, while the t2 drawn are genuinely random."""
    shape = (1, 16, 16)
    torch.manual_seed(0)
    encoder = Encoder(shape, 4, [8], 32)
    torch.manual_seed(0)
    two_encoder = Encoder(shape, 4, [8], 32, posterior=partial(BottomUp, upper_dim=3, hidden_dims=[16]))
    decoder = Decoder(shape, 4, [8], 32, Bernoulli())
    two_decoder = Decoder(shape, 4, [8], 32, Bernoulli(), prior=TwoLayerPrior(4, upper_dim=3, hidden_dims=[16]))
    missing = two_decoder.load_state_dict(decoder.state_dict(), strict=False).missing_keys
    assert missing and all(key.startswith("prior.") for key in missing)
    x = torch.bernoulli(torch.rand(6, *shape, generator=torch.Generator().manual_seed(1)))
    two = log_weights(x, two_encoder, two_decoder, 20)  # (t_k, t2_k) pairs
    t = two["t"]  # (K, B, 4)
    q_t, _ = posterior(x, encoder)
    lecture_log_p_t = torch.distributions.Normal(0.0, 1.0).log_prob(t).sum(-1)  # log N(t; 0, I), (K, B)
    lecture = decoder(t).log_prob(x) + lecture_log_p_t - q_t.log_prob(t)  # the lecture's log w at the same t
    torch.testing.assert_close(two["log_w"], lecture, atol=1e-4, rtol=0)
    assert (two["log_p_t"] - lecture_log_p_t).std() > 0.1  # log p(t2) of varied t2, cancelled by log q(t2|t)

    def loss(enc, dec) -> float:
        pyro.set_rng_seed(3)
        return Trace_ELBO().loss(partial(model, decoder=dec, num_data=60), partial(guide, encoder=enc, num_data=60),
                                 x, torch.arange(6))

    assert loss(two_encoder, two_decoder) == pytest.approx(loss(encoder, decoder), rel=1e-5)


def test_a_two_layer_run_trains_resumes_exactly_and_is_evaluated(tmp_path):
    """Trained on the ELBO, both MLPs move from their start; a run resumed after epoch 1 ends as an
    uninterrupted one; task=likelihood and task=generate read it, and task=impute refuses it in one line."""
    whole = trained_run(tmp_path / "whole", *TWO_LAYER, "trainer.epochs=2")
    parts = resumed_run(tmp_path / "parts", *TWO_LAYER, stop_after=1, epochs=2)
    assert run_numbers(parts) == run_numbers(whole)
    assert all(math.isfinite(m["test_elbo"]) for m in run_numbers(whole))
    run = load_run(whole, device="cpu")
    assert isinstance(run.decoder.prior, TwoLayerPrior) and isinstance(run.encoder.posterior, BottomUp)
    for layer in (run.decoder.prior.down.net[-1], run.encoder.posterior.up.net[-1]):
        assert layer.weight.abs().max() > 1e-3  # started at zero
    metrics = evaluate_likelihood_and_samples(whole, run, tmp_path)
    assert metrics["nll"] < -metrics["elbo"] + 1e-6  # the IW bound (K=10) is above the ELBO
    refused = subprocess.run([sys.executable, "evaluate.py", f"run={whole}", "task=impute",
                              f"hydra.run.dir={tmp_path / 'impute'}"], cwd=PROJECT_DIR, capture_output=True, text=True)
    assert refused.returncode != 0 and refused.stderr.strip().splitlines() == [
        refused.stderr.strip().splitlines()[-1]]
    assert "task=impute with latents above t (t2" in refused.stderr


@pytest.mark.parametrize("overrides,message", [
    (("prior=two_layer",), "prior=two_layer and posterior=bottom_up go together (got posterior._target_=guide."),
    (("posterior=bottom_up",), "prior=two_layer and posterior=bottom_up go together (got prior._target_=model."),
    (("posterior=bottom_up", "prior=mixture"), "(got prior._target_=vae.priors.GaussianMixture)"),
    ((*TWO_LAYER, "posterior.upper_dim=2"), "prior.upper_dim=3 with posterior.upper_dim=2: p(t2) and q(t2|t)"),
    ((*TWO_LAYER, "estimator=score"), "posterior._target_=vae.hierarchy.BottomUp with estimator.reparameterized=false"),
    ((*TWO_LAYER, "estimator=dreg"), "posterior._target_=vae.hierarchy.BottomUp with estimator.elbo._target_=vae.dreg"),
    ((*TWO_LAYER, "prior.upper_dim=0"), "prior.upper_dim=0: must be a positive integer"),
    ((*TWO_LAYER, "posterior.hidden_dims=[]"), "posterior.hidden_dims=[]: must be a non-empty list"),
])
def test_unsupported_pairs_and_bad_keys_are_refused_in_one_line(overrides, message):
    cfg = compose_config(*FAST, *overrides)
    with pytest.raises(ConfigError) as refused:
        check_config(cfg)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_the_two_layer_config_checks_and_composes_with_flows_beneath():
    """reparam and iwae pass the checks; `posterior.beneath` puts the flows of vae/flows.py under t2: q(t|x) is
    then the flow's, its point the flow's image of t_loc, and t2 is drawn from q(t2|t) of the flow's t."""
    check_config(compose_config(*FAST, *TWO_LAYER))
    check_config(compose_config(*FAST, *TWO_LAYER, "estimator=iwae"))
    cfg = compose_config(*FAST, *TWO_LAYER, "posterior.beneath._target_=vae.flows.InverseAutoregressive")
    check_config(cfg)
    encoder, decoder = build_networks(cfg, (1, 16, 16), torch.device("cpu"))
    assert isinstance(encoder.posterior.beneath, InverseAutoregressive)
    x = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    trace = pyro.poutine.trace(guide).get_trace(x, torch.arange(5), encoder, 5)
    t_loc, _, h = encoder(x)
    torch.testing.assert_close(latent_point(x, encoder), encoder.posterior.beneath.point(t_loc, h))
    assert not torch.allclose(latent_point(x, encoder), t_loc)  # the flows moved it
    assert isinstance(trace.nodes["t"]["fn"], torch.distributions.TransformedDistribution)
    t2_loc, t2_scale = encoder.posterior.up(trace.nodes["t"]["value"])
    torch.testing.assert_close(trace.nodes["t2"]["fn"].base_dist.loc, t2_loc)
