"""Sweeps: the launcher and sweeper presets, a multirun that goes on past a diverging job (and
report.py's list of it), an Optuna study past a diverging trial, and a submitit job that continues
the checkpoint already in its run directory (what a requeued job finds). The report's blocks and
tables over fake outputs are in tests/test_report.py."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from conftest import CONF_DIR, FAST, PROJECT_DIR, compose_config, process_starts
from hydra import compose, initialize_config_dir

from report import report
from train import train

LAUNCHERS = sorted(path.stem for path in (CONF_DIR / "hydra" / "launcher").glob("*.yaml"))
SWEEPERS = sorted(path.stem for path in (CONF_DIR / "hydra" / "sweeper").glob("*.yaml"))


@pytest.mark.parametrize("group,option", [("launcher", o) for o in LAUNCHERS] + [("sweeper", o) for o in SWEEPERS])
def test_hydra_presets_compose(group, option):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/{group}={option}"], return_hydra_config=True)
    node = cfg.hydra[group]
    assert node._target_.startswith("hydra_plugins.")
    if option == "slurm":
        assert node.partition and node.gpus_per_node == 1 and node.timeout_min > 0 and node.array_parallelism > 0
    if option == "lr_latent":
        assert node.direction == "maximize" and set(node.params) == {"optim.optim_args.lr", "model.latent_dim"}


def test_report_and_variance_configs_compose():
    assert compose_config(config_name="variance").samples >= 2
    assert compose_config("sweep=somewhere", config_name="report").sweep == "somewhere"


def test_submitit_job_continues_the_checkpoint_in_its_run_directory(tmp_path):
    """A requeued job reruns in the same directory: it must continue, not restart."""
    overrides = [*FAST, "data.subset=64", "estimator=score_avg_baseline", "threads=1"]
    train(compose_config(*overrides, "trainer.epochs=1"), tmp_path / "0")  # the job's first life
    result = subprocess.run(
        [sys.executable, "train.py", "-m", "hydra/launcher=submitit_local", *overrides, "trainer.epochs=2",
         f"hydra.sweep.dir={tmp_path}"], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert process_starts(tmp_path / "0") == [(1, 0), (2, 0)]  # the requeued job began at epoch 2, not again at (1, 0)
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "0" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2]


def test_a_diverging_job_is_recorded_and_the_sweep_goes_on(tmp_path):
    """lr=1e6 turns the loss into NaN within the first epoch: that job writes failed.json and the
    multirun still runs the next job to the end, exits 0, and report.py lists the failure."""
    result = subprocess.run(
        [sys.executable, "train.py", "-m", *FAST, "data.subset=128", "trainer.epochs=1", "optim.optim_args.lr=1e6,1e-3",
         "threads=1", f"hydra.sweep.dir={tmp_path}"],
        cwd=PROJECT_DIR, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    failure = json.loads((tmp_path / "0" / "failed.json").read_text())
    assert failure["error"] == "TrainingDiverged" and failure["message"].startswith("loss is nan at epoch 1")
    assert not (tmp_path / "1" / "failed.json").exists()
    assert [json.loads(line)["epoch"] for line in (tmp_path / "1" / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    rows = {next(o for o in row["configuration"].split() if o.startswith("optim.")): row for row in report(tmp_path)}
    assert rows["optim.optim_args.lr=1000000.0"]["epoch"] == 0 and rows["optim.optim_args.lr=0.001"]["epoch"] == 1  # both rows
    table = (tmp_path / "report.md").read_text()
    (failed_line,) = [line for line in table.splitlines() if line.startswith("- ")]
    assert "Failed jobs (1)" in table and failed_line.startswith(f"- `{tmp_path / '0'}`")
    assert "optim.optim_args.lr=1000000.0" in failed_line and "seed 0): TrainingDiverged: loss is nan" in failed_line
    assert json.loads((tmp_path / "report.json").read_text())["failed"][0]["job"] == str(tmp_path / "0")


def test_a_job_failing_with_any_error_is_recorded_and_listed_and_the_sweep_goes_on(tmp_path):
    """An error no check foresaw (here the leave-one-out ELBO's refusal of 1 particle, raised while SVI
    is built) still writes the job's failed.json; the next job trains and report.py lists the failure."""
    result = subprocess.run(
        [sys.executable, "train.py", "-m", *FAST, "data.subset=64", "trainer.epochs=1", "estimator=score_loo",
         "estimator.elbo.num_particles=1,2", "threads=1", f"hydra.sweep.dir={tmp_path}"], cwd=PROJECT_DIR,
        capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    failure = json.loads((tmp_path / "0" / "failed.json").read_text())
    assert "num_particles=1: a leave-one-out baseline needs at least 2" in failure["message"], failure
    assert not (tmp_path / "1" / "failed.json").exists()
    assert [json.loads(line)["epoch"] for line in (tmp_path / "1" / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    report(tmp_path)
    (failed,) = json.loads((tmp_path / "report.json").read_text())["failed"]
    assert failed["job"] == str(tmp_path / "0") and "estimator.elbo.num_particles=1" in failed["configuration"]


def test_a_diverging_trial_does_not_end_the_optuna_study(tmp_path):
    """The Optuna preset counts a diverged trial as failed (train.main returns None) and goes on to
    its other trials and a best value (max_failure_rate: 1.0)."""
    result = subprocess.run(
        [sys.executable, "train.py", "-m", "hydra/sweeper=lr_latent", "hydra.sweeper.n_trials=3",
         "optim.optim_args.lr=choice(1e6,1e-3)", *FAST, "model.latent_dim=4", "data.subset=128", "trainer.epochs=1",
         "threads=1", f"hydra.sweep.dir={tmp_path}"],
        cwd=PROJECT_DIR, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    failed = sorted(path.parent.name for path in tmp_path.glob("*/failed.json"))
    finished = sorted(path.parent.name for path in tmp_path.glob("*/metrics.jsonl")
                      if not (path.parent / "failed.json").exists())
    assert failed and finished and len(failed) + len(finished) == 3, (failed, finished)
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert best["best_params"]["optim.optim_args.lr"] == 1e-3 and best["best_value"] < 0
    output = result.stdout + result.stderr  # Optuna's lines come through Hydra's log, plain
    assert "A new study created in memory with name: lr_latent" in output
    assert "\x1b[" not in output and "setup plugin" not in output
