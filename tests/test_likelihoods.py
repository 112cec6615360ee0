"""The likelihoods of gray levels (Gaussian on dequantized pixels, discretized logistic on the 256
levels), the modules of the `likelihood=` group that turn the decoder's output into them (model.py,
vae/likelihoods.py: their observations, bits/dim and key checks) and where their scale comes from;
the 8-bit datasets besides MNIST on generated stand-ins in torchvision's layouts (Fashion-MNIST,
CIFAR-10); every evaluation task with every likelihood."""
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
from hydra.errors import ConfigCompositionException

import evaluate as evaluate_module
import model
from guide import Encoder
from model import Decoder
from tasks.generate import drawn_samples, prior_samples
from tasks.impute import make_mask
from test_evaluate import assert_detection_is_the_saved_scores
from train import train
from vae import likelihoods
from vae.config import ConfigError, check_config
from vae.data import bits_per_dim, load_split
from vae.distributions import LEVELS, DiscretizedLogistic, DiscretizedLogisticMixture, LogitNormal
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
    logistic, gaussian = likelihoods.DiscretizedLogistic().log_bin_width, likelihoods.Gaussian().log_bin_width
    assert bits_per_dim(dims * math.log(1 / 256), shape, logistic) == pytest.approx(8.0)
    assert bits_per_dim(0.0, shape, gaussian) == pytest.approx(8.0)  # the uniform density on [0, 1)
    # any value: -log p / (D ln 2) of nats, plus the 8 bits of a level's bin for a density of dequantized pixels
    assert bits_per_dim(-1234.5, (3, 32, 32), logistic) == pytest.approx(1234.5 / (3072 * math.log(2)))
    for dequantized in (likelihoods.Gaussian(3), likelihoods.LogitGaussian(3)):
        assert bits_per_dim(-1234.5, (3, 32, 32), dequantized.log_bin_width) == pytest.approx(
            1234.5 / (3072 * math.log(2)) + 8)


@pytest.mark.parametrize("make, log_bin_width", [
    (lambda: model.Bernoulli(), None),
    (lambda: model.Gaussian(), -math.log(256)),
    (lambda: likelihoods.Gaussian(scale="pixel"), -math.log(256)),
    (lambda: likelihoods.Gaussian(scale="shared"), -math.log(256)),
    (lambda: likelihoods.Gaussian(scale="fixed"), -math.log(256)),
    (lambda: likelihoods.LogitGaussian(), -math.log(256)),
    (lambda: likelihoods.DiscretizedLogistic(), 0.0),
    (lambda: likelihoods.DiscretizedLogistic(scale="shared"), 0.0),
    (lambda: likelihoods.DiscretizedLogisticMixture(components=3), 0.0),
], ids=["bernoulli", "lecture_gaussian", "gaussian_pixel", "gaussian_shared", "gaussian_fixed", "logit_gaussian",
        "discretized_logistic", "discretized_logistic_shared", "mixture"])
def test_each_likelihood_counts_its_bin_width_in_bits_per_dim(make, log_bin_width):
    """A density of dequantized pixels gives its bin's width, -log 256 per pixel, a log-probability of the
    levels 0, and the Bernoulli of binarized pixels no bits/dim at all (None); bits_per_dim adds D times it."""
    likelihood = make()
    if log_bin_width is None:
        assert likelihood.log_bin_width is None
        return
    assert likelihood.log_bin_width == log_bin_width
    # a uniform model of the 256 levels: 8 bits, whether read as a density on [0, 1) or as P(level) = 1/256
    nats = 0.0 if log_bin_width else 784 * math.log(1 / 256)
    assert bits_per_dim(nats, (1, 28, 28), likelihood.log_bin_width) == pytest.approx(8.0)
    assert bits_per_dim(-100.0, (2,), likelihood.log_bin_width) == pytest.approx(
        (100.0 / 2 - log_bin_width) / math.log(2))


LIKELIHOOD_CLASSES = {"gaussian": likelihoods.Gaussian, "logit_gaussian": likelihoods.LogitGaussian,
                      "discretized_logistic": likelihoods.DiscretizedLogistic}


def location_and_scale(p_x) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_loc, x_scale) of p(x|t) (the decoder's Independent over the image) of a Gaussian or a discretized
    logistic; (y_loc, y_scale) in logit space of the logit-space Gaussian."""
    pixel = p_x.base_dist
    if isinstance(pixel, LogitNormal):
        return pixel.base_dist.loc, pixel.base_dist.scale
    return pixel.loc, pixel.scale


@pytest.mark.parametrize("likelihood_name", ["gaussian", "logit_gaussian", "discretized_logistic"])
@pytest.mark.parametrize("scale", ["pixel", "shared", "fixed"])
def test_the_scale_comes_from_the_network_a_parameter_or_the_config(likelihood_name, scale):
    decoder = Decoder((3, 8, 8), latent_dim=2, channels=[4], hidden_dim=8,
                      likelihood=LIKELIHOOD_CLASSES[likelihood_name](3, scale=scale, min_scale=1e-3, fixed_scale=0.2))
    t = torch.randn(5, 2)
    x_loc, x_scale = location_and_scale(decoder(t))
    assert x_loc.shape == x_scale.shape == (5, 3, 8, 8)
    shared = decoder.likelihood.scale.raw_scale if scale == "shared" else None  # (C, 1, 1)
    with torch.no_grad():
        out = decoder.upsample(decoder.lift(t))  # the raw output: (loc, scale) channels for "pixel", loc alone else
    raw_loc, raw_scale = out.chunk(2, dim=-3) if scale == "pixel" else (out, shared)
    torch.testing.assert_close(x_loc, torch.sigmoid(raw_loc) if likelihood_name == "gaussian" else raw_loc)  # sigmoid
    if scale == "fixed":
        assert (x_scale == 0.2).all()
        assert not any("scale" in name for name, _ in decoder.named_parameters())
    else:  # min_scale + softplus(raw), and the floor itself (not below it) where the raw output is pushed down
        torch.testing.assert_close(x_scale, (1e-3 + torch.nn.functional.softplus(raw_scale)).expand_as(x_scale))
        pushed = shared if scale == "shared" else decoder.upsample[-1].bias[3:]  # the scale's raw output
        with torch.no_grad():
            pushed.fill_(-200.0)  # softplus(-200 + ...) is 0 in float32
            assert (location_and_scale(decoder(t))[1] == 1e-3).all()
            pushed.fill_(0.0)
    if scale == "shared":  # one learned scale per channel, equal over images and pixels
        assert torch.equal(x_scale, x_scale[:1, :, :1, :1].expand_as(x_scale))
        assert dict(decoder.named_parameters())["likelihood.scale.raw_scale"] is shared  # the decoder's parameter
        x = decoder.likelihood.observe(torch.rand(5, 3, 8, 8))
        decoder(t).log_prob(x).sum().backward()
        assert shared.grad.abs().min() > 0  # it is trained


def test_the_gaussian_at_scale_pixel_is_the_lectures_gaussian():
    """vae.likelihoods.Gaussian(scale=pixel) is model.Gaussian: two outputs per pixel, and for the same output
    the same Normal(sigmoid(loc), min_scale + softplus(raw)), bit for bit; its other scales keep the sigmoid
    location and take one output per pixel."""
    out = torch.randn(4, 6, 5, 5) * 3  # (B, C * 2, H, W) of 3-channel images
    lecture, extended = model.Gaussian(3, min_scale=1e-2), likelihoods.Gaussian(3, scale="pixel", min_scale=1e-2)
    assert isinstance(extended, model.Gaussian)
    assert lecture.params_per_pixel == extended.params_per_pixel == 2
    assert extended.min_scale == lecture.min_scale == 1e-2
    p_lecture, p_extended = lecture(out), extended(out)
    assert type(p_lecture) is type(p_extended) and p_extended.batch_shape == (4, 3, 5, 5)
    assert torch.equal(p_extended.loc, p_lecture.loc) and torch.equal(p_extended.scale, p_lecture.scale)
    assert torch.equal(p_lecture.loc, torch.sigmoid(out[:, :3]))
    assert torch.equal(p_lecture.scale, 1e-2 + torch.nn.functional.softplus(out[:, 3:]))
    x = extended.observe(torch.rand(4, 3, 5, 5))
    assert torch.equal(p_extended.log_prob(x), p_lecture.log_prob(x))
    assert torch.equal(extended.learned_scale(p_extended), lecture.learned_scale(p_lecture))
    for scale in ("shared", "fixed"):
        other = likelihoods.Gaussian(3, scale=scale, min_scale=1e-2, fixed_scale=0.3)
        assert other.params_per_pixel == 1
        p_x = other(out[:, :3])
        assert torch.equal(p_x.loc, torch.sigmoid(out[:, :3]))
        if scale == "fixed":  # no scale is learned
            assert (p_x.scale == 0.3).all() and other.learned_scale(p_x) is None
        else:
            assert torch.equal(other.learned_scale(p_x), p_x.scale)


def test_logit_gaussian_is_a_density_on_the_unit_interval_with_its_mean_by_quadrature():
    y_loc, y_scale = torch.tensor([-4.0, 0.0, 1.5]), torch.tensor([0.5, 2.0, 0.05])
    p_x = LogitNormal(y_loc, y_scale, logit_lambda=1e-3)
    grid = (torch.arange(200_000, dtype=torch.float64) + 0.5) / 200_000  # midpoints on (0, 1)
    density = p_x.log_prob(grid[:, None].float()).double().exp()  # (200000, 3)
    torch.testing.assert_close(density.mean(0), torch.ones(3, dtype=torch.float64), atol=2e-3, rtol=0)  # integrates to 1
    u = 1e-3 + (1 - 2e-3) * grid[:, None]
    by_hand = torch.distributions.Normal(y_loc.double(), y_scale.double()).log_prob(torch.log(u / (1 - u))) \
        + math.log(1 - 2e-3) - torch.log(u * (1 - u))  # log N(logit u) + log |d logit u / dx|
    torch.testing.assert_close(p_x.log_prob(grid[:, None].float()).double(), by_hand, atol=1e-3, rtol=1e-4)
    draws = p_x.sample((200_000,))
    torch.testing.assert_close(p_x.mean, draws.mean(0), atol=3e-3, rtol=0)


def test_the_logit_gaussian_likelihood_hands_the_decoders_output_to_the_logit_normal():
    """likelihoods.LogitGaussian turns (y_loc, raw scale) into LogitNormal(y_loc, min_scale + softplus(raw),
    logit_lambda) with y_loc unbounded, its `logit_lambda` the transform's lambda, log p with the Jacobian."""
    out = torch.randn(3, 2, 4, 4) * 3
    likelihood = likelihoods.LogitGaussian(1, scale="pixel", min_scale=1e-2, logit_lambda=0.05)
    p_x = likelihood(out)
    assert isinstance(p_x, LogitNormal) and p_x.logit_lambda == 0.05
    assert torch.equal(p_x.base_dist.loc, out[:, :1])
    assert torch.equal(p_x.scale, 1e-2 + torch.nn.functional.softplus(out[:, 1:]))
    x = likelihood.observe(torch.rand(3, 1, 4, 4))
    torch.testing.assert_close(p_x.log_prob(x), LogitNormal(out[:, :1], p_x.scale, 0.05).log_prob(x))
    assert not torch.allclose(p_x.log_prob(x), LogitNormal(out[:, :1], p_x.scale, 1e-3).log_prob(x))  # lambda counts


def test_observations_follow_the_likelihood_rule():
    intensities = torch.randint(0, LEVELS, (4, 1, 6, 6)) / 255
    logistic = likelihoods.DiscretizedLogistic()
    assert torch.equal(logistic.observe(intensities), intensities)  # the levels as they are
    assert torch.equal(logistic.observe(torch.tensor([0.1001])), torch.tensor([round(0.1001 * 255) / 255]))
    dequantized = likelihoods.Gaussian().observe(intensities)
    assert ((dequantized * 256).floor() == torch.round(intensities * 255)).all()  # inside its level's bin


@pytest.mark.parametrize("make, rule", [
    (lambda: model.Bernoulli(), "binarize"),
    (lambda: model.Gaussian(), "dequantize"),
    (lambda: likelihoods.Gaussian(scale="pixel"), "dequantize"),
    (lambda: likelihoods.Gaussian(scale="shared"), "dequantize"),
    (lambda: likelihoods.Gaussian(scale="fixed"), "dequantize"),
    (lambda: likelihoods.LogitGaussian(), "dequantize"),
    (lambda: likelihoods.DiscretizedLogistic(), "round"),
    (lambda: likelihoods.DiscretizedLogistic(scale="fixed"), "round"),
    (lambda: likelihoods.DiscretizedLogisticMixture(components=2), "round"),
], ids=["bernoulli", "lecture_gaussian", "gaussian_pixel", "gaussian_shared", "gaussian_fixed", "logit_gaussian",
        "discretized_logistic", "discretized_logistic_fixed", "mixture"])
def test_each_likelihood_observes_by_its_rule(make, rule):
    """`observe` of each likelihood, given the same generator, is the old rule by hand: a Bernoulli draw of
    each intensity (dynamic binarization), (level + u) / 256 with u ~ U[0, 1) of that generator (uniform
    dequantization: the lecture's and the extended Gaussians, the logit-space one), or the nearest of the 256
    levels (the discretized logistic and its mixture, no noise); a fresh draw where no generator is given."""
    likelihood = make()
    intensities = torch.cat([torch.randint(0, LEVELS, (3, 1, 8, 8)) / 255, torch.rand(1, 1, 8, 8)])  # levels, and not
    levels = intensities[:3]
    observed = likelihood.observe(intensities, torch.Generator().manual_seed(7))
    assert observed.shape == intensities.shape and observed.dtype == intensities.dtype
    assert torch.equal(likelihood.observe(intensities, torch.Generator().manual_seed(7)), observed)  # the seed fixes it
    if rule == "binarize":
        assert torch.equal(observed, torch.bernoulli(intensities, generator=torch.Generator().manual_seed(7)))
        assert set(observed.unique().tolist()) <= {0.0, 1.0}
    elif rule == "dequantize":
        u = torch.rand(intensities.shape, generator=torch.Generator().manual_seed(7))
        assert torch.equal(observed, (intensities * 255 + u) / 256)
        assert torch.equal(observed, model.dequantize(intensities, torch.Generator().manual_seed(7)))
        assert ((observed[:3] * 256).floor() == torch.round(levels * 255)).all()  # inside its level's bin
        assert (observed >= 0).all() and (observed < 1).all()
    else:
        assert torch.equal(observed, torch.round(intensities * 255) / 255)
        assert torch.equal(observed[:3], levels)  # the data's own levels stay as they are
        assert torch.equal(likelihood.observe(intensities), observed)  # no noise: the generator does not matter
    if rule != "round":  # noise: another draw without the generator
        assert not torch.equal(likelihood.observe(intensities), observed)


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
    cfg = compose_config(f"data={data}", f"data.root={tmp_path / 'data'}", f"likelihood={likelihood_name}", *SMALL)
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
    """The Bernoulli refuses colour itself when it is built (model.Bernoulli), which training reaches once the
    data's channels are known: a ConfigError in its words, and no checkpoint."""
    with pytest.raises(ValueError, match="likelihood=bernoulli with 3-channel images: binarizing colour"):
        model.Bernoulli(image_channels=3)
    assert model.Bernoulli(image_channels=1).params_per_pixel == 1
    cifar10_standin(tmp_path / "data", np.random.default_rng(0), monkeypatch)
    cfg = compose_config("data=cifar10", f"data.root={tmp_path / 'data'}", *SMALL)
    assert cfg.likelihood._target_ == "model.Bernoulli"  # the default
    with pytest.raises(ConfigError, match="likelihood=bernoulli with 3-channel images"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_images_that_are_not_8_bit_are_refused():
    cfg = compose_config(*FAST, "likelihood=discretized_logistic")
    cfg.data.dataset._target_ = "test_likelihoods.FloatImages"
    with pytest.raises(ConfigError, match="its images are torch.float32; every likelihood here reads 8-bit"):
        load_split(cfg.data, train=True)


class FloatImages:
    """A dataset whose images are floats, not 8-bit levels."""

    def __init__(self, root=None, train=True, download=False, **kwargs):
        self.data = torch.rand(8, 16, 16)
        self.targets = torch.zeros(8, dtype=torch.long)


@pytest.mark.parametrize("overrides, message", [
    (["likelihood=gaussian", "likelihood.scale=diagonal"], "likelihood.scale='diagonal': must be one of"),
    (["likelihood=gaussian", "likelihood.fixed_scale=0"], "likelihood.fixed_scale=0: must be a finite number > 0"),
    (["likelihood=gaussian", "likelihood.min_scale=-1e-3"], "likelihood.min_scale=-0.001: must be a finite number > 0"),
    (["likelihood=logit_gaussian", "likelihood.logit_lambda=0.5"],
     "likelihood.logit_lambda=0.5: must be a number between 0 and 0.5"),
    (["likelihood=discretized_logistic", "likelihood.scale=fixed", "likelihood.fixed_scale=1e-4"],
     r"likelihood.fixed_scale=0.0001: below likelihood.min_scale=0.001"),
    (["likelihood=discretized_logistic_mixture", "likelihood.components=0"],
     "likelihood.components=0: must be a positive integer"),
    (["likelihood=discretized_logistic_mixture", "likelihood.min_scale=-1e-3"],
     "likelihood.min_scale=-0.001: must be a finite number > 0"),
])
def test_bad_scale_settings_stop_before_any_work(overrides, message):
    """Each likelihood checks its own keys when it is built; check_config builds it and stops with a
    ConfigError in its words."""
    with pytest.raises(ConfigError, match=message):
        check_config(compose_config(*FAST, *overrides))


def test_a_scale_at_its_floor_is_counted_and_reported_in_the_log(tmp_path, caplog):
    decoder = Decoder((1, 8, 8), latent_dim=2, channels=[4], hidden_dim=8, likelihood=likelihoods.Gaussian(min_scale=1e-3))
    encoder = Encoder((1, 8, 8), latent_dim=2, channels=[4], hidden_dim=8)
    x = decoder.likelihood.observe(torch.rand(10, 1, 8, 8))
    assert dataset_elbo(x, encoder, decoder)["scale_at_floor"] == 0  # softplus(~0) is far above the floor
    with torch.no_grad():
        decoder.upsample[-1].bias[1] = -30.0  # the scale channel's output: softplus(-30) ~ 0, the floor alone
    parts = dataset_elbo(x, encoder, decoder)
    assert parts["scale_at_floor"] == 1.0
    with caplog.at_level(logging.WARNING), Logbook(tmp_path) as logbook:
        logbook.start(0, torch.device("cpu"), None)
        logbook.record({"epoch": 1, "test_elbo": parts["elbo"], "test_scale_at_floor": 0.25})
    assert "25.00% of the test pixels have their scale at the floor likelihood.min_scale" in caplog.text


@pytest.fixture(scope="module", params=["gaussian", "logit_gaussian", "discretized_logistic"])
def gray_run(request, tmp_path_factory):
    """A small VAE of each gray-level likelihood on the synthetic disks, label 0 held out: 64 steps."""
    out_dir = trained_run(tmp_path_factory.mktemp(request.param), f"likelihood={request.param}", "data.subset=null",
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
        p_x = decoder(torch.randn(1000, 4, generator=torch.Generator().manual_seed(1))).base_dist  # the same t ~ p(t)
    if name == "gaussian":  # x ~ N(x_loc, x_scale^2) clamped to [0, 1]:
        x_loc, x_scale = p_x.loc, p_x.scale
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
        one_pass = run.decoder(run.encoder(torch.where(mask, x, fill_value))[0]).mean
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
    decoder = Decoder((3, 8, 8), latent_dim=2, channels=[4], hidden_dim=8,
                      likelihood=likelihoods.DiscretizedLogisticMixture(3, components=2, min_scale=1e-3))
    t = torch.randn(5, 2)
    with torch.no_grad():  # the raw output's 18 channels are ordered (parameter, component, colour): 3 x 2 x 3
        decoder.upsample[-1].bias.copy_(torch.tensor([3.0, -3.0, 0.2, 0.9, -4.0, -4.0]).repeat_interleave(3))
        raw = decoder.upsample(decoder.lift(t)).reshape(5, 3, 2, 3, 8, 8).permute(1, 0, 3, 4, 5, 2)  # (3,B,C,H,W,K)
    logits, x_loc, x_scale = raw[0], raw[1], 1e-3 + torch.nn.functional.softplus(raw[2])
    with torch.no_grad():
        mixture = decoder(t).base_dist
    for part, by_hand in zip((mixture.logits, mixture.loc, mixture.scale), (logits, x_loc, x_scale), strict=True):
        torch.testing.assert_close(part, by_hand)
    # the likelihood hands (logits, loc, scale) to the mixture in that order: the distribution built here directly
    x = decoder.likelihood.observe(torch.rand(5, 3, 8, 8))
    direct = DiscretizedLogisticMixture(logits, x_loc, x_scale)
    log_p = decoder(t).log_prob(x)
    torch.testing.assert_close(log_p, direct.log_prob(x).sum((1, 2, 3)))
    swapped = DiscretizedLogisticMixture(x_loc, logits, x_scale).log_prob(x).sum((1, 2, 3))  # weights, locs exchanged
    assert (swapped - log_p).abs().min() > 100  # weights, locs and scales set apart: a swap shows
    log_p.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in decoder.parameters())
    # components belong to likelihood=discretized_logistic_mixture alone, whose scale is the network's per pixel:
    # the other likelihoods take no components, the mixture no scale option, on the command line or built
    with pytest.raises(TypeError, match="components"):
        likelihoods.Gaussian(1, components=3)
    with pytest.raises(TypeError, match="scale"):
        likelihoods.DiscretizedLogisticMixture(1, components=2, scale="shared")
    with pytest.raises(ConfigCompositionException, match="Could not override 'likelihood.components'"):
        compose_config(*FAST, "likelihood=gaussian", "likelihood.components=3")
    with pytest.raises(ConfigCompositionException, match="Could not override 'likelihood.scale'"):
        compose_config(*FAST, "likelihood=discretized_logistic_mixture", "likelihood.scale=shared",
                       "likelihood.components=2")
    with pytest.raises(ConfigError,
                       match=r"(?s)likelihood._target_=vae.likelihoods.Gaussian: .*keyword argument 'components'"):
        check_config(compose_config(*FAST, "likelihood=gaussian", "+likelihood.components=3"))
    with pytest.raises(ConfigError, match="likelihood.components=0: must be a positive integer"):
        check_config(compose_config(*FAST, "likelihood=discretized_logistic_mixture", "likelihood.components=0"))


def test_pixels_task_splits_the_bits_by_level(gray_run, tmp_path):
    run_dir, name = gray_run
    metrics = evaluate(run_dir, tmp_path, "pixels", "task.max_images=100", "task.batch_size=40")
    groups = metrics["groups"]
    assert metrics["dims_per_image"] == 256  # the synthetic disks' 1 x 16 x 16
    assert sum(g["share_of_pixels"] for g in groups.values()) == pytest.approx(1.0)
    assert sum(g["share_of_bits"] for g in groups.values()) == pytest.approx(1.0, abs=1e-4)
    by_group = sum(g["share_of_pixels"] * g["bits_per_pixel"] for g in groups.values() if g["share_of_pixels"] > 0)
    assert by_group == pytest.approx(metrics["bits_per_dim"], rel=1e-4)  # the groups partition the pixels
    run = load_run(run_dir, "cpu")
    x, _ = run.split(train=False)
    with torch.no_grad():  # the same bits as the likelihood of the mean code, image by image
        log_p = run.decoder(run.encoder(x[:100])[0]).log_prob(x[:100])
    offset = math.log(256) if name in ("gaussian", "logit_gaussian") else 0.0  # a density's bin of width 1/256
    assert metrics["bits_per_dim"] == pytest.approx((-log_p.mean().item() / 256 + offset) / math.log(2), rel=1e-4)
    with torch.no_grad():  # each group's scales at t_loc(x), by hand: median, share at the floor, mean 1/scale^2
        scale = location_and_scale(run.decoder(run.encoder(x[:100])[0]))[1]
    levels = torch.round(load_split(run.cfg.data, train=False)[0][:100] * 255)
    for group, inside in (("background", levels == 0), ("edge", (levels > 0) & (levels < 255))):
        assert groups[group]["share_of_pixels"] == pytest.approx(inside.float().mean().item())
        assert groups[group]["median_scale"] == pytest.approx(scale[inside].median().item(), rel=1e-5)
        at_floor = (scale[inside] < 1.01 * run.decoder.likelihood.min_scale).float().mean().item()  # within 1% of it
        assert groups[group]["at_floor"] == pytest.approx(at_floor)
        assert groups[group]["mean_gradient_weight"] == pytest.approx(scale[inside].pow(-2).mean().item(), rel=1e-4)
    assert "| background |" in (tmp_path / "pixels.md").read_text()
