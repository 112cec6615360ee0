"""The learned mixture-of-Gaussians prior (`prior=mixture`, vae/priors.py), added beside the model:
its density, its draws, its equality with N(0, I) at one component, its training, resume and
evaluation, and the refusal of its bad keys."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pyro
import pytest
import torch
from conftest import FAST, PROJECT_DIR, assert_png_shows, compose_config, resumed_run, run_numbers, trained_run

from guide import guide
from model import StandardNormal, model
from vae.build import build_networks, build_svi
from vae.config import ConfigError, check_config
from vae.priors import GaussianMixture
from vae.runs import load_run


def spread_mixture(latent_dim: int = 2) -> GaussianMixture:
    """Three components set apart, with unequal weights and scales."""
    torch.manual_seed(0)
    prior = GaussianMixture(latent_dim, components=3)
    with torch.no_grad():
        prior.logits.copy_(torch.tensor([0.0, 1.0, -0.5]))
        prior.locs.copy_(torch.tensor([[-2.0, 0.0], [1.5, 1.0], [0.5, -2.0]])[:, :latent_dim])
        prior.log_scales.copy_(torch.tensor([[0.0, -0.5], [-0.7, 0.2], [0.3, -0.3]])[:, :latent_dim])
    return prior


def test_the_mixtures_density_integrates_to_one():
    """The sum of p(t) over a fine 2-D grid, times the cell's area, is one."""
    prior = spread_mixture()
    axis = torch.linspace(-10, 10, 801, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)  # (801^2, 2)
    log_p = prior.double()(len(grid), like=grid.double()).log_prob(grid)
    cell = (axis[1] - axis[0]) ** 2
    assert log_p.exp().sum().item() * cell.item() == pytest.approx(1.0, abs=1e-6)


def test_draws_follow_the_mixture():
    """`draw`'s mean, covariance and component frequencies match the mixture's, within Monte-Carlo
    error, and the same seed gives the same draws."""
    prior = spread_mixture()
    n = 200_000
    t = prior.draw(n, torch.Generator().manual_seed(1)).double()
    w = torch.softmax(prior.logits.detach().double(), 0)
    mu, sigma = prior.locs.detach().double(), prior.log_scales.detach().double().exp()
    mean = (w[:, None] * mu).sum(0)
    second = (w[:, None, None] * (torch.diag_embed(sigma**2) + mu[:, :, None] * mu[:, None, :])).sum(0)
    covariance = second - mean[:, None] * mean[None, :]
    se = (covariance.diagonal() / n).sqrt()
    assert ((t.mean(0) - mean).abs() < 4 * se).all(), (t.mean(0), mean)
    torch.testing.assert_close(torch.cov(t.T), covariance, rtol=0.03, atol=0.02)
    p_t = prior.double()(n, like=t)
    log_joint = torch.log_softmax(p_t.mixture_distribution.logits, -1) + p_t.component_distribution.log_prob(t[:, None, :])
    responsibility = torch.softmax(log_joint, -1)  # P(k | t); E over t ~ p(t) of it is w_k
    se = responsibility.std(0) / math.sqrt(n)
    assert ((responsibility.mean(0) - w).abs() < 4 * se).all(), (responsibility.mean(0), w)
    assert torch.equal(prior.draw(8, torch.Generator().manual_seed(1)), prior.draw(8, torch.Generator().manual_seed(1)))


def test_one_component_is_the_standard_normal_and_its_first_step_the_standard_models():
    """K = 1 starts at N(0, I): the same log p(t) to the last bit, no random draw at its start (so the
    networks start the same), and the first SVI step of the same seed gives the same loss; the
    prior's parameters get a gradient from it."""
    t = torch.randn(5, 4)
    torch.testing.assert_close(GaussianMixture(4, components=1)(5, like=t).log_prob(t),
                               StandardNormal(4)(5, like=t).log_prob(t), rtol=0, atol=0)
    losses = {}
    for option in ("standard_normal", "mixture"):
        cfg = compose_config(*FAST, f"prior={option}", "prior.components=1" if option == "mixture" else "seed=0")
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        encoder, decoder = build_networks(cfg, (1, 16, 16), torch.device("cpu"))
        svi = build_svi(cfg, encoder, decoder, num_data=512)
        x = torch.bernoulli(torch.full((8, 1, 16, 16), 0.3))
        pyro.set_rng_seed(1)
        losses[option] = svi.step(x, torch.arange(8))
        if option == "mixture":
            assert not torch.equal(decoder.prior.log_scales.detach(), torch.zeros(1, 4))  # it took the step too
    assert losses["mixture"] == losses["standard_normal"]


def test_the_model_and_guide_read_the_learned_prior():
    """Site "t" of `model` is scored by the mixture: log p(t) in the trace is the mixture's."""
    prior = spread_mixture(2)
    cfg = compose_config(*FAST, "prior=mixture", "prior.components=3", "model.latent_dim=2")
    encoder, decoder = build_networks(cfg, (1, 16, 16), torch.device("cpu"))
    decoder.prior.load_state_dict(prior.state_dict())
    x = torch.bernoulli(torch.full((4, 1, 16, 16), 0.3))
    index = torch.arange(4)
    guide_trace = pyro.poutine.trace(guide).get_trace(x, index, encoder, 4)
    trace = pyro.poutine.trace(pyro.poutine.replay(model, trace=guide_trace)).get_trace(x, index, decoder, 4)
    t = trace.nodes["t"]["value"]
    torch.testing.assert_close(trace.nodes["t"]["fn"].log_prob(t), prior(4, like=t).log_prob(t))


def test_a_mixture_prior_trains_resumes_exactly_and_is_evaluated(tmp_path):
    """Trained on the ELBO, the prior moves (its means and weights learned); a run resumed after epoch
    1 ends as an uninterrupted one; the evaluation tasks read it (IW likelihood, prior samples)."""
    options = ("prior=mixture", "prior.components=4")
    whole = trained_run(tmp_path / "whole", *options, "trainer.epochs=2")
    parts = resumed_run(tmp_path / "parts", *options, stop_after=1, epochs=2)
    assert run_numbers(parts) == run_numbers(whole)
    assert all(math.isfinite(m["test_elbo"]) for m in run_numbers(whole))
    run = load_run(whole, device="cpu")
    torch.manual_seed(0)
    start = GaussianMixture(run.cfg.model.latent_dim, components=4)  # the prior's initial values, redrawn
    assert isinstance(run.decoder.prior, GaussianMixture)
    assert not torch.equal(run.decoder.prior.locs.detach(), start.locs.detach())
    metrics = evaluate_likelihood_and_samples(whole, run, tmp_path)
    assert metrics["nll"] < -metrics["elbo"] + 1e-6  # the IW bound (K=10) is above the ELBO


def evaluate_likelihood_and_samples(run_dir, run, out_dir) -> dict:
    """`python evaluate.py` task=likelihood and task=generate on a run of a learned prior (`run`, loaded): both
    run, and the generated samples are E[x|t] of the prior's own draws (task.sample_seed=0); the likelihood
    task's metrics (tests/test_vamp_prior.py uses it too)."""
    for task, options in (("likelihood", ["task.max_images=64", "task.num_particles=10"]),
                          ("generate", ["task.classifier_epochs=0"])):
        result = subprocess.run([sys.executable, "evaluate.py", f"run={run_dir}", f"task={task}", *options, "threads=1",
                                 f"hydra.run.dir={out_dir / task}"], cwd=PROJECT_DIR, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
    with torch.no_grad():
        t = run.decoder.prior.draw(64, torch.Generator().manual_seed(0))
        assert_png_shows(out_dir / "generate" / "samples.png", run.decoder(t).mean, nrow=8)
    return json.loads((out_dir / "likelihood" / "metrics.json").read_text())


@pytest.mark.parametrize("override,message", [
    ("prior.components=0", "prior.components=0: must be a positive integer"),
    ("prior.components=2.5", "prior.components=2.5: must be a positive integer"),
    ("prior.init_spread=-1", "prior.init_spread=-1: must be a finite number >= 0"),
    ("prior._target_=vae.priors.Nope", "prior._target_=vae.priors.Nope: cannot be imported"),
])
def test_bad_keys_of_the_mixture_prior_are_refused_in_one_line(override, message):
    cfg = compose_config(*FAST, "prior=mixture", override)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")) as refused:
        check_config(cfg)
    assert "\n" not in str(refused.value)
