"""The benchmark compares like with like, and runs end to end on a tiny config."""
from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from bench import bench, raw_step, table
from conftest import FAST, compose_config
from train import build_svi

IMAGE_SHAPE = (1, 16, 16)


def networks(cfg):
    torch.manual_seed(0)
    encoder = instantiate(cfg.model.encoder, image_shape=IMAGE_SHAPE)
    decoder = instantiate(cfg.model.decoder, image_shape=IMAGE_SHAPE)
    return encoder, decoder


@pytest.mark.parametrize("optim", ["adam", "clipped_adam"])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_raw_step_is_the_svi_step(optim, likelihood):
    """(a) is the same objective and update as (b): equal loss, equal weights after a step."""
    cfg = compose_config(*FAST, f"optim={optim}", f"model.likelihood={likelihood}")
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
        svi_loss = svi.step(x, torch.arange(len(x)))
        assert raw_loss == pytest.approx(svi_loss, rel=1e-5)
    svi_params = [*svi_encoder.parameters(), *svi_decoder.parameters()]
    for raw_param, svi_param in zip(raw_params, svi_params):
        torch.testing.assert_close(raw_param, svi_param)
    assert any((p - q).abs().max() > 0 for p, q in zip(raw_params, networks(cfg)[0].parameters()))  # it moved


def test_bench_times_every_variant():
    variants = {"reparam": ["estimator=reparam"], "score": ["estimator=score"]}
    overrides = [*FAST, "bench.rounds=2", "bench.warmup_rounds=1", "bench.steps_per_round=2",
                 "bench.eval_images=2", "bench.eval_particles=50"]
    cfg = compose_config(*overrides, config_name="bench")
    variant_configs = {name: compose_config(*overrides, *extra, config_name="bench") for name, extra in variants.items()}
    report = bench(cfg, variant_configs)
    results = report["results"]
    assert list(results) == ["raw", "reparam", "score", "data", "eval_iw", "eval_decoder"]
    assert results["raw"]["ratio_to_raw"] == 1.0
    for name, result in results.items():
        assert result["median_ms"] > 0 and result["iqr_ms"] >= 0
        assert result["ratio_to_raw"] == pytest.approx(result["median_ms"] / results["raw"]["median_ms"])
    assert results["data"]["median_ms"] < results["raw"]["median_ms"]  # a batch costs less than a step
    evaluation = report["evaluation"]
    assert evaluation["decoder_images_per_second"] > evaluation["iw_images_per_second"] > 0  # IW decodes too
    assert report["machine"]["torch"] == torch.__version__
    assert "reparam" in table(report)
