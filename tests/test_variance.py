"""The variance-reduced score-function estimators and variance.py, on a tiny model.

Known answers: every estimator estimates the same gradient (means agree with reparam within
Monte-Carlo error); the decoder's gradient does not depend on how the encoder's is estimated,
so its variance is the same for score and reparam, and K particles divide it by K; the
baselines cut the encoder's score-function variance. Then variance.py end to end, and the
config checks that keep estimator and ELBO consistent.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pyro
import pytest
import torch
from conftest import FAST, PROJECT_DIR, compose_config, process_starts

from train import train
from variance import estimator_moments, gradient_moments, variance
from vae.build import build_networks
from vae.config import ConfigError, check_config
from vae.provenance import read_provenance

TINY = ["model.channels=[2]", "model.hidden_dim=4", "model.latent_dim=2"]
IMAGE_SHAPE = (1, 4, 4)
BATCH = 3
ESTIMATORS = ["reparam", "score", "score_avg_baseline", "score_nn_baseline", "score_loo"]
LOO_PARTICLES = ([], ["estimator.elbo.num_particles=4"])  # fewer particles: a faster test


@pytest.fixture(scope="module")
def moments():
    """{estimator: {"encoder"/"decoder": (mean, variance)}} from the same tiny networks and images."""
    pyro.set_rng_seed(1)
    cfg = compose_config(*TINY)
    encoder, decoder = build_networks(cfg, IMAGE_SHAPE, torch.device("cpu"))
    weights = [encoder.state_dict(), decoder.state_dict()]
    x_train = torch.bernoulli(torch.full((12, *IMAGE_SHAPE), 0.4))  # the first BATCH are measured
    samples = {"reparam": 500, "score": 300}
    result = {}
    for name in ESTIMATORS:
        pyro.clear_param_store()
        pyro.set_rng_seed(2)
        encoder.load_state_dict(weights[0])
        decoder.load_state_dict(weights[1])
        cfg = compose_config(*TINY, f"estimator={name}", *LOO_PARTICLES[name == "score_loo"])
        result[name] = estimator_moments(cfg, encoder, decoder, x_train, BATCH, samples.get(name, 150), 50)
    return result, samples


def z_scores(a: tuple, b: tuple, n_a: int, n_b: int) -> torch.Tensor:
    """(difference of means) / (its standard error), over coordinates that vary."""
    standard_error = (a[1] / n_a + b[1] / n_b).sqrt()
    varies = standard_error > 0
    return (a[0] - b[0])[varies] / standard_error[varies]


@pytest.mark.parametrize("name", ESTIMATORS[1:])
def test_every_estimator_agrees_with_reparam(moments, name):
    result, samples = moments
    for net in ("encoder", "decoder"):
        z = z_scores(result[name][net], result["reparam"][net], samples.get(name, 150), samples["reparam"])
        assert z.abs().max() < 4.5, (net, z)
        assert (z**2).mean() < 2.5, (net, z)  # about 1 when both estimate the same mean


def test_baselines_cut_the_score_function_variance(moments):
    result, _ = moments
    encoder_variance = {name: result[name]["encoder"][1].mean().item() for name in ESTIMATORS}
    assert encoder_variance["score"] > 10 * encoder_variance["reparam"], encoder_variance
    for name in ("score_avg_baseline", "score_nn_baseline", "score_loo"):
        assert encoder_variance[name] < encoder_variance["score"] / 3, encoder_variance


def test_decoder_variance_depends_only_on_the_particles(moments):
    """grad_theta log p(x|t), t ~ q(t|x), whatever the encoder's estimator: same variance for
    score and reparam, and 1/K of it with K particles."""
    result, _ = moments
    decoder_variance = {name: result[name]["decoder"][1].mean().item() for name in ESTIMATORS}
    assert decoder_variance["score"] / decoder_variance["reparam"] == pytest.approx(1, abs=0.2)
    assert decoder_variance["score_loo"] * 4 / decoder_variance["reparam"] == pytest.approx(1, abs=0.35)


def test_gradient_moments_are_the_sample_mean_and_variance():
    draws = torch.randn(50, 7, dtype=torch.float64) * torch.arange(1, 8) + 3
    it = iter(draws)
    mean, variance = gradient_moments(lambda: next(it), len(draws))
    assert torch.allclose(mean, draws.mean(0)) and torch.allclose(variance, draws.var(0))


def test_variance_cli_reads_every_kept_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    train(compose_config(*FAST, "trainer.epochs=2", "data.subset=128", "trainer.keep_checkpoints=true"), run_dir)
    assert sorted(p.name for p in run_dir.glob("checkpoint_epoch_*.pt")) == [
        "checkpoint_epoch_000.pt", "checkpoint_epoch_001.pt", "checkpoint_epoch_002.pt"]
    out = tmp_path / "estimators_variance"
    result = subprocess.run(
        [sys.executable, "variance.py", f"run={run_dir}", "estimators=[reparam,score]", "samples=10",
         "batch_size=8", "threads=1", f"hydra.run.dir={out}"], cwd=PROJECT_DIR, capture_output=True, text=True,
        timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert read_provenance(out)[-1]["threads"] == 1  # it ran on the threads it was given, not all cores
    points = json.loads((out / "variance.json").read_text())
    assert [p["epoch"] for p in points] == [0, 1, 2]
    for point in points:
        score, reparam = point["estimators"]["score"], point["estimators"]["reparam"]
        assert reparam["encoder"]["ratio_to_reparam"] == 1
        assert score["encoder"]["ratio_to_reparam"] > 10
        assert score["encoder"]["snr"] < reparam["encoder"]["snr"]
    assert (out / "variance.png").stat().st_size > 0


def test_nn_baseline_run_resumes_exactly(tmp_path):
    """The baseline network's weights come back from the checkpoint, like the encoder's."""
    overrides = [*FAST, "estimator=score_nn_baseline", "data.subset=128"]
    train(compose_config(*overrides, "trainer.epochs=2"), tmp_path / "straight")
    straight = {name: value.detach().clone() for name, value in pyro.get_param_store().items()}
    assert any(name.startswith("baseline$$$") for name in straight)
    pyro.clear_param_store()
    train(compose_config(*overrides, "trainer.epochs=1"), tmp_path / "split")
    pyro.clear_param_store()
    train(compose_config(*overrides, "trainer.epochs=2", f"resume={tmp_path / 'split'}"), tmp_path / "ignored")
    assert process_starts(tmp_path / "split") == [(1, 0), (2, 0)]  # resumed after epoch 1, not trained again
    assert not (tmp_path / "ignored").exists()
    for name, value in pyro.get_param_store().items():
        assert torch.equal(value, straight[name]), name


@pytest.mark.parametrize("overrides,keys", [
    (["estimator=score", "estimator.elbo._target_=pyro.infer.TraceMeanField_ELBO"],
     ["estimator.elbo._target_=pyro.infer.TraceMeanField_ELBO", "estimator.reparameterized=false"]),
    (["estimator=score_avg_baseline", "estimator.elbo._target_=pyro.infer.Trace_ELBO"],
     ["estimator.baseline", "estimator.elbo._target_=pyro.infer.Trace_ELBO"]),
    (["estimator=score_nn_baseline", "estimator.reparameterized=true"],
     ["estimator.baseline_net", "estimator.reparameterized=True"]),
    (["estimator=score_avg_baseline", "data.drop_last=false"],
     ["estimator.baseline.use_decaying_avg_baseline=true", "data.drop_last=false"]),
    (["trainer.channels_last=true", "estimator.elbo._target_=pyro.infer.JitTrace_ELBO"],
     ["trainer.channels_last=true", "estimator.elbo._target_=pyro.infer.JitTrace_ELBO"]),
], ids=["analytic-kl-with-score", "baseline-without-tracegraph", "baseline-with-reparam", "avg-baseline-partial-batch",
        "jit-with-channels-last"])
def test_inconsistent_estimator_fails_early_naming_the_keys(overrides, keys):
    with pytest.raises(ConfigError) as error:
        check_config(compose_config(*overrides))
    message = str(error.value)
    assert "\n" not in message and all(key in message for key in keys), message


def test_avg_baseline_drops_the_partial_batch():
    assert compose_config("estimator=score_avg_baseline").data.drop_last is True
    assert compose_config("estimator=score_nn_baseline").data.drop_last is True
    assert compose_config("estimator=score").data.drop_last is False


def test_a_minibatch_larger_than_the_data_is_refused(tmp_path):
    cfg = compose_config(*FAST, "data.subset=64", "estimators=[reparam]", "samples=2", "batch_size=100000",
                         config_name="variance")
    with pytest.raises(ConfigError, match=r"^batch_size=100000: larger than the 64 training images$"):
        variance(cfg, {"reparam": compose_config("estimator=reparam").estimator}, tmp_path)


def test_with_baselines_hands_site_t_its_options_and_n_over_b_times_b_x():
    """vae/baselines.py gives the guide's site "t" Pyro's baseline options and baseline_value = N/B * b(x)
    from outside guide.guide; without baselines the guide is handed back as it is."""
    import pyro.poutine as poutine

    from guide import Encoder, guide
    from vae.baselines import BaselineNet, with_baselines

    encoder, net = Encoder(IMAGE_SHAPE, 2, channels=[2], hidden_dim=4), BaselineNet(IMAGE_SHAPE, hidden_dim=4)
    x, index = torch.rand(3, *IMAGE_SHAPE), torch.tensor([0, 5, 9])
    options = {"use_decaying_avg_baseline": True, "baseline_beta": 0.9}
    wrapped = with_baselines(guide, 12, options, net)
    site = poutine.trace(wrapped).get_trace(x, index, encoder, 12, False).nodes["t"]
    baseline = site["infer"]["baseline"]
    assert {k: v for k, v in baseline.items() if k != "baseline_value"} == options
    torch.testing.assert_close(baseline["baseline_value"], 12 / 3 * net(x))
    assert "baseline$$$net.1.weight" in pyro.get_param_store()  # trained with the guide
    assert with_baselines(guide, 12) is guide
    plain = poutine.trace(guide).get_trace(x, index, encoder, 12, False).nodes["t"]
    assert "baseline" not in plain["infer"]


def test_a_checkpoint_naming_the_baseline_network_where_it_was_resumes(tmp_path):
    """Runs saved while BaselineNet lived in guide.py name `guide.BaselineNet`: their config is read with
    the class where it is now, so they resume and evaluate as before."""
    from vae import checkpoint as checkpoint_module

    overrides = [*FAST, "estimator=score_nn_baseline", "data.subset=128"]
    train(compose_config(*overrides, "trainer.epochs=1"), tmp_path)
    path = tmp_path / "checkpoint.pt"
    contents = torch.load(path, weights_only=False)
    contents["config"]["estimator"]["baseline_net"]["_target_"] = "guide.BaselineNet"  # as an older run wrote it
    torch.save(contents, path)
    assert checkpoint_module.saved_config(contents).estimator.baseline_net._target_ == "vae.baselines.BaselineNet"
    pyro.clear_param_store()
    train(compose_config(*overrides, "trainer.epochs=2"), tmp_path)
    assert process_starts(tmp_path) == [(1, 0), (2, 0)]
