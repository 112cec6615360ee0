"""The flow posterior (`posterior=iaf`, vae/flows.py): q(t|x) is a normalized density whose samples
follow it, it fits a correlated posterior that the diagonal Gaussian cannot, it survives a checkpoint,
every evaluation task runs on it, and the score function is refused with it."""
from __future__ import annotations

import math
from functools import partial

import numpy as np
import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from conftest import FAST, assert_png_shows, compose_config, trained_run
from evaluate import evaluate as evaluate_run
from guide import DiagonalNormal, Encoder, guide, latent_point, posterior
from model import Bernoulli, Decoder, model
from tasks.impute import make_mask
from test_evaluate import LinearGaussianDecoder, assert_detection_is_the_saved_scores
from vae.config import ConfigError, check_config
from vae.data import load_split
from vae.flows import InverseAutoregressive
from vae.importance import log_weights
from vae.iwae import IWAE_ELBO
from vae.logbook import read_metrics
from vae.runs import load_run


def flow_encoder(flows: int = 2, seed: int = 0, image_shape=(1, 8, 8), latent_dim: int = 2) -> Encoder:
    torch.manual_seed(seed)
    q_t = partial(InverseAutoregressive, flows=flows) if flows else DiagonalNormal
    return Encoder(image_shape, latent_dim=latent_dim, channels=[4], hidden_dim=8, posterior=q_t)


def test_flow_posterior_is_a_density_and_its_samples_follow_it():
    encoder = flow_encoder()
    x = torch.rand(1, 1, 8, 8)
    q_t, _ = posterior(x, encoder)  # batch (1,), event (2,)
    side = torch.linspace(-8, 8, 321)
    grid = torch.cartesian_prod(side, side)[:, None]  # (G, 1, 2)
    density = q_t.log_prob(grid).exp().squeeze(-1)  # inverts the flows: no cached sample for these points
    cell = (side[1] - side[0]) ** 2
    assert (density.sum() * cell).item() == pytest.approx(1.0, abs=2e-3)  # integrates to 1
    grid_mean = (density[:, None] * grid[:, 0]).sum(0) * cell
    draws = q_t.sample((40_000,))[:, 0]  # (S, 2)
    assert torch.allclose(draws.mean(0), grid_mean, atol=0.03), (draws.mean(0), grid_mean)
    assert not torch.allclose(latent_point(x, encoder), encoder(x)[0])  # the flows move the Gaussian's mean


def test_log_q_of_a_fresh_sample_equals_the_inverted_one():
    """Sampling caches each flow's input, so log q(t|x) of a sample skips the inversion; inverting
    (one pass per dimension) gives the same number, and the base density minus the log-determinants."""
    encoder = flow_encoder(flows=3, latent_dim=5)
    x = torch.rand(4, 1, 8, 8)
    q_t, t = posterior(x, encoder)
    cached = q_t.log_prob(t)
    inverted = q_t.log_prob(t.clone())  # a new tensor: every flow inverts it
    assert torch.allclose(cached, inverted, atol=1e-4), (cached, inverted)
    t_loc, t_scale, h = encoder(x)
    t_f, log_det = t, torch.zeros(4)
    for flow in reversed([f.condition(h) for f in encoder.posterior.flows]):
        t_before = flow.inv(t_f.clone())
        log_det += flow.log_abs_det_jacobian(t_before, t_f)
        t_f = t_before
    by_hand = torch.distributions.Normal(t_loc, t_scale).log_prob(t_f).sum(-1) - log_det
    assert torch.allclose(cached, by_hand, atol=1e-4)


def test_importance_weights_take_the_flow_posteriors_log_density():
    """log_weights (the IW bound, anomaly scores, every evaluation) scores each particle by log q(t|x) of
    the flow posterior: the base density at t_0 minus the flows' log-determinants, each flow inverted
    by hand here; the trained flows of a short run are too close to the identity to show a wrong one."""
    encoder = flow_encoder(flows=3, latent_dim=2)
    decoder = Decoder((1, 8, 8), latent_dim=2, channels=[4], hidden_dim=8, likelihood=Bernoulli())
    x = torch.bernoulli(torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        terms = log_weights(x, encoder, decoder, num_particles=6)
        t_loc, t_scale, h = encoder(x)
        t_f, log_det = terms["t"].clone(), torch.zeros(6, 4)  # (K, B, L): invert every flow, last first
        for flow in reversed([f.condition(h) for f in encoder.posterior.flows]):
            t_before = flow.inv(t_f)
            log_det += flow.log_abs_det_jacobian(t_before, t_f)
            t_f = t_before
        log_q = torch.distributions.Normal(t_loc, t_scale).log_prob(t_f).sum(-1) - log_det
    assert log_det.abs().mean() > 0.1  # these flows are far from volume-preserving: a log q without them shows
    torch.testing.assert_close(terms["log_q"], log_q, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(terms["log_w"], terms["log_p_x"] + terms["log_p_t"] - log_q, atol=1e-4, rtol=1e-5)


@pytest.fixture
def correlated_ppca():
    """Probabilistic PCA whose exact posterior p(t|x) is strongly correlated (two nearly parallel
    columns of W), so the best diagonal Gaussian q(t|x) misses log p(x) by a known gap."""
    generator = torch.Generator().manual_seed(2)
    column = torch.randn(16, 1, generator=generator)
    weight = torch.cat([column, column + 0.15 * torch.randn(16, 1, generator=generator)], 1)  # W (16, 2)
    decoder = LinearGaussianDecoder(weight, torch.zeros(16), sigma=0.5)
    x = decoder(torch.randn(16, 2, generator=generator)).sample()  # (16, 1, 4, 4)
    exact = torch.distributions.MultivariateNormal(torch.zeros(16), weight @ weight.T + 0.25 * torch.eye(16))
    covariance = 0.25 * torch.linalg.inv(weight.T @ weight + 0.25 * torch.eye(2))  # of p(t|x)
    diagonal_gap = 0.5 * (torch.linalg.inv(covariance).diagonal().log().sum() + torch.logdet(covariance))
    return decoder, x, exact.log_prob(x.flatten(1)), diagonal_gap.item()


def fitted_gap(decoder, x, log_px, flows: int, steps: int = 300) -> float:
    """Mean log p(x) - ELBO(x) after fitting an encoder with `flows` flows to the fixed decoder."""
    encoder = flow_encoder(flows=flows, image_shape=(1, 4, 4))
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    svi = SVI(partial(model, decoder=decoder, num_data=len(x)), partial(guide, encoder=encoder, num_data=len(x)),
              pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=1))
    for _ in range(steps):
        svi.step(x, torch.arange(len(x)))
    elbo = log_weights(x, encoder, decoder, 4000)["log_w"].mean(0)  # E_q[log p(x, t) - log q(t|x)], (B,)
    return (log_px - elbo).mean().item()


def test_flows_fit_a_correlated_posterior_that_the_diagonal_gaussian_cannot(correlated_ppca):
    decoder, x, log_px, diagonal_gap = correlated_ppca
    assert diagonal_gap > 1.0  # nats per image the best diagonal Gaussian must lose
    gaussian = fitted_gap(decoder, x, log_px, flows=0)
    flow = fitted_gap(decoder, x, log_px, flows=2)
    assert gaussian > 0.8 * diagonal_gap, (gaussian, diagonal_gap)  # never below the diagonal's own gap
    assert 0 <= flow < 0.3 * diagonal_gap, (flow, gaussian, diagonal_gap)


def test_the_same_config_builds_the_same_flow_masks():
    """The masks and orders are buffers, not in Pyro's param store; a checkpoint restores the
    parameters only, so a rebuilt encoder must have the same buffers whatever the random state."""
    buffers = [dict(flow_encoder(seed=seed).named_buffers()) for seed in (0, 1)]
    assert buffers[0].keys() == buffers[1].keys() and len(buffers[0]) > 0
    assert all(torch.equal(buffers[0][name], buffers[1][name]) for name in buffers[0])


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    return trained_run(tmp_path_factory.mktemp("flow_run"), "posterior=iaf", "trainer.epochs=2", "model.latent_dim=2")


def test_a_flow_run_trains_and_loads_with_its_own_posterior(flow_run):
    elbos = [m["test_elbo"] for m in read_metrics(flow_run)]
    assert len(elbos) == 3 and all(math.isfinite(e) for e in elbos) and elbos[-1] > elbos[0] + 10, elbos
    run = load_run(flow_run, "cpu")
    assert len(run.encoder.posterior.flows) == 2
    x, _ = run.split(train=False)
    q_t, t = posterior(x[:16], run.encoder)
    saved = torch.load(flow_run / "checkpoint.pt", weights_only=False)["param_store"]["params"]
    loaded = dict(run.encoder.named_parameters())
    flow_params = [name for name in loaded if name.startswith("posterior.flows.")]
    assert flow_params and all(torch.equal(loaded[name], saved["encoder$$$" + name])
                               for name in flow_params)  # the flows' trained weights came back
    assert torch.isfinite(q_t.log_prob(t)).all()


def flow_code(x: torch.Tensor, encoder: Encoder) -> torch.Tensor:
    """t_loc(x) carried through every flow, written out here: the point the uses of a flow run take."""
    t, _, h = encoder(x)
    for flow in encoder.posterior.flows:
        t = flow.condition(h)(t)
    return t


@pytest.mark.parametrize("task, overrides", [
    ("likelihood", ["task.num_particles=20", "task.max_images=64"]),
    ("generate", ["task.scored_samples=100", "task.classifier_epochs=0"]),
    ("represent", ["task.max_iter=50"]),
    ("anomaly", ["task.num_particles=10", "task.max_images=100"]),
    ("impute", ["task.max_images=16", "task.steps=4", "task.burn_in=1", "task.num_particles=10",
                "task.fit_steps=10", "task.batch_size=16", "task.masks=[top_half]"]),
])
def test_every_task_runs_on_the_flow_posterior(flow_run, tmp_path, task, overrides):
    """Each task takes the flow posterior's own q(t|x), its log-density with the flows' Jacobians, and
    its code through the flows (never the Gaussian before them), checked against hand computations."""
    cfg = compose_config(f"run={flow_run}", f"task={task}", "device=cpu", *overrides, config_name="evaluate")
    metrics = evaluate_run(cfg, tmp_path)
    run = load_run(flow_run, "cpu")
    x, labels = run.split(train=False)
    with torch.no_grad():
        codes = flow_code(x[:64], run.encoder)
        assert (codes - run.encoder(x[:64])[0]).abs().max() > 0.1  # the flows move the code: the checks below can tell
    if task == "likelihood":  # the IW estimate by hand, each flow inverted for log q(t|x) (no cached sample)
        torch.manual_seed(1)
        with torch.no_grad():
            q_t, _ = posterior(x[:64], run.encoder)
            t = q_t.sample((20,))  # (K, B, L)
            log_p_x = run.decoder(t.flatten(0, 1)).log_prob(x[:64].repeat(20, 1, 1, 1)).view(20, 64)
            log_w = log_p_x + torch.distributions.Normal(0.0, 1.0).log_prob(t).sum(-1) - q_t.log_prob(t.clone())
        nll = -(log_w.logsumexp(0) - math.log(20)).mean().item()
        assert metrics["nll"] == pytest.approx(nll, abs=0.3), nll  # other draws: measured within 0.11 over 3 seeds
        assert metrics["elbo_k_samples"] == pytest.approx(log_w.mean().item(), abs=0.3)
    if task == "generate":  # test images above E[x|t] at their flow codes, read back from the PNG
        with torch.no_grad():
            shown = torch.cat([x[:16], run.decoder(codes[:16]).mean])
        assert_png_shows(tmp_path / "reconstructions.png", shown, nrow=16)
        assert "sample_confident_share" not in metrics  # classifier_epochs=0: no judge
    if task == "represent":
        saved = np.load(tmp_path / "latents_test.npz")
        torch.testing.assert_close(torch.from_numpy(saved["t_loc"][:64]), codes, atol=1e-5, rtol=1e-5)
        assert np.array_equal(saved["labels"], labels.numpy())
        assert metrics["linear_probe_accuracy"] > 0.3  # 10 sectors: chance is about 0.1
    if task == "anomaly":
        rows = {row["anomalies"]: row for row in metrics["detection"]}
        for name in ("noise", "inverted"):  # measured 1.000 for both scores
            assert rows[name]["iw_nll"]["auroc"] > 0.99 and rows[name]["neg_elbo"]["auroc"] > 0.99, rows[name]
        assert_detection_is_the_saved_scores(metrics, tmp_path)
    if task == "impute":  # the one pass decodes the flow code of x~ (the mean image filled in), by hand
        x, mask = x[:16], make_mask("top_half", (16, 1, 16, 16))
        mean = load_split(run.cfg.data, train=True)[0].mean(0)
        with torch.no_grad():
            one_pass = run.decoder(flow_code(torch.where(mask, x, mean), run.encoder)).mean
        errors = metrics["errors"]["top_half"]
        assert errors["one_pass"]["mse"] == pytest.approx((one_pass - x)[~mask].pow(2).mean().item(), rel=1e-4)
        assert errors["mean_image"]["mse"] == pytest.approx((mean - x)[~mask].pow(2).mean().item(), rel=1e-4)


def test_flows_with_a_score_function_estimator_are_refused():
    with pytest.raises(ConfigError, match="posterior._target_=vae.flows.InverseAutoregressive with "
                                          "estimator.reparameterized=false: a flow posterior is trained"):
        check_config(compose_config(*FAST, "posterior=iaf", "estimator=score"))
    for key, value in (("flows", "0"), ("flows", "-1"), ("flows", "1.5"), ("hidden_dims", "[0]"), ("hidden_dims", "8")):
        with pytest.raises(ConfigError, match=rf"^posterior.{key}={value.replace('[', '.')}"):
            check_config(compose_config(*FAST, "posterior=iaf", f"posterior.{key}={value}"))
    check_config(compose_config(*FAST, "posterior=iaf", "posterior.flows=1", "posterior.hidden_dims=[8]"))


def test_the_importance_weighted_bound_takes_the_flow_posterior():
    """estimator=iwae with flows: K vectorized particles go through the flows (the context h is
    broadcast over them), and the bound climbs with K, as it must for a proper q(t|x)."""
    encoder = flow_encoder(image_shape=(1, 4, 4))
    decoder = LinearGaussianDecoder(torch.randn(16, 2), torch.zeros(16), sigma=0.5)
    x = torch.randn(6, 1, 4, 4)
    bounds = {}
    for k in (1, 50):
        pyro.set_rng_seed(0)
        bounds[k] = -IWAE_ELBO(num_particles=k).loss(partial(model, decoder=decoder, num_data=6),
                                                     partial(guide, encoder=encoder, num_data=6), x, torch.arange(6))
    assert math.isfinite(bounds[1]) and bounds[50] > bounds[1] + 1.0, bounds
