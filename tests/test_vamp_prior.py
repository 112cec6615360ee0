"""The VampPrior (`prior=vamp`, vae/priors.py): p(t) = (1/K) sum_k q(t|u_k), the encoder's own Gaussians at K
learned pseudo-inputs. Its density, its draws, its gradient (pseudo-inputs and encoder), the encoder held
outside the decoder's module tree (registered and stepped once), its training, loading and evaluation,
and the refusal of its bad keys and of a flow posterior."""
from __future__ import annotations

import json
import math

import pyro
import pytest
import torch
from conftest import FAST, compose_config, trained_run
from torch.func import functional_call

from guide import Encoder, guide
from model import model
from test_mixture_prior import evaluate_likelihood_and_samples
from vae.build import build_networks, build_svi
from vae.config import ConfigError, check_config
from vae.priors import VampPrior
from vae.runs import load_run

VAMP = ("prior=vamp", "prior.components=6")


def tiny_vamp(latent_dim: int = 2, components: int = 3) -> tuple[VampPrior, Encoder]:
    """A VampPrior on a tiny encoder of 1x4x4 images, in float64, its pseudo-inputs set apart so that the
    components differ (each image's code is another Gaussian)."""
    torch.manual_seed(0)
    encoder = Encoder((1, 4, 4), latent_dim, channels=[2], hidden_dim=8).double()
    prior = VampPrior(latent_dim, components=components, encoder=encoder, image_shape=(1, 4, 4)).double()
    with torch.no_grad():
        prior.pseudo_logits.copy_(3 * torch.randn(components, 1, 4, 4, dtype=torch.float64))
        encoder.t_loc.weight.mul_(30)  # codes of the K images further apart than their scales
        encoder.t_scale.weight.mul_(10)  # and scales that differ
    return prior, encoder


def mixture_moments(prior: VampPrior) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mu_k, sigma_k) of the components, and the mixture's mean and covariance, written out."""
    with torch.no_grad():
        mu, sigma = prior.components_of()
    mean = mu.mean(0)
    second = (torch.diag_embed(sigma**2) + mu[:, :, None] * mu[:, None, :]).mean(0)
    return mu, sigma, mean, second - mean[:, None] * mean[None, :]


def test_the_vamp_density_integrates_to_one_and_is_the_mean_of_the_encoders_gaussians():
    """The sum of p(t) over a fine 2-D grid, times the cell's area, is one; log p(t) is
    logsumexp_k log N(t; t_loc(u_k), t_scale(u_k)) - log K, written out, with u_k = sigmoid(w_k) in (0, 1)."""
    prior, encoder = tiny_vamp()
    mu, sigma, _, _ = mixture_moments(prior)
    assert (sigma > 0.1).all() and (mu.abs() < 5).all() and torch.cdist(mu, mu).max() > 1, (mu, sigma)  # in the grid
    axis = torch.linspace(-12, 12, 961, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)  # (961^2, 2)
    with torch.no_grad():
        log_p = prior(len(grid), like=grid).log_prob(grid)
    cell = (axis[1] - axis[0]) ** 2
    assert log_p.exp().sum().item() * cell.item() == pytest.approx(1.0, abs=1e-6)
    u = prior.pseudo_inputs()
    assert ((u > 0) & (u < 1)).all()
    t = torch.randn(7, 2, dtype=torch.float64)
    t_loc, t_scale, _ = encoder(torch.sigmoid(prior.pseudo_logits))
    by_hand = torch.distributions.Normal(t_loc, t_scale).log_prob(t[:, None, :]).sum(-1).logsumexp(-1) - math.log(3)
    torch.testing.assert_close(prior(7, like=t).log_prob(t), by_hand)
    assert prior(7, like=t.float()).log_prob(t.float()).dtype == torch.float32  # like's dtype


def test_draws_follow_the_vamp_density():
    """`draw`'s mean, covariance and component frequencies match the mixture's within Monte-Carlo error;
    the draws are on the CPU, carry no gradient, and the same seed gives the same draws."""
    prior, _ = tiny_vamp()
    n = 200_000
    t = prior.draw(n, torch.Generator().manual_seed(1))
    assert t.shape == (n, 2) and t.device.type == "cpu" and not t.requires_grad
    _, _, mean, covariance = mixture_moments(prior)
    se = (covariance.diagonal() / n).sqrt()
    assert ((t.mean(0) - mean).abs() < 4 * se).all(), (t.mean(0), mean)
    torch.testing.assert_close(torch.cov(t.T), covariance, rtol=0.03, atol=0.02)
    with torch.no_grad():
        p_t = prior(n, like=t)
        responsibility = torch.softmax(p_t.component_distribution.log_prob(t[:, None, :]), -1)  # P(k | t), uniform w
    se = responsibility.std(0) / math.sqrt(n)  # E over t ~ p(t) of P(k | t) is 1/K
    assert ((responsibility.mean(0) - 1 / 3).abs() < 4 * se).all(), responsibility.mean(0)
    assert torch.equal(prior.draw(8, torch.Generator().manual_seed(1)), prior.draw(8, torch.Generator().manual_seed(1)))


def test_the_gradient_of_log_p_reaches_the_pseudo_inputs_and_the_encoder():
    prior, encoder = tiny_vamp()
    t = torch.randn(5, 2, dtype=torch.float64)
    prior(5, like=t).log_prob(t).sum().backward()
    assert prior.pseudo_logits.grad is not None and prior.pseudo_logits.grad.abs().sum() > 0
    for name, parameter in encoder.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_the_encoder_is_registered_once_and_stepped_once_per_svi_step():
    """Built by vae/build.py, the prior holds the guide's own encoder, but not as a submodule: the param
    store holds each network's parameters once under its own name (no decoder$$$prior.encoder...), and one
    SVI step steps each parameter once (its Adam state counts one step, and moved it by one learning rate), the
    pseudo-inputs and the encoder's weights among them."""
    cfg = compose_config(*FAST, *VAMP)
    check_config(cfg)  # built with latent_dim alone there: its keys checked, no encoder needed
    encoder, decoder = build_networks(cfg, (1, 16, 16), torch.device("cpu"))
    assert decoder.prior.encoder is encoder and decoder.prior.pseudo_logits.shape == (6, 1, 16, 16)
    assert [name for name, _ in decoder.named_parameters() if name.startswith("prior.")] == ["prior.pseudo_logits"]
    assert "prior._encoder" not in decoder.prior.state_dict() and list(decoder.prior.state_dict()) == ["pseudo_logits"]
    svi = build_svi(cfg, encoder, decoder, num_data=512)
    before = {name: p.detach().clone() for name, p in [*encoder.named_parameters(), *decoder.named_parameters()]}
    x = torch.bernoulli(torch.full((8, 1, 16, 16), 0.3))
    svi.step(x, torch.arange(8))
    names = set(pyro.get_param_store().keys())
    assert names == ({f"encoder$$${name}" for name, _ in encoder.named_parameters()}
                     | {f"decoder$$${name}" for name, _ in decoder.named_parameters()})
    assert "decoder$$$prior.pseudo_logits" in names and not any(name.startswith("decoder$$$prior._") for name in names)
    parameters = [*encoder.parameters(), *decoder.parameters()]
    assert len(svi.optim.optim_objs) == len(parameters)  # one optimizer per parameter, no parameter twice
    for parameter in parameters:
        (state,) = svi.optim.optim_objs[parameter].state.values()
        assert int(state["step"]) == 1
    lr = cfg.optim.optim_args.lr  # Adam's first step moves each entry by lr * g / (|g| + eps): lr, not 2 lr
    for name, p in [*encoder.named_parameters(), *decoder.named_parameters()]:
        moved = (p.detach() - before[name]).abs()
        assert moved.max() > 0.99 * lr and moved.max() < 1.001 * lr, (name, moved.max())  # pseudo-inputs, encoder...


def test_the_model_reads_the_vamp_prior():
    """Site "t" of `model` is scored by the VampPrior: log p(t) in the trace is the mixture's."""
    cfg = compose_config(*FAST, *VAMP)
    encoder, decoder = build_networks(cfg, (1, 16, 16), torch.device("cpu"))
    x = torch.bernoulli(torch.full((4, 1, 16, 16), 0.3))
    index = torch.arange(4)
    guide_trace = pyro.poutine.trace(guide).get_trace(x, index, encoder, 4)
    trace = pyro.poutine.trace(pyro.poutine.replay(model, trace=guide_trace)).get_trace(x, index, decoder, 4)
    t = trace.nodes["t"]["value"]
    t_loc, t_scale, _ = encoder(decoder.prior.pseudo_inputs())
    by_hand = torch.distributions.Normal(t_loc, t_scale).log_prob(t[:, None, :]).sum(-1).logsumexp(-1) - math.log(6)
    torch.testing.assert_close(trace.nodes["t"]["fn"].log_prob(t), by_hand)


def test_a_vamp_prior_trains_loads_back_and_is_evaluated(tmp_path, machine_threads):
    """Trained on the ELBO, the test ELBO improves; the run loads back (vae.runs.load_run) with the pseudo-inputs
    training ended with and the same log p(t) at fixed t (written out on the trained weights); the evaluation
    tasks read it: the IW bound's log p(t), the generated samples (E[x|t] of its own draws). On torch's own
    thread count (`machine_threads`): the log p(t) written out equals the prior's bit for bit there (on one
    thread, the two differ in the last bit)."""
    run_dir = trained_run(tmp_path / "run", *VAMP)
    store = {name: value.detach().clone() for name, value in pyro.get_param_store().items()}  # as training ended
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["epoch"] == 0 and all(math.isfinite(m["test_elbo"]) for m in metrics)
    assert metrics[-1]["test_elbo"] > metrics[0]["test_elbo"] + 10, [m["test_elbo"] for m in metrics]

    run = load_run(run_dir, device="cpu")
    prior = run.decoder.prior
    assert isinstance(prior, VampPrior) and prior.encoder is run.encoder
    assert torch.equal(prior.pseudo_logits.detach(), store["decoder$$$prior.pseudo_logits"])
    t = torch.randn(5, run.cfg.model.latent_dim, generator=torch.Generator().manual_seed(3))
    encoder_weights = {name.removeprefix("encoder$$$"): value for name, value in store.items()
                       if name.startswith("encoder$$$")}
    with torch.no_grad():
        u = torch.sigmoid(store["decoder$$$prior.pseudo_logits"])
        t_loc, t_scale, _ = functional_call(run.encoder, encoder_weights, (u,))
        by_hand = torch.distributions.Normal(t_loc, t_scale).log_prob(t[:, None, :]).sum(-1).logsumexp(-1) - math.log(6)
        assert torch.equal(prior(5, like=t).log_prob(t), by_hand)

    metrics = evaluate_likelihood_and_samples(run_dir, run, tmp_path)  # samples: E[x|t] of the VampPrior's draws
    assert math.isfinite(metrics["nll"]) and metrics["nll"] < -metrics["elbo"] + 1e-6  # the IW bound (K=10) is higher


@pytest.mark.parametrize("override,message", [
    ("prior.components=0", "prior.components=0: must be a positive integer"),
    ("prior.components=2.5", "prior.components=2.5: must be a positive integer"),
    ("prior.components=true", "prior.components=True: must be a positive integer"),
    ("prior.init_mean=0", "prior.init_mean=0: must be a number between 0 and 1"),
    ("prior.init_mean=1.5", "prior.init_mean=1.5: must be a number between 0 and 1"),
    ("prior.init_std=-1", "prior.init_std=-1: must be a finite number >= 0"),
    ("prior.nope=1", "prior._target_=vae.priors.VampPrior: TypeError"),
])
def test_bad_keys_of_the_vamp_prior_are_refused_in_one_line(override, message):
    cfg = compose_config(*FAST, "prior=vamp", f"+{override}" if "nope" in override else override)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")) as refused:
        check_config(cfg)
    assert "\n" not in str(refused.value)


def test_a_flow_posterior_is_refused_in_one_line():
    """q(t|u_k) with posterior=iaf is no longer the encoder's Gaussian: building the networks refuses it, and
    `VampPrior.refuses(cfg)` says the same from the config alone."""
    cfg = compose_config(*FAST, "prior=vamp", "posterior=iaf")
    refusal = r"prior=vamp with posterior\._target_=vae\.flows\.InverseAutoregressive: "
    with pytest.raises(ConfigError, match=refusal) as refused:
        build_networks(cfg, (1, 16, 16), torch.device("cpu"))
    assert "\n" not in str(refused.value) and "use posterior=gaussian" in str(refused.value)
    assert VampPrior.refuses(cfg) == str(refused.value)  # the same line from the config alone (for check_config)
    assert VampPrior.refuses(compose_config(*FAST, "prior=vamp")) is None
    with pytest.raises(ConfigError, match=refusal):  # before any work: check_config asks the prior's class
        check_config(cfg)
