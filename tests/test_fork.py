"""A recipe that forks a run: `experiment=best_one_hour/iwae` goes on from the copy of the run's last epoch
that ended within 40 minutes (vae.runs.fork_point), trains on the IW bound in its own directory, and,
run again after a stop, continues itself; the objective and the other choices of the recipe reach the
resumed config (vae.checkpoint.recipe_keys), so the fork is one command, not a copy and two resumes."""
from __future__ import annotations

import json
import subprocess
import sys

import pyro
import pytest
import torch

from conftest import FAST, PROJECT_DIR, compose_config, process_starts
from train import train
from vae.checkpoint import recipe_keys
from vae.runs import RunError, fork_point


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_fork_point_is_the_last_copy_within_the_minutes_then_the_forks_own(tmp_path):
    run, fork = tmp_path / "run", tmp_path / "fork"
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    train(compose_config(*FAST, "trainer.keep_checkpoints=true", "trainer.epochs=3"), run)
    lines = read_metrics(run)
    between = (lines[2]["wall_time"] + lines[3]["wall_time"]) / 2 / 60  # after epoch 2 ended, before epoch 3 did
    assert fork_point(run, between, fork) == str(run / "checkpoint_epoch_002.pt")
    assert fork_point(run, lines[3]["wall_time"] / 60 + 1, fork) == str(run / "checkpoint_epoch_003.pt")  # past the end
    with pytest.raises(RunError, match="no per-epoch checkpoint of an epoch that ended within"):
        fork_point(run, lines[1]["wall_time"] / 120, fork)  # before the first epoch ended
    with pytest.raises(RunError, match="no run in"):
        fork_point(tmp_path / "absent", 40, fork)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    train(compose_config(*FAST, f"resume={fork_point(run, between, fork)}", "estimator=iwae", "trainer.epochs=3"), fork)
    forked = read_metrics(fork)
    assert [m["epoch"] for m in forked] == [0, 1, 2, 3] and forked[:3] == lines[:3]  # the run's first epochs
    assert forked[3]["test_elbo"] != lines[3]["test_elbo"] and process_starts(fork) == [(3, 0)]
    assert fork_point(run, between, fork) == str(fork / "checkpoint.pt")  # a fork that ran goes on from its own


def test_a_recipe_names_the_groups_its_defaults_choose_and_the_keys_of_the_recipes_it_builds_on():
    keys = recipe_keys("experiment=best_one_hour/iwae")
    assert {"estimator", "resume", "trainer.max_minutes"} <= set(keys)  # its own
    assert {"posterior", "model.latent_dim", "trainer.keep_checkpoints"} <= set(keys)  # best_one_hour/train's
    assert {"trainer.epochs", "trainer.test_every"} <= set(keys)  # one_hour/train's
    assert recipe_keys("estimator=iwae") == [] and recipe_keys("experiment=no_such/recipe") == []


def test_the_fork_recipe_is_one_command_that_continues_itself(tmp_path):
    """The recipes as a user runs them (from a folder of their own, on tiny settings): the hour, then its
    fork, which trains the IW bound from the hour's last epoch within 40 minutes; run again with more
    epochs, the fork continues from its own checkpoint."""
    small = [*FAST, "trainer.check_every_step=false", "trainer.test_every=1", "posterior.hidden_dims=[16]",
             "threads=1"]  # on a busy machine two threads wait for each other: the flows' steps take 40 times longer

    def run(recipe: str, epochs: int) -> None:
        subprocess.run([sys.executable, str(PROJECT_DIR / "train.py"), f"experiment={recipe}", *small,
                        f"trainer.epochs={epochs}"], cwd=tmp_path, check=True, capture_output=True, timeout=300)

    hour, fork = tmp_path / "outputs" / "experiments" / "best_one_hour", tmp_path / "outputs" / "experiments" / "best_one_hour_iwae"
    run("best_one_hour/train", 2)
    run("best_one_hour/iwae", 3)
    assert [m["epoch"] for m in read_metrics(fork)] == [0, 1, 2, 3] and read_metrics(fork)[:3] == read_metrics(hour)
    assert process_starts(fork) == [(3, 0)]
    saved = torch.load(fork / "checkpoint.pt", weights_only=False)["config"]
    assert saved["estimator"]["elbo"]["_target_"] == "vae.iwae.IWAE_ELBO" and saved["trainer"]["max_minutes"] == 60
    assert saved["posterior"]["_target_"] == "vae.flows.InverseAutoregressive" and saved["model"]["latent_dim"] == 4
    run("best_one_hour/iwae", 4)  # again, one epoch more: the fork goes on from its own checkpoint
    assert [m["epoch"] for m in read_metrics(fork)] == [0, 1, 2, 3, 4] and process_starts(fork) == [(3, 0), (4, 0)]
    missing = subprocess.run([sys.executable, str(PROJECT_DIR / "train.py"), "experiment=best_one_hour/iwae", *small],
                             cwd=tmp_path / "outputs", capture_output=True, text=True, timeout=300)
    assert missing.returncode == 1 and missing.stderr.strip().splitlines()[-1].startswith(
        "error: no run in outputs/experiments/best_one_hour to fork")
