"""What the model sees while it trains (README, "Likelihoods" and "Data"): each training image
binarized afresh every epoch; a test set observed once with a fixed seed, the same for every run and
epoch; and test numbers that are the ELBO's, whatever the training objective (`trainer.nll_beta`,
the KL warm-up). Each test trains on the FAST settings and records what train.py hands to the SVI
step and to the test ELBO."""
from __future__ import annotations

import copy

import pyro
import pytest
import torch

import train as train_module
import vae.runner as runner_module
from conftest import FAST, compose_config
from guide import posterior
from vae.beta_nll import BetaNLL
from vae.build import build_likelihood
from vae.data import load_split, load_training_data, observe_test_set
from vae.logbook import read_metrics

SIGMAS = 5  # Monte-Carlo checks: a deviation of 5 standard deviations fails


def record_calls(monkeypatch, module, name: str, keep) -> list:
    """Replace module.<name> (train's dataset_elbo, the runner's svi_step) by a wrapper that appends
    `keep(*args, **kwargs)` to the returned list, just before the real function runs, then calls it."""
    real, calls = getattr(module, name), []

    def recording(*args, **kwargs):
        calls.append(keep(*args, **kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, recording)
    return calls


@pytest.fixture(autouse=True)
def suites_threads():
    """The runs below train on one thread (threads=1: quicker on a busy machine); the suite's count after."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run(out_dir, *overrides: str) -> None:
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    train_module.train(compose_config(*FAST, "threads=1", *overrides), out_dir)


def test_each_training_image_is_binarized_afresh_every_epoch(tmp_path, monkeypatch):
    """Every epoch, image i enters its step as a new draw x ~ Bernoulli(intensity_i): across epochs
    the draws of a pixel of gray level p differ with probability 2p(1 - p) (independent draws), and
    they average to p. Drawn once and reused, they would never differ."""
    epochs, num_images = 3, 128
    steps = record_calls(monkeypatch, runner_module, "svi_step", lambda svi, x, index, **_: (index.clone(), x.clone()))
    overrides = (f"trainer.epochs={epochs}", f"data.subset={num_images}", "data.batch_size=32")
    run(tmp_path, *overrides)
    intensity = load_split(compose_config(*FAST, *overrides).data, train=True)[0]  # (N, 1, H, W), p per pixel

    assert len(steps) == epochs * num_images // 32
    draws = torch.full((epochs, *intensity.shape), -1.0)  # each epoch's observation of every image
    for step, (index, x) in enumerate(steps):
        draws[step // (num_images // 32), index] = x
    assert ((draws == 0) | (draws == 1)).all()  # binary: every image observed once per epoch

    p = intensity.double()
    flip = 2 * p * (1 - p)  # P(two independent draws differ)
    for first, second in zip(draws, draws[1:]):
        differ = (first != second).sum().item()
        assert abs(differ - flip.sum().item()) < SIGMAS * (flip * (1 - flip)).sum().sqrt().item(), differ
    assert flip.sum() > 500  # enough gray pixels for the check to see a reused draw (then differ = 0)
    mean_error = (draws.double() - p).sum().item()  # sum over epochs, images, pixels of x - p
    assert abs(mean_error) < SIGMAS * (epochs * (p * (1 - p)).sum()).sqrt().item()


def test_the_test_set_is_observed_once_with_a_fixed_seed(tmp_path, monkeypatch):
    """Two runs of different seeds are tested on the same binarized test set, at every epoch: one
    draw x ~ Bernoulli(intensity) per test image, never redrawn with the run's seed or per epoch."""
    tested = record_calls(monkeypatch, train_module, "dataset_elbo", lambda x, *_, **__: x.clone())
    run(tmp_path / "seed0", "seed=0", "trainer.epochs=2", "data.subset=64")
    run(tmp_path / "seed1", "seed=1", "trainer.epochs=2", "data.subset=64")
    assert len(tested) == 6  # epochs 0, 1, 2 of each run
    for x in tested[1:]:
        assert torch.equal(x, tested[0])

    intensity = load_split(compose_config(*FAST).data, train=False)[0].double()
    x = tested[0].double()
    assert ((x == 0) | (x == 1)).all() and x.shape == intensity.shape
    variance = (intensity * (1 - intensity)).sum()
    assert variance > 500  # gray pixels: a draw, not the intensities rounded
    assert abs((x - intensity).sum()) < SIGMAS * variance.sqrt()  # the draws average to the gray levels


def reference_elbo(x: torch.Tensor, rng: torch.Tensor, encoder, decoder) -> dict[str, float]:
    """The README's ELBO(x) = E_q[log p(x|t)] - KL(q(t|x) || p(t)), its mean over the test images,
    with t ~ q(t|x) drawn from the torch RNG state `rng`: log p(x|t) from the decoder's p(x|t), the KL
    of the diagonal Gaussian q(t|x) = N(t_loc, t_scale^2) from N(0, I) by its formula, not vae/elbo.py."""
    pyro.clear_param_store()
    torch.set_rng_state(rng)
    with torch.no_grad():
        _, t = posterior(x, encoder)  # t ~ q(t|x), (B, latent_dim)
        t_loc, t_scale = encoder(x)[:2]
        recon = decoder(t).log_prob(x)  # log p(x|t), (B,)
        kl = (0.5 * (t_loc**2 + t_scale**2 - 1) - t_scale.log()).sum(-1)  # (B,)
    return {"test_elbo": (recon - kl).mean().item(), "test_recon": recon.mean().item(), "test_kl": kl.mean().item(),
            "t": t}


OBJECTIVES = {  # a run whose training objective is not the ELBO
    "kl_warmup": ["trainer.kl_warmup_epochs=4"],  # beta = 1/4 after epoch 1, 1/2 after epoch 2
    "nll_beta": ["likelihood=gaussian", "trainer.nll_beta=0.5"],
}


@pytest.mark.parametrize("objective", OBJECTIVES, ids=list(OBJECTIVES))
def test_every_test_number_is_the_elbo_whatever_the_training_objective(objective, tmp_path, monkeypatch):
    """Each epoch's logged test_elbo, test_recon and test_kl are the ELBO's (with the test's own draw
    of t ~ q(t|x)), not the warm-up's recon - beta KL nor the beta-NLL's weighed recon; and those
    would differ here by far more than the tolerance."""
    tested = record_calls(monkeypatch, train_module, "dataset_elbo", lambda x, encoder, decoder, *_, **__: (
        x.clone(), torch.get_rng_state(), copy.deepcopy(encoder), copy.deepcopy(decoder)))
    run(tmp_path, "trainer.epochs=2", "data.subset=128", *OBJECTIVES[objective])
    metrics = read_metrics(tmp_path)
    assert [m["epoch"] for m in metrics] == [0, 1, 2] and len(tested) == 3
    cfg = compose_config(*FAST, *OBJECTIVES[objective])
    x_test = observe_test_set(load_training_data(cfg, torch.device("cpu"))[1], build_likelihood(cfg.likelihood, 1))
    for line, (x, rng, encoder, decoder) in zip(metrics, tested):
        assert torch.equal(x, x_test)
        expected = reference_elbo(x, rng, encoder, decoder)
        for key in ("test_elbo", "test_recon", "test_kl"):
            assert line[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-4), (line["epoch"], key)
        if line["epoch"] == 0:
            continue
        if objective == "kl_warmup":  # recon - beta KL, beta = epoch / 4: (1 - beta) KL away
            assert (1 - line["epoch"] / 4) * expected["test_kl"] > 0.02  # 10 times the tolerance
        else:  # the beta-NLL's recon, each pixel's log-density weighed by its scale^(2 beta)
            with torch.no_grad():
                p_x = decoder(expected["t"]).base_dist
                weighed = BetaNLL(p_x, 0.5, 3).to_event(3).log_prob(x).mean().item()
            assert abs(weighed - expected["test_recon"]) > 0.02
