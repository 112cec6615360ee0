"""estimator=iwae: the per-image importance-weighted bound as a training objective.

Known answers: the bound equals a hand computation of (N/B) sum_i [logsumexp_k log w_ik - log K]
on the same samples; it scales by exactly N/B outside the log-mean-exp; it equals Pyro's
RenyiELBO(alpha=0) when the minibatch is the whole data set and differs from it otherwise; on
probabilistic PCA it climbs to the exact log p(x) as K grows.
"""
from __future__ import annotations

import math
from functools import partial

import pyro
import pytest
import torch
from pyro.infer import RenyiELBO, Trace_ELBO

from conftest import FAST, compose_config
from guide import Encoder, guide
from model import Bernoulli, Decoder, model
from test_evaluate import LinearEncoder, LinearGaussianDecoder
from train import train
from vae.config import ConfigError, check_config
from vae.elbo import log_joint
from vae.iwae import IWAE_ELBO
from vae.logbook import read_metrics


@pytest.fixture
def ppca():
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(16, 3, generator=generator)
    decoder = LinearGaussianDecoder(weight, torch.randn(16, generator=generator), sigma=0.5)
    x = decoder(torch.randn(8, 3, generator=generator)).sample()  # (8, 1, 4, 4)
    exact = torch.distributions.MultivariateNormal(decoder.bias, weight @ weight.T + 0.25 * torch.eye(16))
    return decoder, LinearEncoder(decoder, inflate=2.0), x, exact.log_prob(x.flatten(1))  # log p(x_i), (8,)


def iwae_loss(elbo, x, encoder, decoder, num_data: int, seed: int = 0) -> float:
    pyro.set_rng_seed(seed)
    return elbo.loss(partial(model, decoder=decoder, num_data=num_data),
                     partial(guide, encoder=encoder, num_data=num_data), x, torch.arange(len(x)))


def elbo_traces(elbo, x, encoder, decoder, num_data: int):
    return list(elbo._get_traces(partial(model, decoder=decoder, num_data=num_data),
                                 partial(guide, encoder=encoder, num_data=num_data), (x, torch.arange(len(x))), {}))


def test_bound_equals_the_hand_computation_on_the_same_samples(ppca):
    decoder, encoder, x, _ = ppca
    k, num_data = 7, 80
    loss = iwae_loss(IWAE_ELBO(num_particles=k), x, encoder, decoder, num_data, seed=3)
    pyro.set_rng_seed(3)  # the same draw again, read off the guide's trace: t (K, B, L)
    ((_, guide_trace),) = elbo_traces(IWAE_ELBO(num_particles=k), x, encoder, decoder, num_data)
    t = guide_trace.nodes["t"]["value"]
    t_loc, t_scale, _ = encoder(x)
    log_w = torch.stack([sum(log_joint(x, t[j], decoder))
                         - torch.distributions.Normal(t_loc, t_scale).log_prob(t[j]).sum(-1) for j in range(k)])
    by_hand = num_data / len(x) * (torch.logsumexp(log_w, 0) - math.log(k)).sum()
    assert loss == pytest.approx(-by_hand.item(), rel=1e-5)


def test_minibatch_scale_is_outside_the_log_mean_exp(ppca):
    decoder, encoder, x, _ = ppca
    whole = iwae_loss(IWAE_ELBO(num_particles=10), x, encoder, decoder, num_data=len(x))
    assert iwae_loss(IWAE_ELBO(num_particles=10), x, encoder, decoder, num_data=10 * len(x)) == pytest.approx(10 * whole, rel=1e-5)
    renyi = partial(iwae_loss, RenyiELBO(alpha=0, num_particles=10, vectorize_particles=True, max_plate_nesting=1))
    assert renyi(x, encoder, decoder, num_data=len(x)) == pytest.approx(whole, rel=1e-5)  # N = B: the same bound
    assert renyi(x, encoder, decoder, num_data=10 * len(x)) != pytest.approx(10 * whole, rel=1e-2)  # the scale inside


def test_bound_climbs_to_the_exact_ppca_log_likelihood(ppca):
    decoder, encoder, x, exact = ppca
    gaps = {}
    for k in (1, 10, 2000):
        bounds = [-iwae_loss(IWAE_ELBO(num_particles=k), x, encoder, decoder, len(x), seed) for seed in range(3)]
        gaps[k] = exact.sum().item() - sum(bounds) / len(bounds)
    assert gaps[1] > gaps[10] > gaps[2000] > -0.05 * len(x), gaps  # a bound: never clearly above log p(x)
    assert gaps[1] > 0.3 * len(x) and gaps[2000] < 0.05 * len(x), gaps
    elbo = -sum(iwae_loss(Trace_ELBO(num_particles=200, vectorize_particles=True, max_plate_nesting=1), x, encoder,
                          decoder, len(x), seed) for seed in range(3)) / 3
    assert exact.sum().item() - elbo == pytest.approx(gaps[1], abs=0.2 * len(x))  # K=1 is the ELBO


def test_gradient_is_the_hand_computed_bounds_and_a_short_run_learns(fast_config, tmp_path):
    """The gradient in every encoder and decoder weight is that of the hand computation of the bound
    on the same reparameterized particles t_k = t_loc + t_scale * eps_k (the eps of the guide's draw)."""
    encoder = Encoder((1, 4, 4), latent_dim=2, channels=[2], hidden_dim=4)
    decoder = Decoder((1, 4, 4), latent_dim=2, channels=[2], hidden_dim=4, likelihood=Bernoulli())
    x = torch.bernoulli(torch.full((3, 1, 4, 4), 0.4), generator=torch.Generator().manual_seed(0))
    pyro.set_rng_seed(5)
    loss = IWAE_ELBO(num_particles=4).differentiable_loss(partial(model, decoder=decoder, num_data=30),
                                                         partial(guide, encoder=encoder, num_data=30), x, torch.arange(3))
    pyro.set_rng_seed(5)  # the same draw again, read off the guide's trace
    ((_, guide_trace),) = elbo_traces(IWAE_ELBO(num_particles=4), x, encoder, decoder, num_data=30)
    t_loc, t_scale, _ = encoder(x)
    eps = ((guide_trace.nodes["t"]["value"] - t_loc) / t_scale).detach()  # (K, B, L)
    t = t_loc + t_scale * eps  # the same particles, differentiable in the encoder's weights
    q_t = torch.distributions.Normal(t_loc, t_scale)
    log_w = torch.stack([sum(log_joint(x, t[k], decoder)) - q_t.log_prob(t[k]).sum(-1) for k in range(4)])  # (K, B)
    by_hand = -30 / 3 * (torch.logsumexp(log_w, 0) - math.log(4)).sum()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    for network in (encoder, decoder):
        weights = list(network.parameters())
        grads = torch.autograd.grad(loss, weights, retain_graph=True)
        for grad, expected in zip(grads, torch.autograd.grad(by_hand, weights, retain_graph=True), strict=True):
            torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)
        assert sum(g.abs().sum() for g in grads) > 1e-3  # and it is not zero
    train(fast_config("estimator=iwae", "estimator.elbo.num_particles=3"), tmp_path)
    elbos = [m["test_elbo"] for m in read_metrics(tmp_path)]
    assert len(elbos) == 3 and elbos[-1] > elbos[0] + 10, elbos  # up from the untrained model's


def test_iwae_with_a_score_function_guide_is_refused():
    with pytest.raises(ConfigError, match="importance-weighted bound is trained through reparameterized samples"):
        check_config(compose_config(*FAST, "estimator=iwae", "estimator.reparameterized=false"))
