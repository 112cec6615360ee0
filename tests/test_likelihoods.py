"""The likelihoods of gray levels (Gaussian on dequantized pixels, discretized logistic on the 256
levels) and where their scale comes from; the 8-bit datasets besides MNIST on generated stand-ins in
torchvision's layouts (Fashion-MNIST, CIFAR-10); every evaluation task with every likelihood."""
from __future__ import annotations

import logging
import math
import pickle
import struct

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
from conftest import FAST, assert_png_shows, compose_config, trained_run

import evaluate as evaluate_module
from guide import Encoder
from model import Decoder, likelihood, mean_image
from tasks.generate import drawn_samples, prior_samples
from tasks.impute import make_mask
from test_evaluate import assert_detection_is_the_saved_scores
from train import train
from vae.config import ConfigError, check_config
from vae.data import bits_per_dim, load_split, observe
from model import LEVELS, DiscretizedLogistic, DiscretizedLogisticMixture, logit_gaussian, logit_gaussian_mean
from vae.elbo import dataset_elbo
from vae.logbook import Logbook
from vae.runs import load_run

LEVEL_VALUES = torch.arange(LEVELS) / (LEVELS - 1)  # 0, 1/255, ..., 1


def level_probabilities(loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """P(level) (B, 256) of B discretized logistics."""
    return DiscretizedLogistic(loc[:, None].expand(-1, LEVELS), scale[:, None].expand(-1, LEVELS)).log_prob(
        LEVEL_VALUES.expand(len(loc), -1)).exp()


def test_discretized_logistic_is_a_distribution_over_the_256_levels():
    loc = torch.tensor([-0.3, 0.0, 0.2, 0.5, 0.5, 0.99, 1.4])
    scale = torch.tensor([0.05, 1e-4, 0.3, 1e-3, 20.0, 0.01, 0.05])
    probabilities = level_probabilities(loc, scale)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(len(loc)), atol=1e-5, rtol=0)
    # each level's mass is the logistic CDF's increase over its bin, the end bins taking the tails
    cdf = lambda y: torch.sigmoid((y - loc[3]) / scale[2])  # noqa: E731 (one of them, by hand)
    by_hand = DiscretizedLogistic(loc[3], scale[2]).log_prob(torch.tensor(100 / 255)).exp()
    torch.testing.assert_close(by_hand, cdf(torch.tensor(100.5 / 255)) - cdf(torch.tensor(99.5 / 255)))
    assert probabilities[0, 0] > 0.99 and probabilities[6, -1] > 0.99  # loc beyond an end: its end level
    assert probabilities[1, 0] > 0.999  # a scale far below the bin: all the mass on the nearest level
    torch.testing.assert_close(DiscretizedLogistic(loc, scale).mean, (probabilities * LEVEL_VALUES).sum(1),
                               atol=1e-5, rtol=0)


def test_discretized_logistic_samples_follow_its_probabilities():
    loc, scale = torch.tensor([0.3]), torch.tensor([0.02])
    draws = DiscretizedLogistic(loc, scale).sample((200_000,))[:, 0]  # (S,)
    levels = torch.round(draws * 255).long()
    assert torch.equal(levels.float() / 255, draws)  # every draw is a level
    frequencies = torch.bincount(levels, minlength=LEVELS).float() / len(draws)
    expected = level_probabilities(loc, scale)[0]
    assert (frequencies - expected).abs().max() < 4 * math.sqrt(expected.max() / len(draws))


def test_discretized_logistic_log_prob_and_its_gradient_stay_finite_at_extremes():
    loc = torch.tensor([-5.0, 5.0, 0.5, 0.5, 0.0, 1.0], requires_grad=True)
    scale = torch.tensor([1e-4, 1e-4, 1e-5, 50.0, 1e-3, 1e-3], requires_grad=True)
    value = torch.tensor([1.0, 0.0, 0.2, 0.5, 0.0, 1.0])  # far-off levels, a tiny and a huge scale, the ends
    log_p = DiscretizedLogistic(loc, scale).log_prob(value)
    assert torch.isfinite(log_p).all() and (log_p <= 0).all()
    assert log_p[0] < -1e4 and log_p[4] > -0.7  # far from loc: very unlikely; at an end: likely
    log_p.sum().backward()
    assert torch.isfinite(loc.grad).all() and torch.isfinite(scale.grad).all()


def test_bits_per_dim_of_a_uniform_model_is_eight():
    shape = (1, 28, 28)
    dims = math.prod(shape)
    assert bits_per_dim(dims * math.log(1 / 256), shape, "discretized_logistic") == pytest.approx(8.0)
    assert bits_per_dim(0.0, shape, "gaussian") == pytest.approx(8.0)  # the uniform density on [0, 1)
    # any value: -log p / (D ln 2) of nats, plus the 8 bits of a level's bin for a density of dequantized pixels
    assert bits_per_dim(-1234.5, (3, 32, 32), "discretized_logistic") == pytest.approx(1234.5 / (3072 * math.log(2)))
    for name in ("gaussian", "logit_gaussian"):
        assert bits_per_dim(-1234.5, (3, 32, 32), name) == pytest.approx(1234.5 / (3072 * math.log(2)) + 8)


@pytest.mark.parametrize("likelihood_name", ["gaussian", "logit_gaussian", "discretized_logistic"])
@pytest.mark.parametrize("scale", ["pixel", "shared", "fixed"])
def test_the_scale_comes_from_the_network_a_parameter_or_the_config(likelihood_name, scale):
    decoder = Decoder((3, 8, 8), latent_dim=2, channels=[4], hidden_dim=8, likelihood=likelihood_name, scale=scale,
                      min_scale=1e-3, fixed_scale=0.2)
    t = torch.randn(5, 2)
    x_loc, x_scale = decoder(t)
    assert x_loc.shape == x_scale.shape == (5, 3, 8, 8)
    with torch.no_grad():
        out = decoder.upsample(decoder.lift(t))  # the raw output: (loc, scale) channels for "pixel", loc alone else
    raw_loc, raw_scale = out.chunk(2, dim=-3) if scale == "pixel" else (out, getattr(decoder, "raw_scale", None))
    torch.testing.assert_close(x_loc, torch.sigmoid(raw_loc) if likelihood_name == "gaussian" else raw_loc)  # sigmoid
    if scale == "fixed":
        assert (x_scale == 0.2).all()
        assert not any("scale" in name for name, _ in decoder.named_parameters())
    else:  # min_scale + softplus(raw), and the floor itself (not below it) where the raw output is pushed down
        torch.testing.assert_close(x_scale, (1e-3 + torch.nn.functional.softplus(raw_scale)).expand_as(x_scale))
        pushed = decoder.raw_scale if scale == "shared" else decoder.upsample[-1].bias[3:]  # the scale's raw output
        with torch.no_grad():
            pushed.fill_(-200.0)  # softplus(-200 + ...) is 0 in float32
            assert (decoder(t)[1] == 1e-3).all()
            pushed.fill_(0.0)
    if scale == "shared":  # one learned scale per channel, equal over images and pixels
        assert torch.equal(x_scale, x_scale[:1, :, :1, :1].expand_as(x_scale))
        x = observe(torch.rand(5, 3, 8, 8), likelihood_name)
        likelihood(decoder, t).log_prob(x).sum().backward()
        assert decoder.raw_scale.grad.abs().min() > 0  # it is trained


def test_logit_gaussian_is_a_density_on_the_unit_interval_with_its_mean_by_quadrature():
    y_loc, y_scale = torch.tensor([-4.0, 0.0, 1.5]), torch.tensor([0.5, 2.0, 0.05])
    p_x = logit_gaussian(y_loc, y_scale, squeeze=1e-3)
    grid = (torch.arange(200_000, dtype=torch.float64) + 0.5) / 200_000  # midpoints on (0, 1)
    density = p_x.log_prob(grid[:, None].float()).double().exp()  # (200000, 3)
    torch.testing.assert_close(density.mean(0), torch.ones(3, dtype=torch.float64), atol=2e-3, rtol=0)  # integrates to 1
    u = 1e-3 + (1 - 2e-3) * grid[:, None]
    by_hand = torch.distributions.Normal(y_loc.double(), y_scale.double()).log_prob(torch.log(u / (1 - u))) \
        + math.log(1 - 2e-3) - torch.log(u * (1 - u))  # log N(logit u) + log |d logit u / dx|
    torch.testing.assert_close(p_x.log_prob(grid[:, None].float()).double(), by_hand, atol=1e-3, rtol=1e-4)
    draws = p_x.sample((200_000,))
    torch.testing.assert_close(logit_gaussian_mean(y_loc, y_scale, 1e-3), draws.mean(0), atol=3e-3, rtol=0)


def test_observations_follow_the_likelihood_rule():
    intensities = torch.randint(0, LEVELS, (4, 1, 6, 6)) / 255
    assert torch.equal(observe(intensities, "discretized_logistic"), intensities)  # the levels as they are
    assert torch.equal(observe(torch.tensor([0.1001]), "discretized_logistic"), torch.tensor([round(0.1001 * 255) / 255]))
    dequantized = observe(intensities, "gaussian")
    assert ((dequantized * 256).floor() == torch.round(intensities * 255)).all()  # inside its level's bin


def write_idx(path, array: np.ndarray) -> None:
    """An IDX file (MNIST's format) of unsigned bytes."""
    path.write_bytes(struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
                     + array.astype(np.uint8).tobytes())


def fashion_mnist_standin(root, rng) -> None:
    """Random 28x28 images in torchvision's FashionMNIST layout (root/FashionMNIST/raw/*-ubyte)."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for split, count in (("train", 256), ("t10k", 64)):
        write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (count, 28, 28)))
        write_idx(raw / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, count))


def cifar10_standin(root, rng, monkeypatch) -> None:
    """Random 32x32x3 images in torchvision's CIFAR10 layout (root/cifar-10-batches-py, pickled batches);
    torchvision checks the real files' MD5 sums, which a stand-in cannot have, so that check is skipped."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {"data": rng.integers(0, 256, (40, 3 * 32 * 32), dtype=np.uint8), "labels": rng.integers(0, 10, 40).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class {i}" for i in range(10)]}))
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)


SMALL = ["model.channels=[8,16]", "model.hidden_dim=32", "model.latent_dim=4", "trainer.epochs=1",
         "data.batch_size=32", "device=cpu", "data.dataset.download=false"]


@pytest.mark.parametrize("data, shape, likelihood_name", [("fashion_mnist", (1, 28, 28), "gaussian"),
                                                          ("cifar10", (3, 32, 32), "discretized_logistic"),
                                                          ("cifar10", (3, 32, 32), "gaussian")])
def test_other_datasets_train_from_torchvision_layouts(data, shape, likelihood_name, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    if data == "cifar10":
        cifar10_standin(tmp_path / "data", rng, monkeypatch)
    else:
        fashion_mnist_standin(tmp_path / "data", rng)
    cfg = compose_config(f"data={data}", f"data.root={tmp_path / 'data'}", f"model.likelihood={likelihood_name}", *SMALL)
    images, labels = load_split(cfg.data, train=False)
    assert images.shape[1:] == shape and len(labels) == len(images)
    assert torch.equal(images * 255, torch.round(images * 255))  # 8-bit levels
    metrics = train(cfg, tmp_path / "run")
    assert metrics["epoch"] == 1 and math.isfinite(metrics["test_elbo"])
    # bits/dim of the test ELBO by hand: nats per image over D ln 2, plus a level's 8 bits for a density of
    # dequantized pixels
    dims, offset = math.prod(shape), (math.log(256) if likelihood_name == "gaussian" else 0.0)
    by_hand = (-metrics["test_elbo"] / dims + offset) / math.log(2)
    assert metrics["test_bits_per_dim"] == pytest.approx(by_hand, rel=1e-6)
    # independent uniform levels: no model beats the uniform distribution's 8 bits (its cross-entropy >= their
    # entropy; the test ELBO is lower still); one epoch of a few steps leaves it within 2 bits (measured 8.93 to 9.59)
    assert 7.95 < metrics["test_bits_per_dim"] < 10


def test_colour_images_refuse_the_bernoulli_likelihood(tmp_path, monkeypatch):
    cifar10_standin(tmp_path / "data", np.random.default_rng(0), monkeypatch)
    cfg = compose_config("data=cifar10", f"data.root={tmp_path / 'data'}", *SMALL)
    with pytest.raises(ConfigError, match="model.likelihood=bernoulli with 3-channel images"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_images_that_are_not_8_bit_are_refused():
    cfg = compose_config(*FAST, "model.likelihood=discretized_logistic")
    cfg.data.dataset._target_ = "test_likelihoods.FloatImages"
    with pytest.raises(ConfigError, match="its images are torch.float32; every likelihood here reads 8-bit"):
        load_split(cfg.data, train=True)


class FloatImages:
    """A dataset whose images are floats, not 8-bit levels."""

    def __init__(self, root=None, train=True, download=False, **kwargs):
        self.data = torch.rand(8, 16, 16)
        self.targets = torch.zeros(8, dtype=torch.long)


@pytest.mark.parametrize("override, message", [
    ("model.scale=diagonal", "model.scale='diagonal': must be one of"),
    ("model.fixed_scale=0", "model.fixed_scale=0: must be a finite number > 0"),
    ("model.min_scale=-1e-3", "model.min_scale=-0.001: must be a finite number > 0"),
    ("model.squeeze=0.5", "model.squeeze=0.5: must be a number between 0 and 0.5"),
])
def test_bad_scale_settings_stop_before_any_work(override, message):
    with pytest.raises(ConfigError, match=message):
        check_config(compose_config(*FAST, "model.likelihood=gaussian", override))


def test_a_scale_at_its_floor_is_counted_and_reported_in_the_log(tmp_path, caplog):
    decoder = Decoder((1, 8, 8), latent_dim=2, channels=[4], hidden_dim=8, likelihood="gaussian", min_scale=1e-3)
    encoder = Encoder((1, 8, 8), latent_dim=2, channels=[4], hidden_dim=8)
    x = observe(torch.rand(10, 1, 8, 8), "gaussian")
    assert dataset_elbo(x, encoder, decoder)["scale_at_floor"] == 0  # softplus(~0) is far above the floor
    with torch.no_grad():
        decoder.upsample[-1].bias[1] = -30.0  # the scale channel's output: softplus(-30) ~ 0, the floor alone
    parts = dataset_elbo(x, encoder, decoder)
    assert parts["scale_at_floor"] == 1.0
    with caplog.at_level(logging.WARNING), Logbook(tmp_path) as logbook:
        logbook.start(0, torch.device("cpu"), None)
        logbook.record({"epoch": 1, "test_elbo": parts["elbo"], "test_scale_at_floor": 0.25})
    assert "25.00% of the test pixels have their scale at the floor model.min_scale" in caplog.text


@pytest.fixture(scope="module", params=["gaussian", "logit_gaussian", "discretized_logistic"])
def gray_run(request, tmp_path_factory):
    """A small VAE of each gray-level likelihood on the synthetic disks, label 0 held out: 64 steps."""
    out_dir = trained_run(tmp_path_factory.mktemp(request.param), f"model.likelihood={request.param}", "data.subset=null",
                          "optim.optim_args.lr=3e-3", "data.exclude_classes=[0]")
    return out_dir, request.param


def evaluate(run_dir, out_dir, task, *overrides):
    cfg = compose_config(f"run={run_dir}", f"task={task}", "device=cpu", *overrides, config_name="evaluate")
    return evaluate_module.evaluate(cfg, out_dir)


def test_likelihood_task_gives_bits_per_dim(gray_run, tmp_path):
    run_dir, name = gray_run
    metrics = evaluate(run_dir, tmp_path, "likelihood", "task.num_particles=20", "task.max_images=64")
    assert metrics["nll"] < -metrics["elbo_k_samples"]  # the IW bound is tighter than the ELBO
    # bits/dim by hand: -log2 P per pixel of 256; a density of dequantized x = (level + u) / 256 counts
    # its bin's width, log P(level) >= log p(x) - log 256 per pixel
    offset = math.log(256) if name in ("gaussian", "logit_gaussian") else 0.0
    bits = lambda nll: (nll / 256 + offset) / math.log(2)  # noqa: E731
    assert metrics["bits_per_dim"] == pytest.approx(bits(metrics["nll"]), rel=1e-9)
    assert metrics["bits_per_dim_standard_error"] == pytest.approx(metrics["nll_standard_error"] / (256 * math.log(2)))
    assert 0 < metrics["bits_per_dim"] < 8  # better than a uniform distribution over the levels (measured 1.8 to 4.4)
    whole = evaluate(run_dir, tmp_path / "whole", "likelihood", "task.num_particles=20", "task.max_images=64",
                     "task.sample_seed=0", "task.whole_split_particles=10")
    assert whole["whole_split_bits_per_dim"] == pytest.approx(bits(whole["whole_split_nll"]), rel=1e-9)
    assert 0 < whole["whole_split_bits_per_dim_standard_error"] < whole["bits_per_dim_standard_error"]


def test_generate_task_draws_digits_of_every_likelihood(gray_run, tmp_path):
    run_dir, name = gray_run
    metrics = evaluate(run_dir, tmp_path, "generate", "task.scored_samples=200")
    decoder = load_run(run_dir, "cpu").decoder
    assert_png_shows(tmp_path / "samples.png", prior_samples(decoder, 64, seed=0), nrow=8)  # E[x|t] of this likelihood
    drawn, mean = drawn_samples(decoder, 1000, seed=1), prior_samples(decoder, 1000, seed=1)
    with torch.no_grad():
        x_loc, x_scale = decoder(torch.randn(1000, 4, generator=torch.Generator().manual_seed(1)))  # the same t ~ p(t)
    if name == "gaussian":  # x ~ N(x_loc, x_scale^2) clamped to [0, 1]:
        # E = loc (F(b) - F(a)) + scale (f(a) - f(b)) + 1 - F(b), a and b the standardized 0 and 1
        normal = torch.distributions.Normal(0.0, 1.0)
        a, b = -x_loc / x_scale, (1 - x_loc) / x_scale
        density = lambda z: normal.log_prob(z).exp()  # noqa: E731
        expected = x_loc * (normal.cdf(b) - normal.cdf(a)) + x_scale * (density(a) - density(b)) + 1 - normal.cdf(b)
    else:  # logit_gaussian: in (0, 1) already; discretized_logistic: a level, the draws averaging to E[x|t]
        expected = mean
    if name == "discretized_logistic":
        assert torch.equal(drawn * 255, torch.round(drawn * 255))
    residual = drawn - expected  # (1000, C, H, W): a draw of p(x|t) about its own mean, pixel by pixel
    assert (residual.mean(0).abs() <= 5 * residual.std(0) / math.sqrt(1000) + 1e-4).all(), residual.mean(0).abs().max()
    assert residual.abs().max() > 0.05  # the likelihood's pixel noise, not E[x|t] itself
    assert metrics["classifier_test_accuracy"] > 0.5
    assert sum(metrics["sample_confident_classes"]) == round(metrics["sample_confident_share"] * 200)  # of 200 samples


def test_represent_task_of_every_likelihood(gray_run, tmp_path):
    run_dir, _ = gray_run
    metrics = evaluate(run_dir, tmp_path, "represent", "task.max_iter=50")
    assert metrics["linear_probe_accuracy"] > 0.3  # chance is about 0.1


def test_anomaly_task_of_every_likelihood(gray_run, tmp_path):
    run_dir, _ = gray_run
    metrics = evaluate(run_dir, tmp_path, "anomaly", "task.num_particles=10", "task.max_images=100")
    rows = {row["anomalies"]: row for row in metrics["detection"]}
    assert rows["noise"]["iw_nll"]["auroc"] > 0.99 and rows["inverted"]["iw_nll"]["auroc"] > 0.95, rows
    assert_detection_is_the_saved_scores(metrics, tmp_path)


def test_impute_task_of_every_likelihood(gray_run, tmp_path):
    run_dir, name = gray_run
    metrics = evaluate(run_dir, tmp_path, "impute", "task.max_images=32", "task.steps=4", "task.burn_in=1",
                       "task.num_particles=10", "task.fit_steps=10", "task.batch_size=32", "task.masks=[top_half]")
    errors = metrics["errors"]["top_half"]
    run = load_run(run_dir, "cpu")
    x, mask = run.split(train=False)[0][:32], make_mask("top_half", (32, 1, 16, 16))
    fill_value = load_split(run.cfg.data, train=True)[0].mean(0)
    with torch.no_grad():  # E[x|t_loc(x~)] of this likelihood, x~ the image with the mean image filled in
        one_pass = mean_image(run.decoder, run.encoder(torch.where(mask, x, fill_value))[0])
    for method, prediction in (("one_pass", one_pass), ("mean_image", fill_value)):
        assert errors[method]["mse"] == pytest.approx((prediction - x)[~mask].pow(2).mean().item(), rel=1e-4)
    # the fitted proposal has more effective particles (measured 1.7, 5.4 and 2.4 against 1.3, 3.8 and 1.5 of 10)
    assert errors["fitted_importance"]["effective_sample_size"] > 1.15 * errors["importance"]["effective_sample_size"]
    if name != "logit_gaussian":  # and imputes better than the mean image (measured 0.049 and 0.035 against 0.062);
        # the logit-space Gaussian after 64 steps does not (0.092: its one pass too): too weak a model to claim it
        assert errors["fitted_importance"]["mse"] < 0.85 * errors["mean_image"]["mse"], errors


def test_a_mixture_of_discretized_logistics_is_a_distribution_over_the_levels():
    logits = torch.tensor([[0.0, 0.0], [2.0, -1.0], [0.3, 0.1]])  # 3 pixels, 2 components
    loc, scale = torch.tensor([[-0.1, 1.1], [0.4, 0.6], [0.2, 0.2]]), torch.tensor([[0.01, 0.01], [0.05, 0.1], [0.03, 0.03]])
    mixture = DiscretizedLogisticMixture(logits[:, None].expand(-1, LEVELS, -1), loc[:, None].expand(-1, LEVELS, -1),
                                         scale[:, None].expand(-1, LEVELS, -1))
    probabilities = mixture.log_prob(LEVEL_VALUES.expand(3, -1)).exp()  # (3, 256)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(3), atol=1e-5, rtol=0)
    weights = torch.softmax(logits, 1)
    by_hand = (weights[:, :, None] * torch.stack([level_probabilities(loc[:, k], scale[:, k]) for k in range(2)], 1)).sum(1)
    torch.testing.assert_close(probabilities, by_hand, atol=1e-6, rtol=1e-4)  # sum_k w_k P_k(level)
    assert probabilities[0, 0] == pytest.approx(0.5, abs=1e-3) and probabilities[0, -1] == pytest.approx(0.5, abs=1e-3)
    torch.testing.assert_close(probabilities[2], level_probabilities(loc[2:, 0], scale[2:, 0])[0])  # equal components: one
    single = DiscretizedLogisticMixture(logits, loc, scale)
    torch.testing.assert_close(single.mean, (probabilities * LEVEL_VALUES).sum(1), atol=1e-5, rtol=0)
    draws = single.sample((100_000,))  # (S, 3)
    assert (draws[:, 0] == 0).float().mean() == pytest.approx(0.5, abs=0.01)  # half black, half white
    torch.testing.assert_close(draws.mean(0), single.mean, atol=5e-3, rtol=0)


def test_a_mixture_decoder_trains_and_is_refused_where_it_does_not_apply():
    decoder = Decoder((3, 8, 8), latent_dim=2, channels=[4], hidden_dim=8, likelihood="discretized_logistic",
                      components=2, min_scale=1e-3)
    t = torch.randn(5, 2)
    with torch.no_grad():  # the raw output's 18 channels are ordered (parameter, component, colour): 3 x 2 x 3
        decoder.upsample[-1].bias.copy_(torch.tensor([3.0, -3.0, 0.2, 0.9, -4.0, -4.0]).repeat_interleave(3))
        raw = decoder.upsample(decoder.lift(t)).reshape(5, 3, 2, 3, 8, 8).permute(1, 0, 3, 4, 5, 2)  # (3,B,C,H,W,K)
    logits, x_loc, x_scale = raw[0], raw[1], 1e-3 + torch.nn.functional.softplus(raw[2])
    for part, by_hand in zip(decoder(t), (logits, x_loc, x_scale), strict=True):
        torch.testing.assert_close(part, by_hand)
    # likelihood() hands (logits, loc, scale) to the mixture in that order: the distribution built here directly
    x = observe(torch.rand(5, 3, 8, 8), "discretized_logistic")
    direct = DiscretizedLogisticMixture(logits, x_loc, x_scale)
    log_p = likelihood(decoder, t).log_prob(x)
    torch.testing.assert_close(log_p, direct.log_prob(x).sum((1, 2, 3)))
    swapped = DiscretizedLogisticMixture(x_loc, logits, x_scale).log_prob(x).sum((1, 2, 3))  # weights, locs exchanged
    assert (swapped - log_p).abs().min() > 100  # weights, locs and scales set apart: a swap shows
    log_p.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in decoder.parameters())
    with pytest.raises(ValueError, match="model.components=3: a mixture needs model.likelihood=discretized_logistic"):
        Decoder((1, 8, 8), latent_dim=2, channels=[4], hidden_dim=8, likelihood="gaussian", components=3)
    with pytest.raises(ConfigError, match="model.components=2: a mixture needs"):
        check_config(compose_config(*FAST, "model.likelihood=discretized_logistic", "model.scale=shared",
                                    "model.components=2"))


def test_pixels_task_splits_the_bits_by_level(gray_run, tmp_path):
    run_dir, name = gray_run
    metrics = evaluate(run_dir, tmp_path, "pixels", "task.max_images=100", "task.batch_size=40")
    groups = metrics["groups"]
    assert sum(g["share_of_pixels"] for g in groups.values()) == pytest.approx(1.0)
    assert sum(g["share_of_bits"] for g in groups.values()) == pytest.approx(1.0, abs=1e-4)
    by_group = sum(g["share_of_pixels"] * g["bits_per_pixel"] for g in groups.values() if g["share_of_pixels"] > 0)
    assert by_group == pytest.approx(metrics["bits_per_dim"], rel=1e-4)  # the groups partition the pixels
    run = load_run(run_dir, "cpu")
    x, _ = run.split(train=False)
    with torch.no_grad():  # the same bits as the likelihood of the mean code, image by image
        log_p = likelihood(run.decoder, run.encoder(x[:100])[0]).log_prob(x[:100])
    offset = math.log(256) if name in ("gaussian", "logit_gaussian") else 0.0  # a density's bin of width 1/256
    assert metrics["bits_per_dim"] == pytest.approx((-log_p.mean().item() / 256 + offset) / math.log(2), rel=1e-4)
    with torch.no_grad():  # each group's scales at t_loc(x), by hand: median, share at the floor, mean 1/scale^2
        scale = run.decoder(run.encoder(x[:100])[0])[1]
    levels = torch.round(load_split(run.cfg.data, train=False)[0][:100] * 255)
    for group, inside in (("background", levels == 0), ("edge", (levels > 0) & (levels < 255))):
        assert groups[group]["share_of_pixels"] == pytest.approx(inside.float().mean().item())
        assert groups[group]["median_scale"] == pytest.approx(scale[inside].median().item(), rel=1e-5)
        at_floor = (scale[inside] < 1.01 * run.decoder.min_scale).float().mean().item()  # within 1% of model.min_scale
        assert groups[group]["at_floor"] == pytest.approx(at_floor)
        assert groups[group]["mean_gradient_weight"] == pytest.approx(scale[inside].pow(-2).mean().item(), rel=1e-4)
    assert "| background |" in (tmp_path / "pixels.md").read_text()
