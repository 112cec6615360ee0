"""Short real training runs, exact resume, and the bad-input cases, all in-process."""
from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pyro
import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train as train_module
import vae.runner as runner_module
from conftest import FAST, PROJECT_DIR, assert_png_shows, compose_config, mnist_root, process_starts, trained_run
from train import TrainingDiverged, train
from vae import build
from vae import checkpoint as checkpoint_module
from vae.build import build_networks
from vae.checkpoint import CheckpointError, RunState, config_differences
from vae.config import ConfigError
from vae.data import DataNotFoundError
from vae.elbo import elbo_parts
from vae.logbook import RunDirectoryBusy
from vae.logbook import read_metrics as read_metrics_leaving_out_a_cut_line
from vae.provenance import read_provenance
from vae.runs import load_run


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def param_snapshot():
    return {name: value.detach().clone() for name, value in pyro.get_param_store().items()}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """(its directory, its final parameters): the FAST run of 2 epochs from seed 0, trained without a stop,
    where every stopped and resumed run below must end; trained once for them all, read only."""
    run_dir = trained_run(tmp_path_factory.mktemp("straight"))
    return run_dir, param_snapshot()


@pytest.mark.parametrize("estimator,min_gain", [("reparam", 30), ("score", 10)])
def test_short_training_improves_the_elbo(fast_config, tmp_path, estimator, min_gain):
    result = train(fast_config(f"estimator={estimator}", "trainer.epochs=3"), tmp_path)
    metrics = read_metrics(tmp_path)
    assert [m["epoch"] for m in metrics] == [0, 1, 2, 3]
    initial, final = metrics[0], metrics[-1]
    assert result["test_elbo"] == final["test_elbo"]
    assert final["test_elbo"] > initial["test_elbo"] + min_gain, (initial["test_elbo"], final["test_elbo"])
    for m in metrics[1:]:
        assert m["train_elbo"] < 0 and m["seconds"] > 0
    # the last epoch's grids: E[x|t] of the fixed prior draws, and the test images above their reconstructions
    run = load_run(tmp_path, "cpu")
    t_prior = torch.randn(64, 4, generator=torch.Generator().manual_seed(train_module.PRIOR_GRID_SEED))
    assert_png_shows(tmp_path / "images" / "samples_003.png", run.decoder(t_prior).mean, nrow=8)
    x_shown = run.split(train=False)[0][:32]
    assert_png_shows(tmp_path / "images" / "reconstructions_003.png", torch.cat([x_shown, x_shown]), nrow=16,
                     rows=[0, 1])  # the images themselves; the reconstructions (rows 2, 3) are of a random t
    assert any((tmp_path / "tensorboard").iterdir())
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert {"test_elbo", "train_elbo", "test_kl"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("test_elbo")] == [0, 1, 2, 3]
    for grid in ("reconstructions", "samples"):  # the grids as TensorBoard images, every epoch
        assert [image.step for image in events.Images(grid)] == [0, 1, 2, 3], grid
    (entry,) = read_provenance(tmp_path)  # one process wrote this run
    assert re.fullmatch(r"[0-9a-f]{40}", entry["commit"]) and entry["epoch"] == 1
    assert (entry["torch"], entry["pyro"], entry["threads"]) == (torch.__version__, pyro.__version__, torch.get_num_threads())


def test_gaussian_likelihood_trains_and_reports_bits_per_dim(fast_config, tmp_path):
    train(fast_config("likelihood=gaussian", "trainer.epochs=2"), tmp_path)
    metrics = read_metrics(tmp_path)
    assert metrics[-1]["test_elbo"] > metrics[0]["test_elbo"]
    assert 0 < metrics[-1]["test_bits_per_dim"] < metrics[0]["test_bits_per_dim"]


@pytest.mark.skipif(mnist_root() is None, reason="MNIST not found under VAE_DATA_ROOT (see ../shared/data/README.md)")
def test_short_mnist_run(config, tmp_path, machine_threads):  # the default network on MNIST: two threads pay here
    cfg = config("data.subset=2048", "trainer.epochs=1", "device=cpu", f"data.root={mnist_root()}")
    result = train(cfg, tmp_path)
    metrics = read_metrics(tmp_path)
    assert metrics[0]["test_elbo"] < -500  # untrained: about 784 * log 2 nats
    assert result["test_elbo"] > metrics[0]["test_elbo"] + 150  # 16 steps already learn the strokes


@pytest.mark.skipif(mnist_root() is None, reason="MNIST not found under VAE_DATA_ROOT (see ../shared/data/README.md)")
def test_the_default_run_gives_the_readmes_first_epoch(config, tmp_path, machine_threads):
    """`python train.py` (seed 0) gives the README quickstart's untrained and first-epoch test ELBOs, as
    the README prints them: the untrained one to its two decimals (the initialisation and the test
    set's binarization), the first epoch's within 0.3 nats, the slack for another processor's float
    arithmetic over 938 steps (on the processor that measured it, this one, it is equal to the
    digit; a change of the data order or of the RNG's use moves it by more). On torch's own thread count,
    as `python train.py` runs (`machine_threads`)."""
    quickstart = (PROJECT_DIR / "README.md").read_text().split("<!-- report:quickstart -->")[1]
    first, untrained = (float(v) for v in re.search(r"\((-[\d.]+) after the first epoch, (-[\d.]+) untrained\)", quickstart).groups())
    train(config("trainer.epochs=1", "device=cpu", f"data.root={mnist_root()}"), tmp_path)
    metrics = read_metrics(tmp_path)
    assert abs(metrics[0]["test_elbo"] - untrained) < 0.01, (metrics[0]["test_elbo"], untrained)
    assert abs(metrics[1]["test_elbo"] - first) < 0.3, (metrics[1]["test_elbo"], first)


def test_resume_gives_identical_parameters_and_metrics(fast_config, tmp_path, straight):
    (straight, straight_params), split = straight, tmp_path / "split"
    train(fast_config("trainer.epochs=1"), split)
    pyro.clear_param_store()
    train(fast_config("trainer.epochs=2", f"resume={split}"), tmp_path / "ignored")
    for name, value in param_snapshot().items():
        assert torch.equal(value, straight_params[name]), name
    assert process_starts(split) == [(1, 0), (2, 0)]  # a line per process: start, resume after epoch 1
    assert not (tmp_path / "ignored").exists()  # the resumed run goes on in its own directory
    timing = {"seconds", "test_seconds", "wall_time"}
    strip = lambda ms: [{k: v for k, v in m.items() if k not in timing} for m in ms]
    assert strip(read_metrics(split)) == strip(read_metrics(straight))


def test_time_budget_ends_training_with_the_epoch_that_spends_it(fast_config, tmp_path):
    budget = ("trainer.epochs=5", "trainer.test_every=5", "trainer.max_minutes=1e-6")  # spent within epoch 1
    result = train(fast_config(*budget), tmp_path)
    assert [m["epoch"] for m in read_metrics(tmp_path)] == [0, 1]
    assert result["epoch"] == 1 and result["test_elbo"] is not None  # the last epoch is tested, test_every or not
    resumed = train(fast_config(*budget), tmp_path)  # the budget is spent: nothing more to do
    assert resumed["epoch"] == 1 and len(read_metrics(tmp_path)) == 2
    train(fast_config("trainer.epochs=2", "trainer.test_every=5"), tmp_path)  # without a budget it goes on
    assert [m["epoch"] for m in read_metrics(tmp_path)] == [0, 1, 2]
    assert process_starts(tmp_path) == [(1, 0), (2, 0), (2, 0)]  # each later process began after epoch 1


def test_time_budget_starts_no_epoch_that_would_end_past_it(fast_config, tmp_path, monkeypatch):
    """On a clock where each step takes one second: a budget of two and a half epochs trains two (a
    third, as long as the second, would end past it); resumed under it, the run trains nothing more;
    under three epochs' budget the third starts, and ends on the budget."""
    clock, svi_step = {"now": 0.0}, runner_module.svi_step

    def step_of_a_second(*args, **kwargs):
        clock["now"] += 1.0
        return svi_step(*args, **kwargs)

    monkeypatch.setattr(runner_module, "svi_step", step_of_a_second)
    monkeypatch.setattr(runner_module, "time", SimpleNamespace(perf_counter=lambda: clock["now"]))
    cfg = fast_config()
    steps = math.ceil(cfg.data.subset / cfg.data.batch_size)  # one epoch's seconds on this clock
    budget = lambda epochs: ("trainer.epochs=5", "trainer.test_every=5", f"trainer.max_minutes={epochs * steps / 60}")
    result = train(fast_config(*budget(2.5)), tmp_path)
    metrics = read_metrics(tmp_path)
    assert [m["epoch"] for m in metrics] == [0, 1, 2] and metrics[1]["seconds"] == steps
    assert result["epoch"] == 2 and result["test_elbo"] is not None  # the last epoch is tested
    assert metrics[-1]["wall_time"] == 2 * steps
    train(fast_config(*budget(2.5)), tmp_path)  # resumed: the saved decision stands
    assert len(read_metrics(tmp_path)) == 3
    train(fast_config(*budget(3)), tmp_path)  # a larger budget: the third epoch fits exactly
    assert [m["epoch"] for m in read_metrics(tmp_path)] == [0, 1, 2, 3]
    assert read_metrics(tmp_path)[-1]["wall_time"] == 3 * steps


def test_a_checkpoint_from_before_the_optional_state_keys_resumes(fast_config, tmp_path):
    """A checkpoint written before run_id, switch_epoch or last_epoch_seconds were saved resumes with their
    defaults (the budget then read as spent once the wall time reaches it)."""
    train(fast_config("trainer.epochs=1"), tmp_path)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert set(checkpoint_module.OPTIONAL_STATE_KEYS) <= set(saved)
    torch.save({key: value for key, value in saved.items() if key not in checkpoint_module.OPTIONAL_STATE_KEYS},
               tmp_path / "checkpoint.pt")
    train(fast_config("trainer.epochs=2", "trainer.max_minutes=60"), tmp_path)
    assert [m["epoch"] for m in read_metrics(tmp_path)] == [0, 1, 2]
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["last_epoch_seconds"] > 0


def step_then_signal(svi_step, signum, step=5):
    """The runner's `svi_step` that sends this process `signum` during the `step`-th training step
    (of epoch 1)."""
    calls = {"n": 0}

    def step_that_signals(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), signum)
        return svi_step(*args, **kwargs)

    return step_that_signals


def test_interrupt_mid_epoch_saves_and_resumes_exactly(fast_config, tmp_path, monkeypatch, caplog, straight):
    (_, straight_params), interrupted = straight, tmp_path / "interrupted"
    svi_step = runner_module.svi_step
    monkeypatch.setattr(runner_module, "svi_step", step_then_signal(svi_step, signal.SIGTERM))
    result = train(fast_config(), interrupted)
    assert result["interrupted"]
    assert "Continue with" in caplog.text and f"resume={interrupted}" in caplog.text
    saved = torch.load(interrupted / "checkpoint.pt", weights_only=False)
    assert (saved["epoch"], saved["next_batch"]) == (1, 5)

    monkeypatch.setattr(runner_module, "svi_step", svi_step)
    pyro.clear_param_store()
    train(fast_config(), interrupted)  # the run directory's own checkpoint is picked up
    for name, value in param_snapshot().items():
        assert torch.equal(value, straight_params[name]), name
    assert [m["epoch"] for m in read_metrics(interrupted)] == [0, 1, 2]
    assert process_starts(interrupted) == [(1, 0), (1, 5)]  # the second process began at the saved step


def test_preemption_signal_saves_then_hands_on_to_submitit(fast_config, tmp_path, monkeypatch, straight):
    """submitit's SIGUSR2 handler requeues and exits; train.py first finishes the step and saves."""
    (_, straight_params), preempted = straight, tmp_path / "preempted"
    handed_on = []

    def submitit_requeue(signum, frame):  # stands in for submitit's checkpoint_and_try_requeue
        saved = torch.load(preempted / "checkpoint.pt", weights_only=False)
        handed_on.append((signum, saved["epoch"], saved["next_batch"]))
        raise SystemExit(-1)

    svi_step = runner_module.svi_step
    previous = signal.signal(signal.SIGUSR2, submitit_requeue)
    try:
        monkeypatch.setattr(runner_module, "svi_step", step_then_signal(svi_step, signal.SIGUSR2))
        with pytest.raises(SystemExit):
            train(fast_config(), preempted)
        assert handed_on == [(signal.SIGUSR2, 1, 5)]  # called once, after the checkpoint of step 5
        assert signal.getsignal(signal.SIGUSR2) is submitit_requeue  # train.py put it back
    finally:
        signal.signal(signal.SIGUSR2, previous)

    monkeypatch.setattr(runner_module, "svi_step", svi_step)
    pyro.clear_param_store()
    train(fast_config(), preempted)  # the requeued job: continues from step 5
    for name, value in param_snapshot().items():
        assert torch.equal(value, straight_params[name]), name
    assert process_starts(preempted) == [(1, 0), (1, 5)]


@pytest.mark.parametrize("option", ["trainer.channels_last=true", "trainer.compile=true"])
def test_speed_options_compute_the_same_networks(fast_config, tmp_path, option):
    """The memory layout and torch.compile change how the networks run, not what they compute;
    a run made with the option trains and resumes without it."""
    x = torch.rand(8, 1, 16, 16)
    t = torch.randn(8, 4)
    outputs = {}
    for name, cfg in (("plain", fast_config()), ("fast", fast_config(option))):
        torch.manual_seed(0)
        encoder, decoder = build_networks(cfg, (1, 16, 16), torch.device("cpu"), cfg.trainer)
        outputs[name] = (*encoder(x), decoder(t).base_dist.logits, [n for n, _ in [*encoder.named_parameters(), *decoder.named_parameters()]])
    *plain_values, plain_names = outputs["plain"]
    *fast_values, fast_names = outputs["fast"]
    assert fast_names == plain_names  # the same parameter names: checkpoints are interchangeable
    for fast, plain in zip(fast_values, plain_values, strict=True):
        assert torch.allclose(fast, plain, atol=1e-5)
    train(fast_config("trainer.epochs=1", option), tmp_path)
    pyro.clear_param_store()
    train(fast_config("trainer.epochs=2"), tmp_path)  # resumed without the option
    assert [m["epoch"] for m in read_metrics(tmp_path)] == [0, 1, 2]
    assert process_starts(tmp_path) == [(1, 0), (2, 0)]


def test_kl_warm_up_raises_beta_linearly_over_its_epochs_then_trains_the_elbo(fast_config, tmp_path, monkeypatch):
    weights = []
    svi_step = runner_module.svi_step

    def recording_step(svi, x, index, **kwargs):
        weights.append(kwargs.get("kl_weight", 1.0))
        return svi_step(svi, x, index, **kwargs)

    monkeypatch.setattr(runner_module, "svi_step", recording_step)
    train(fast_config("trainer.kl_warmup_epochs=2", "trainer.epochs=3"), tmp_path)
    steps = len(weights) // 3  # 8 batches of 64 per epoch
    assert weights[: 2 * steps] == pytest.approx([step / (2 * steps) for step in range(1, 2 * steps + 1)])
    assert weights[2 * steps:] == [1.0] * steps  # the ELBO itself after the warm-up
    assert all(math.isfinite(m["test_elbo"]) for m in read_metrics(tmp_path))


def test_the_log_says_where_a_resumed_run_continues():
    batches = [torch.arange(4)] * 10
    assert RunState(epoch=3, batches=batches, next_batch=4).position(20) == "at epoch 3, batch 5 of 10"
    assert RunState(epoch=4, batches=None, next_batch=10).position(20) == "at the start of epoch 4"
    assert "nothing to train" in RunState(epoch=21, batches=None, next_batch=10).position(20)
    assert "nothing to train" in RunState(epoch=6, batches=batches, next_batch=4).position(3)  # a lowered budget


def test_bf16_runs_the_layers_in_bfloat16_and_keeps_log_densities_float32(fast_config, tmp_path):
    """trainer.bf16: the same parameters (float32), outputs that differ from float32 by bfloat16
    rounding only, float32 log-densities; a run made with it resumes without it."""
    x = torch.rand(8, 1, 16, 16).round()
    t = torch.randn(8, 4)
    outputs = {}
    for name, cfg in (("float32", fast_config()), ("bf16", fast_config("trainer.bf16=true"))):
        torch.manual_seed(0)
        encoder, decoder = build_networks(cfg, (1, 16, 16), torch.device("cpu"), cfg.trainer)
        assert all(p.dtype == torch.float32 for p in [*encoder.parameters(), *decoder.parameters()])
        parts = elbo_parts(x, encoder, decoder)
        outputs[name] = [*encoder(x), decoder(t).base_dist.logits, parts["recon"], parts["kl"]]
        assert all(value.dtype == torch.float32 for value in outputs[name]), name
    for bf16, float32 in zip(outputs["bf16"], outputs["float32"], strict=True):
        assert not torch.equal(bf16, float32)  # the layers did run in bfloat16
        torch.testing.assert_close(bf16, float32, rtol=0.05, atol=0.05)  # bfloat16 keeps ~3 digits
    train(fast_config("trainer.epochs=1", "trainer.bf16=true"), tmp_path)
    assert all(value.dtype == torch.float32 for value in pyro.get_param_store().values())
    pyro.clear_param_store()
    train(fast_config("trainer.epochs=2"), tmp_path)  # resumed without the option
    assert [m["epoch"] for m in read_metrics(tmp_path)] == [0, 1, 2]
    assert process_starts(tmp_path) == [(1, 0), (2, 0)]
    assert all(math.isfinite(m["test_elbo"]) for m in read_metrics(tmp_path))


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.latent_dim=0", "model.latent_dim=0"),
        ("data.batch_size=-4", "data.batch_size=-4"),
        ("optim.optim_args.lr=0", "optim.optim_args.lr=0"),
        ("optim.optim_args.lr=-1e-3", "optim.optim_args.lr=-0.001"),
        ("likelihood._target_=model.Poisson", "likelihood._target_=model.Poisson"),
        ("likelihood=gaussian likelihood.scale=x", "likelihood.scale='x'"),
        ("model.channels=[8,8,8,8,8]", "model.channels=[8, 8, 8, 8, 8]"),  # 16x16 cannot halve 5 times
        ("device=tpu", "device='tpu'"),
        ("estimator.elbo.num_particles=0", "estimator.elbo.num_particles=0"),
        ("trainer.max_minutes=0", "trainer.max_minutes=0"),
        ("seed=-1", "seed=-1"),
        ("seed=4294967296", "seed=4294967296"),
        ("seed=1.5", "seed=1.5"),
        ("data.exclude_classes=3", "data.exclude_classes=3"),
        ("data.exclude_classes=[a]", "data.exclude_classes=['a']"),
        ("data.exclude_classes=[0,1,2,3,4,5,6,7,8,9]", "data.exclude_classes=[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]: leaves no"),
        ("data.exclude_classes=[42]", "data.exclude_classes=[42]: no training image has label 42"),
        ("trainer.num_grid_images=0", "trainer.num_grid_images=0"),
        ("trainer.num_grid_images=-1", "trainer.num_grid_images=-1"),
        ("data.subset=5000", "data.subset=5000: the training split has only 2048 images"),
        ("data.batch_size=100000", "data.batch_size=100000: larger than the 512 training images"),
        ("data.dataset.num_train=0", "data.dataset.num_train=0: must be a positive integer"),
        ("data.dataset.num_train=-5", "data.dataset.num_train=-5: must be a positive integer"),
        ("data.dataset.num_test=1.5", "data.dataset.num_test=1.5: must be a positive integer"),
        ("likelihood=gaussian likelihood.scale=fixed likelihood.fixed_scale=1e-30",
         "likelihood.fixed_scale=1e-30: below likelihood.min_scale"),
        ("optim.optim_args.lr=inf", "optim.optim_args.lr=inf"),
        ("threads=0", "threads=0"),
        ("threads=100000", "threads=100000: this process may use"),
        ("trainer.kl_warmup_epochs=-1", "trainer.kl_warmup_epochs=-1"),
        ("trainer.kl_warmup_epochs=2 estimator=iwae", "trainer.kl_warmup_epochs=2 with estimator.elbo._target_=vae.iwae"),
    ],
)
def test_invalid_values_stop_before_training(fast_config, tmp_path, override, message):
    with pytest.raises(ConfigError) as error:
        train(fast_config(*override.split()), tmp_path)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_missing_data_says_where_to_put_it(config, tmp_path):
    cfg = config(f"data.root={tmp_path}", "data.dataset.download=false", "device=cpu")
    with pytest.raises(DataNotFoundError, match=r"MNIST is not under .*VAE_DATA_ROOT"):
        train(cfg, tmp_path / "run")


def test_a_failed_download_leaves_no_empty_folders(config, tmp_path, monkeypatch):
    """Offline, torchvision makes <root>/MNIST/raw and then fails to download: the folders it made go."""
    import torchvision

    def download_offline(dataset):
        os.makedirs(dataset.raw_folder, exist_ok=True)
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no network")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", download_offline)
    root = tmp_path / "data"
    with pytest.raises(DataNotFoundError, match="no network"):
        train(config(f"data.root={root}", "device=cpu"), tmp_path / "run")
    assert not root.exists()


def test_corrupt_data_files_are_named(config, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(b"\x00\x00\x08\x03 truncated")
    with pytest.raises(DataNotFoundError, match=rf"MNIST's files in {raw} are corrupt or truncated"):
        train(config(f"data.root={tmp_path}", "data.dataset.download=false", "device=cpu"), tmp_path / "run")


def test_corrupt_checkpoint_is_reported_and_kept(fast_config, tmp_path):
    corrupt = tmp_path / "checkpoint.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        train(fast_config(), tmp_path)
    assert corrupt.read_bytes() == b"not a checkpoint at all"


def test_checkpoint_of_another_model_is_refused_and_kept(fast_config, tmp_path):
    train(fast_config("trainer.epochs=1"), tmp_path)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    pyro.clear_param_store()
    with pytest.raises(CheckpointError, match=r"model.latent_dim: 4 -> 5"):
        train(fast_config("trainer.epochs=2", "model.latent_dim=5", f"resume={tmp_path}"), tmp_path / "new")
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_a_checkpoint_copied_in_from_another_run_is_refused_and_changes_nothing(fast_config, tmp_path):
    """A latent-1 run's checkpoint.pt copied into a latent-4 run's directory: resuming there (by resume=,
    or as a requeued job would, from the directory's own checkpoint) is refused in one line before any
    work, and the directory's metrics stay the latent-4 run's."""
    other, run = tmp_path / "other", tmp_path / "run"
    train(fast_config("trainer.epochs=1", "model.latent_dim=1"), other)
    pyro.clear_param_store()
    train(fast_config("trainer.epochs=2"), run)
    shutil.copy(other / "checkpoint.pt", run / "checkpoint.pt")
    before = {name: (run / name).read_bytes() for name in ("metrics.jsonl", "provenance.jsonl", "checkpoint.pt")}
    for overrides in ([f"resume={run}", "model.latent_dim=1"], ["model.latent_dim=1"]):
        pyro.clear_param_store()
        with pytest.raises(CheckpointError, match=r"was written by another run .* than the one that trained in") as error:
            train(fast_config("trainer.epochs=3", *overrides), run)
        assert "\n" not in str(error.value)
        assert {name: (run / name).read_bytes() for name in before} == before
    assert len({entry["run_id"] for entry in read_provenance(run)}) == 1  # one run, one id, in every process's line
    pyro.clear_param_store()
    train(fast_config("trainer.epochs=2", "model.latent_dim=1"), other)  # in its own directory it goes on
    assert process_starts(other) == [(1, 0), (2, 0)]


def test_nan_loss_stops_with_a_hint_and_keeps_the_last_checkpoint(fast_config, tmp_path, monkeypatch):
    train(fast_config("trainer.epochs=1"), tmp_path)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    pyro.clear_param_store()

    class DivergingSVI(build.SVI):  # the third step of the resumed run returns NaN
        steps = 0

        def step(self, *args, **kwargs):
            loss = super().step(*args, **kwargs)
            DivergingSVI.steps += 1
            return float("nan") if DivergingSVI.steps == 3 else loss

    monkeypatch.setattr(build, "SVI", DivergingSVI)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at epoch 2, step 3 of \d+; the last good checkpoint .* is kept.*clipped_adam"):
        train(fast_config("trainer.epochs=2"), tmp_path)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_checkpoint_from_before_a_config_key_existed_still_matches(fast_config):
    cfg = fast_config()
    saved = OmegaConf.to_container(cfg, resolve=True)
    del saved["data"]["exclude_classes"]  # written before the key was added: it meant []
    assert config_differences(OmegaConf.create(saved), cfg) == ([], [])
    del saved["prior"]  # from before the prior group: N(0, I)
    assert config_differences(OmegaConf.create(saved), cfg) == ([], [])
    saved["data"]["exclude_classes"] = [3]
    assert config_differences(OmegaConf.create(saved), cfg) == (["data.exclude_classes: [3] -> []"], [])
    assert config_differences(OmegaConf.create(saved), fast_config("prior=mixture"))[0] == [
        "data.exclude_classes: [3] -> []", "prior._target_: 'model.StandardNormal' -> 'vae.priors.GaussianMixture'",
        "prior.components: None -> 10", "prior.init_spread: None -> 1.0"]


def test_resume_takes_a_new_learning_rate_and_a_new_optimizer(fast_config, tmp_path, straight):
    """The hint after a divergence (lower the lr, or optim=clipped_adam) works on resume: the new
    lr is used (the weights differ from resuming with the old one), and ClippedAdam takes over."""
    train(fast_config("trainer.epochs=1"), tmp_path / "run")
    weights = {}
    for name, overrides in {"same": [], "lr": ["optim.optim_args.lr=1e-2"], "clipped": ["optim=clipped_adam"]}.items():
        pyro.clear_param_store()
        run = tmp_path / name
        shutil.copytree(tmp_path / "run", run)
        train(fast_config("trainer.epochs=2", *overrides), run)
        weights[name] = param_snapshot()
        assert [m["epoch"] for m in read_metrics(run)] == [0, 1, 2]
        assert process_starts(run) == [(1, 0), (2, 0)], name
    assert all(torch.equal(v, straight[1][k]) for k, v in weights["same"].items())  # nothing changed: exact
    for name in ("lr", "clipped"):
        assert any(not torch.equal(v, weights["same"][k]) for k, v in weights[name].items()), name


def test_a_sweep_run_again_goes_on_with_its_recipe_as_it_is_now(fast_config, tmp_path):
    """A sweep's job run again with `experiment=NAME` takes the keys that the recipe sets now (an
    edited recipe: fewer epochs, one thread) over the run's saved config; nothing else changes, and
    without the recipe on the command line the saved value stays."""
    train(fast_config("trainer.epochs=1", "threads=2"), tmp_path)
    saved = checkpoint_module.saved_config(checkpoint_module.read(tmp_path / "checkpoint.pt"))
    now = compose_config("experiment=estimators/train")  # trainer.epochs: 3, threads: 1
    resumed = checkpoint_module.resumed_config(now, ["experiment=estimators/train"], tmp_path)
    assert (resumed.trainer.epochs, resumed.threads) == (now.trainer.epochs, now.threads) == (3, 1)
    assert resumed.data == saved.data and resumed.model == saved.model and resumed.estimator == saved.estimator
    assert checkpoint_module.resumed_config(now, [], tmp_path).trainer.epochs == 1


def test_resume_refuses_a_change_of_the_runs_identity(fast_config, tmp_path):
    train(fast_config("trainer.epochs=1"), tmp_path)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    pyro.clear_param_store()
    with pytest.raises(CheckpointError, match=r"estimator.reparameterized: True -> False.*only trainer.epochs"):
        train(fast_config("trainer.epochs=2", "estimator=score"), tmp_path)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before and len(read_metrics(tmp_path)) == 2


def test_resume_may_change_the_objective_of_a_reparameterized_guide(fast_config, tmp_path):
    """`estimator=iwae` on resume fine-tunes a run with the IW bound: the epochs before it are kept,
    the next one trains the IW bound (above the ELBO of the same run continued as it was)."""
    plain, tuned = tmp_path / "plain", tmp_path / "tuned"
    train(fast_config("trainer.epochs=1"), plain)
    shutil.copytree(plain, tuned)
    pyro.clear_param_store()
    train(fast_config("trainer.epochs=2"), plain)
    plain_params = param_snapshot()
    pyro.clear_param_store()
    train(fast_config("trainer.epochs=2", "estimator=iwae"), tuned)
    assert process_starts(tuned) == [(1, 0), (2, 0)]  # epoch 1 kept, not trained again on the IW bound
    assert read_metrics(tuned)[:2] == read_metrics(plain)[:2]
    assert read_metrics(tuned)[2]["train_elbo"] > read_metrics(plain)[2]["train_elbo"]  # log p(x) >= IW bound >= ELBO
    assert not all(torch.equal(v, plain_params[k]) for k, v in param_snapshot().items())
    pyro.clear_param_store()
    with pytest.raises(CheckpointError, match=r"estimator.reparameterized: True -> False"):
        train(fast_config("trainer.epochs=3", "estimator=score"), tuned)


def test_a_score_function_run_keeps_its_elbo_on_resume(fast_config, tmp_path):
    """README: overrides on resume may change the objective of a reparameterized guide only; a
    score-function run's estimator.elbo change is refused in one line, the checkpoint kept."""
    train(fast_config("trainer.epochs=1", "estimator=score"), tmp_path)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    pyro.clear_param_store()
    with pytest.raises(CheckpointError, match=r"estimator.elbo._target_: .* \(only a reparameterized guide may change its"):
        train(fast_config("trainer.epochs=2", "estimator=score", "estimator.elbo._target_=pyro.infer.TraceGraph_ELBO"), tmp_path)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before and len(read_metrics(tmp_path)) == 2


def test_metrics_agree_with_the_checkpoint_after_a_crash(fast_config, tmp_path, straight):
    """A crash after an epoch's line was written but before its checkpoint (and a last line cut
    short): the resumed run keeps each epoch once, and ends where an uninterrupted run ends."""
    (straight, straight_params), crashed = straight, tmp_path / "crashed"
    train(fast_config("trainer.epochs=1"), crashed)
    lines = (crashed / "metrics.jsonl").read_text()
    (crashed / "metrics.jsonl").write_text(lines + (straight / "metrics.jsonl").read_text().splitlines()[2] + "\n" + '{"epoch": 3, "tr')
    assert read_metrics_leaving_out_a_cut_line(crashed)[-1]["epoch"] == 2  # the cut line is left out when read
    pyro.clear_param_store()
    train(fast_config(), crashed)
    assert process_starts(crashed) == [(1, 0), (2, 0)]
    assert [m["epoch"] for m in read_metrics(crashed)] == [0, 1, 2]
    assert all(torch.equal(v, straight_params[k]) for k, v in param_snapshot().items())
    assert (crashed / "metrics.jsonl").read_text().count("\n") == 3  # no cut line left behind


def test_an_older_checkpoint_starts_a_new_run_and_never_overwrites_the_newer(fast_config, tmp_path):
    run, branch = tmp_path / "run", tmp_path / "branch"
    train(fast_config("trainer.keep_checkpoints=true"), run)
    newest = (run / "checkpoint.pt").read_bytes()
    pyro.clear_param_store()
    with pytest.raises(CheckpointError, match="newer checkpoint.pt"):
        train(fast_config(f"resume={run / 'checkpoint_epoch_001.pt'}"), run)
    train(fast_config(f"resume={run / 'checkpoint_epoch_001.pt'}"), branch)
    assert (run / "checkpoint.pt").read_bytes() == newest and len(read_metrics(run)) == 3
    assert [m["epoch"] for m in read_metrics(branch)] == [0, 1, 2]  # epochs 0-1 carried over, 2 trained anew
    assert process_starts(branch) == [(2, 0)]  # the branch began after epoch 1, from the copy
    assert read_metrics(branch)[:2] == read_metrics(run)[:2]


def test_a_second_training_in_the_same_directory_stops_at_once(fast_config, tmp_path):
    """While one process trains in a directory (it holds train.lock), another is refused before
    it writes anything, with the first one's process id."""
    command = [sys.executable, "train.py", *FAST, "data.subset=1024", "data.batch_size=4", "trainer.epochs=100",
               "threads=1", f"hydra.run.dir={tmp_path}"]
    first = subprocess.Popen(command, cwd=PROJECT_DIR, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "metrics.jsonl").is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        lines = (tmp_path / "metrics.jsonl").read_text()
        with pytest.raises(RunDirectoryBusy, match=rf"in use by another training \(process {first.pid}"):
            train(fast_config(), tmp_path)
        assert (tmp_path / "metrics.jsonl").read_text().startswith(lines)  # nothing of the second run
    finally:
        first.kill()
        first.wait()
    pyro.clear_param_store()
    train(fast_config("trainer.epochs=1", "data.subset=1024", "data.batch_size=4"), tmp_path)  # the lock died with it


def test_a_full_disk_keeps_the_last_good_checkpoint(fast_config, tmp_path, monkeypatch):
    train(fast_config("trainer.epochs=1"), tmp_path)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    pyro.clear_param_store()

    def save_on_a_full_disk(contents, path):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", save_on_a_full_disk)
    with pytest.raises(CheckpointError, match=f"cannot write {tmp_path / 'checkpoint.pt'}: no space left on {tmp_path}"):
        train(fast_config("trainer.epochs=2"), tmp_path)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before and not (tmp_path / "checkpoint.pt.tmp").exists()


def test_a_finite_divergence_is_warned_about_in_readable_numbers(fast_config, tmp_path, caplog):
    """lr=1e3 without NaN: the test ELBO sinks to ~-1e20 and more; the log says the run diverges,
    in four significant digits."""
    train(fast_config("trainer.epochs=1", "data.subset=128", "optim.optim_args.lr=1e3", "trainer.check_every_step=false"),
          tmp_path)
    (line,) = [r.getMessage() for r in caplog.records if "training is diverging" in r.getMessage()]
    elbo = read_metrics(tmp_path)[-1]["test_elbo"]
    assert elbo < -1e4 and line.startswith(f"test ELBO {elbo:.4g} is far below the untrained model's")
