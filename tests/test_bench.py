"""The benchmark compares like with like, and runs end to end on a tiny config."""
from __future__ import annotations

import re
import statistics

import pyro
import pytest
import torch
from hydra.utils import instantiate

from bench import bench, raw_step, summary, table
from conftest import FAST, compose_config
from vae.build import build_likelihood, build_svi, svi_step
from vae.config import ConfigError

IMAGE_SHAPE = (1, 16, 16)


def networks(cfg):
    torch.manual_seed(0)
    encoder = instantiate(cfg.model.encoder, image_shape=IMAGE_SHAPE)
    decoder = instantiate(cfg.model.decoder, image_shape=IMAGE_SHAPE,
                          likelihood=build_likelihood(cfg.likelihood, IMAGE_SHAPE[0]))
    return encoder, decoder


@pytest.mark.parametrize("optim", ["adam", "clipped_adam"])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_raw_step_is_the_svi_step(optim, likelihood):
    """(a) is the same objective and update as (b): equal loss, equal weights after a step."""
    cfg = compose_config(*FAST, f"optim={optim}", f"likelihood={likelihood}")
    x = torch.rand(8, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(1))
    if likelihood == "bernoulli":
        x = torch.bernoulli(x)
    num_data = 100

    raw_encoder, raw_decoder = networks(cfg)
    raw_params = [*raw_encoder.parameters(), *raw_decoder.parameters()]
    optimizer = instantiate(cfg.optim)
    raw_optimizer = optimizer.pt_optim_constructor(raw_params, **optimizer.pt_optim_args)
    svi_encoder, svi_decoder = networks(cfg)
    svi = build_svi(cfg, svi_encoder, svi_decoder, num_data)

    for step in range(3):
        torch.manual_seed(step)  # the same eps for both
        raw_loss = raw_step(raw_encoder, raw_decoder, raw_optimizer, x, num_data)
        torch.manual_seed(step)
        svi_loss = svi_step(svi, x, torch.arange(len(x)))
        assert raw_loss == pytest.approx(svi_loss, rel=1e-5)
    svi_params = [*svi_encoder.parameters(), *svi_decoder.parameters()]
    for raw_param, svi_param in zip(raw_params, svi_params):
        torch.testing.assert_close(raw_param, svi_param)
    assert any((p - q).abs().max() > 0 for p, q in zip(raw_params, networks(cfg)[0].parameters()))  # it moved


def pyro_svi_step(svi, x, index):
    return svi.step(x, index)


@pytest.mark.parametrize("estimator", ["reparam", "score_nn_baseline"])
def test_svi_step_is_svi_dot_step_with_the_gradients_released(estimator):
    """train.svi_step gives the losses and weights of Pyro's svi.step to the last bit, and leaves
    .grad None where svi.step leaves zero tensors (which the next backward pass adds into)."""
    cfg = compose_config(*FAST, f"estimator={estimator}")
    x = torch.bernoulli(torch.rand(8, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(1)))
    index = torch.arange(len(x))
    runs = {}
    for name, step in {"svi.step": pyro_svi_step, "svi_step": svi_step}.items():
        with pyro.get_param_store().scope():
            svi = build_svi(cfg, *networks(cfg), num_data=100)  # the NVIL baseline net is seeded too
            losses = []
            for step_number in range(3):
                torch.manual_seed(step_number)
                losses.append(step(svi, x, index))
            store = pyro.get_param_store()
            weights = {param: value.detach().clone() for param, value in store.items()}
            grads = [value.unconstrained().grad for value in store.values()]
        runs[name] = losses, weights, grads
    (pyro_losses, pyro_weights, pyro_grads), (losses, weights, grads) = runs["svi.step"], runs["svi_step"]
    assert losses == pyro_losses
    assert weights.keys() == pyro_weights.keys()
    for param, value in weights.items():
        assert torch.equal(value, pyro_weights[param]), param
    zeroed = [grad for grad in pyro_grads if grad is not None]  # Pyro's zero_grads: zero tensors
    assert len(zeroed) >= 16 and not any(grad.any() for grad in zeroed)
    assert all(grad is None for grad in grads)


def test_ratio_to_raw_is_paired_by_round():
    """A slow stretch of the machine that hits both steps of a round cancels in the ratio; one that
    starts between them (round 3) is one outlier among five, not a shift of the median."""
    raw = [1.0, 1.0, 1.0, 2.0, 2.0]
    variant = [1.05, 1.05, 2.1, 2.1, 2.1]
    result = summary(variant, raw)
    assert result["ratio_to_raw"] == pytest.approx(1.05)  # median(variant) / median(raw) would say 2.1
    assert result["median_ms"] == pytest.approx(2100.0)
    assert result["ratio_iqr"] == pytest.approx(0.525)  # quartiles 1.05 and 1.575 (statistics.quantiles)
    assert summary(raw, raw)["ratio_to_raw"] == 1.0


def test_bench_times_every_variant():
    variants = {"reparam": ["estimator=reparam"], "score": ["estimator=score"]}
    overrides = [*FAST, "bench.rounds=2", "bench.warmup_rounds=1", "bench.steps_per_round=2",
                 "bench.eval_images=2", "bench.eval_particles=50"]
    cfg = compose_config(*overrides, config_name="bench")
    variant_configs = {name: compose_config(*overrides, *extra, config_name="bench") for name, extra in variants.items()}
    report = bench(cfg, variant_configs)
    results = report["results"]
    assert list(results) == ["raw", "reparam", "score", "data", "eval_iw", "eval_decoder", "eval_iw_flows"]
    assert results["raw"]["ratio_to_raw"] == 1.0 and results["raw"]["ratio_iqr"] == 0.0
    raw_seconds = results["raw"]["seconds_per_round"]
    iqr = lambda values: statistics.quantiles(values, n=4)[2] - statistics.quantiles(values, n=4)[0]  # noqa: E731
    for name, result in results.items():
        seconds = result["seconds_per_round"]
        assert len(seconds) == 2  # bench.rounds=2, after the warm-up round
        assert result["median_ms"] == pytest.approx(1e3 * statistics.median(seconds))
        assert result["iqr_ms"] == pytest.approx(1e3 * iqr(seconds))
        # the ratio is taken within each round (paired), then the median and IQR over rounds
        ratios = [s / r for s, r in zip(seconds, raw_seconds)]
        assert result["ratio_to_raw"] == pytest.approx(statistics.median(ratios))
        assert result["ratio_iqr"] == pytest.approx(iqr(ratios), abs=1e-12)
    assert report["data_fraction_of_step"] == results["data"]["ratio_to_raw"]
    assert results["data"]["median_ms"] < results["raw"]["median_ms"]  # a batch costs less than a step
    evaluation = report["evaluation"]
    assert evaluation["decoder_images_per_second"] > evaluation["iw_images_per_second"]  # IW decodes too
    iw_seconds = results["eval_iw"]["seconds_per_round"]
    assert evaluation["iw_images_per_second"] == pytest.approx(evaluation["images"] / statistics.median(iw_seconds))
    assert evaluation["iw_throughput_fraction_of_decoder"] == pytest.approx(statistics.median(
        d / i for d, i in zip(results["eval_decoder"]["seconds_per_round"], iw_seconds)))
    flows, gaussian = results["eval_iw_flows"]["seconds_per_round"], results["eval_iw"]["seconds_per_round"]
    assert evaluation["flows"] == 2  # conf/bench.yaml: the flow posterior's time per image, paired by round
    assert evaluation["flow_time_ratio"] == pytest.approx(statistics.median(f / g for f, g in zip(flows, gaussian)))
    assert "with 2 flows in q(t|x)" in table(report)
    without = bench(compose_config(*overrides, "bench.eval_flows=0", config_name="bench"), {})
    assert "eval_iw_flows" not in without["results"] and "flows" not in without["evaluation"]
    assert report["machine"]["torch"] == torch.__version__
    assert "reparam" in table(report)


@pytest.mark.parametrize("override", ["bench.rounds=0", "bench.steps_per_round=0", "bench.warmup_rounds=-1",
                                      "bench.eval_flows=-1"])
def test_bench_refuses_settings_that_time_nothing(override):
    cfg = compose_config(*FAST, override, config_name="bench")
    with pytest.raises(ConfigError, match=rf"^{re.escape(override.split('=')[0])}="):
        bench(cfg, {})
