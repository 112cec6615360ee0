"""Model and guide traces: sites, shapes, log-densities by hand, and the plate's N/B scaling."""
from __future__ import annotations

import math

import pyro
import pyro.poutine as poutine
import pytest
import torch
from torch.nn import functional as F

from guide import Encoder, ScoreFunctionNormal, guide, posterior
from model import Bernoulli, Decoder, Gaussian, model
from vae.elbo import log_joint

IMAGE_SHAPE = (1, 8, 8)
LATENT_DIM = 3


def make_likelihood(name: str, image_channels: int = 1):
    """The lecture's two likelihoods (model.py), by name."""
    if name == "bernoulli":
        return Bernoulli(image_channels)
    return Gaussian(image_channels, min_scale=1e-3)


def networks(likelihood="bernoulli"):
    encoder = Encoder(IMAGE_SHAPE, LATENT_DIM, channels=[4], hidden_dim=16)
    decoder = Decoder(IMAGE_SHAPE, LATENT_DIM, channels=[4], hidden_dim=16, likelihood=make_likelihood(likelihood))
    return encoder, decoder


def parameters(p_x) -> tuple:
    """The per-pixel parameters of p(x|t): the Bernoulli's logits, or the Gaussian's (x_loc, x_scale)."""
    pixel = p_x.base_dist
    return (pixel.logits,) if isinstance(pixel, torch.distributions.Bernoulli) else (pixel.loc, pixel.scale)


def images(likelihood, batch=5):
    x = torch.rand(batch, *IMAGE_SHAPE)
    return torch.bernoulli(x) if likelihood == "bernoulli" else x


def normal_log_density(value, loc, scale):
    """log N(value | loc, scale^2), elementwise, written out."""
    return -0.5 * ((value - loc) / scale) ** 2 - torch.log(scale) - 0.5 * math.log(2 * math.pi)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_model_trace_sites_shapes_and_log_probs(likelihood):
    _, decoder = networks(likelihood)
    x = images(likelihood)
    index = torch.arange(len(x))
    trace = poutine.trace(model).get_trace(x, index, decoder, len(x))
    trace.compute_log_prob()
    sample_sites = [name for name, site in trace.nodes.items() if site["type"] == "sample"]
    assert sample_sites == ["data", "t", "x"]
    t = trace.nodes["t"]["value"]
    assert t.shape == (5, LATENT_DIM)
    assert trace.nodes["x"]["is_observed"] and torch.equal(trace.nodes["x"]["value"], x)

    # log p(t) = sum_d log N(t_d | 0, 1)
    expected_log_p_t = normal_log_density(t, torch.zeros_like(t), torch.ones_like(t)).sum(-1)
    torch.testing.assert_close(trace.nodes["t"]["log_prob"], expected_log_p_t)

    # log p(x|t), summed over every pixel of each image
    if likelihood == "bernoulli":
        (logits,) = parameters(decoder(t))
        expected_log_p_x = (x * logits - F.softplus(logits)).sum((1, 2, 3))
    else:
        x_loc, x_scale = parameters(decoder(t))
        expected_log_p_x = normal_log_density(x, x_loc, x_scale).sum((1, 2, 3))
    torch.testing.assert_close(trace.nodes["x"]["log_prob"], expected_log_p_x)
    assert trace.nodes["x"]["log_prob"].shape == (5,)


@pytest.mark.parametrize("reparameterized", [True, False], ids=["reparam", "score"])
def test_guide_trace_matches_hand_computation(reparameterized):
    encoder, _ = networks()
    x = images("bernoulli")
    trace = poutine.trace(guide).get_trace(x, torch.arange(5), encoder, 5, reparameterized)
    trace.compute_log_prob()
    site = trace.nodes["t"]
    t_loc, t_scale, _ = encoder(x)
    assert t_loc.shape == t_scale.shape == (5, LATENT_DIM)
    assert (t_scale > 0).all()
    # log q(t|x) = sum_d log N(t_d | t_loc_d, t_scale_d^2)
    expected = normal_log_density(site["value"], t_loc, t_scale).sum(-1)
    torch.testing.assert_close(site["log_prob"], expected)
    assert site["fn"].has_rsample is reparameterized
    assert site["value"].requires_grad is reparameterized  # score: no gradient path through t


def test_score_function_normal_survives_plate_and_to_event():
    """The pyro-ppl 1.9.2 trap: an instance flag is lost when the plate re-expands the
    distribution. The class attribute survives expand() and to_event()."""
    q = ScoreFunctionNormal(torch.zeros(4, 2), torch.ones(4, 2))
    assert not q.expand((4, 2)).has_rsample
    assert not q.to_event(1).has_rsample
    assert isinstance(q.expand((3, 4, 2)), ScoreFunctionNormal)
    assert not q.sample().requires_grad


@pytest.mark.parametrize("reparameterized", [True, False], ids=["reparam", "score"])
def test_plate_scales_minibatch_by_num_data_over_batch(reparameterized):
    """Each image's log-density is multiplied by N/B: the minibatch ELBO is unbiased for the full one."""
    encoder, decoder = networks()
    num_data, x = 60, images("bernoulli", batch=4)
    index = torch.tensor([3, 17, 42, 59])
    guide_trace = poutine.trace(guide).get_trace(x, index, encoder, num_data, reparameterized)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, index, decoder, num_data)
    for trace in (guide_trace, model_trace):
        trace.compute_log_prob()
        assert torch.equal(trace.nodes["data"]["value"], index)
    assert model_trace.nodes["t"]["scale"] == model_trace.nodes["x"]["scale"] == guide_trace.nodes["t"]["scale"] == 15.0
    for site in ("t", "x"):
        node = model_trace.nodes[site]
        torch.testing.assert_close(node["log_prob"], 15.0 * node["unscaled_log_prob"])
    unscaled = sum(model_trace.nodes[s]["unscaled_log_prob"].sum() for s in ("t", "x"))
    torch.testing.assert_close(model_trace.log_prob_sum(), 15.0 * unscaled)


def test_kl_weight_scales_log_p_t_and_log_q_t_and_leaves_the_likelihood():
    """The warm-up's objective, by hand on one draw: -(N/B) sum_i [log p(x_i|t_i) + beta (log p(t_i) - log q(t_i|x_i))]."""
    encoder, decoder = networks()
    num_data, x = 60, images("bernoulli", batch=4)
    index = torch.tensor([3, 17, 42, 59])
    losses = {}
    for beta in (1.0, 0.3):
        pyro.set_rng_seed(0)  # the same t for both
        guide_trace = poutine.trace(guide).get_trace(x, index, encoder, num_data, kl_weight=beta)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, index, decoder, num_data,
                                                                                       kl_weight=beta)
        assert model_trace.nodes["t"]["scale"] == guide_trace.nodes["t"]["scale"] == pytest.approx(15.0 * beta)
        assert model_trace.nodes["x"]["scale"] == 15.0
        losses[beta] = (guide_trace.log_prob_sum() - model_trace.log_prob_sum()).item()  # -ELBO_beta
        t = guide_trace.nodes["t"]["value"]
    log_p_x, log_p_t = log_joint(x, t, decoder)
    t_loc, t_scale, _ = encoder(x)
    log_q_t = normal_log_density(t, t_loc, t_scale).sum(-1)
    for beta, loss in losses.items():
        assert loss == pytest.approx(-15.0 * (log_p_x + beta * (log_p_t - log_q_t)).sum().item(), rel=1e-5)


def test_minibatch_elbo_averages_to_full_data_elbo():
    """Averaged over a partition of the dataset into minibatches, N/B * (batch sum) equals the full sum."""
    encoder, decoder = networks()
    x = images("bernoulli", batch=12)
    per_image = []
    fixed_t = torch.randn(12, LATENT_DIM)
    for batch in torch.arange(12).split(4):
        cond = poutine.condition(model, data={"t": fixed_t[batch]})
        trace = poutine.trace(cond).get_trace(x[batch], batch, decoder, 12)
        per_image.append(trace.log_prob_sum())
    full = poutine.trace(poutine.condition(model, data={"t": fixed_t})).get_trace(x, torch.arange(12), decoder, 12)
    torch.testing.assert_close(torch.stack(per_image).mean(), full.log_prob_sum())


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 16, 16), (2, 12, 20)])
def test_networks_take_any_image_shape(shape):
    encoder = Encoder(shape, LATENT_DIM, channels=[4, 8], hidden_dim=16)
    decoder = Decoder(shape, LATENT_DIM, channels=[4, 8], hidden_dim=16,
                      likelihood=make_likelihood("gaussian", shape[0]))
    t_loc, t_scale, _ = encoder(torch.rand(2, *shape))
    x_loc, x_scale = parameters(decoder(t_loc))
    assert x_loc.shape == x_scale.shape == (2, *shape)


def test_network_rejects_image_shape_it_cannot_take():
    with pytest.raises(ValueError, match=r"\(1, 30, 30\).*divisible by 4"):
        Encoder((1, 30, 30), LATENT_DIM, channels=[4, 8], hidden_dim=16)


@pytest.mark.parametrize("raw_scale", [-200.0, 0.0, 3.0])
def test_gaussian_scale_is_the_floor_plus_softplus_and_reaches_the_floor(raw_scale):
    """x_scale = min_scale + softplus(raw): pushed far negative the scale is exactly the floor, never
    below it or NaN; the decoder's output channels are (loc, raw scale) in that order, x_loc = sigmoid."""
    _, decoder = networks("gaussian")
    last = decoder.upsample[-1]  # the transposed convolution that outputs (loc, raw scale) per pixel
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.7, raw_scale]))  # channel 0: loc, channel 1: the raw scale
    x_loc, x_scale = parameters(decoder(torch.randn(2, LATENT_DIM)))
    assert torch.equal(x_loc, torch.full_like(x_loc, torch.sigmoid(torch.tensor(0.7)).item()))
    expected = torch.tensor(1e-3) + F.softplus(torch.tensor(raw_scale))
    assert torch.equal(x_scale, torch.full_like(x_scale, expected.item()))
    if raw_scale < -100:
        assert torch.equal(x_scale, torch.full_like(x_scale, 1e-3))  # the floor itself, in float32


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_decoder_takes_leading_particle_dims(likelihood):
    """t (K, B, latent_dim), as vectorized particles give it, decodes like the flat (K * B) batch."""
    decoder = Decoder(IMAGE_SHAPE, LATENT_DIM, channels=[4], hidden_dim=16, likelihood=make_likelihood(likelihood))
    t = torch.randn(5, 3, LATENT_DIM)
    stacked, flat = decoder(t), decoder(t.reshape(15, LATENT_DIM))
    assert stacked.batch_shape == (5, 3) and stacked.event_shape == IMAGE_SHAPE
    for a, b in zip(parameters(stacked), parameters(flat), strict=True):
        assert a.shape == (5, 3, *IMAGE_SHAPE)
        assert torch.allclose(a, b.reshape(5, 3, *IMAGE_SHAPE), atol=1e-6)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_posterior_and_log_joint_read_the_guide_and_model(likelihood):
    """guide.posterior gives the encoder's q(t|x) and a sample of it; model.log_joint gives
    log p(x|t) and log p(t) for that t, as written out by hand, unscaled by the plate."""
    encoder, decoder = networks(likelihood)
    x = images(likelihood)
    q_t, t = posterior(x, encoder)
    t_loc, t_scale, _ = encoder(x)
    torch.testing.assert_close(q_t.base_dist.loc, t_loc)
    torch.testing.assert_close(q_t.base_dist.scale, t_scale)
    assert t.shape == (5, LATENT_DIM) and q_t.batch_shape == (5,) and q_t.event_shape == (LATENT_DIM,)
    log_p_x, log_p_t = log_joint(x, t, decoder)
    torch.testing.assert_close(log_p_t, normal_log_density(t, torch.zeros_like(t), torch.ones_like(t)).sum(-1))
    if likelihood == "bernoulli":  # log p(x|t) written out from p(x|t)'s parameters, not its log_prob
        (logits,) = parameters(decoder(t))
        by_hand = (x * logits - F.softplus(logits)).sum((1, 2, 3))
    else:
        by_hand = normal_log_density(x, *parameters(decoder(t))).sum((1, 2, 3))
    torch.testing.assert_close(log_p_x, by_hand)
    torch.testing.assert_close(decoder.prior(5, like=x).log_prob(t), log_p_t)
