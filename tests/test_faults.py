"""kill -9 at random moments: every resumed run ends where an uninterrupted one ends, and
metrics.jsonl holds each epoch once, in order."""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import FAST, PROJECT_DIR, process_starts
from vae.checkpoint import saved_state

SETTINGS = [*FAST, "data.subset=512", "data.batch_size=16", "trainer.epochs=3", "threads=1"]  # 32 steps an epoch


def command(run_dir) -> list[str]:
    return [sys.executable, "train.py", *SETTINGS, f"hydra.run.dir={run_dir}"]


def provenance_lines(run_dir) -> int:
    path = run_dir / "provenance.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def weights(run_dir) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)["param_store"]["params"]


def saved_position(run_dir) -> tuple[int, int]:
    """(epoch, batch) the run directory's checkpoint continues at; (1, 0) before the first one."""
    if not (run_dir / "checkpoint.pt").is_file():
        return (1, 0)
    state = saved_state(torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False))
    return (state.epoch, state.batch_in_epoch)


def start(run_dir) -> tuple[subprocess.Popen, float]:
    """Start (or resume) the run; return once it has taken its directory and begun, with the time then."""
    started_before = provenance_lines(run_dir)
    process = subprocess.Popen(command(run_dir), cwd=PROJECT_DIR, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while provenance_lines(run_dir) == started_before and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return process, time.monotonic()


def test_kill_9_at_random_moments_loses_and_duplicates_nothing(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    process, began = start(straight)
    assert process.wait(timeout=300) == 0
    duration = time.monotonic() - began  # the moments are fractions of it: as fast or slow as this machine
    moments = random.Random(0)
    kills, positions = 0, []
    for _ in range(3):  # each time: start (or resume), let it train a random part of a run, kill -9
        positions.append(saved_position(killed))  # where the next process must begin
        process, began = start(killed)
        time.sleep(max(0.0, began + moments.uniform(0.05, 0.4) * duration - time.monotonic()))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait(timeout=60)
    positions.append(saved_position(killed))
    finished = subprocess.run(command(killed), cwd=PROJECT_DIR, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert kills >= 2  # the moments fell inside the training, not after it
    # every process began where the checkpoint left by the one before it stopped (a restart from
    # scratch would begin at (1, 0) and, being seeded, still end with the same weights and epochs)
    assert process_starts(killed) == positions and positions[-1] > (1, 0), positions
    epochs = [json.loads(line)["epoch"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2, 3]
    straight_weights = weights(straight)
    for name, value in weights(killed).items():
        assert torch.equal(value, straight_weights[name]), name
    timing = {"seconds", "test_seconds", "wall_time"}
    strip = lambda path: [{k: v for k, v in json.loads(line).items() if k not in timing}  # noqa: E731
                          for line in path.read_text().splitlines()]
    assert strip(killed / "metrics.jsonl") == strip(straight / "metrics.jsonl")


def test_the_fault_script_counts_what_was_lost(tmp_path):
    """faults.py end to end, on one run with one SIGKILL and one SIGTERM: both resumed, nothing lost."""
    settings = "[" + ",".join(f"'{s}'" for s in [*FAST, "data.subset=128", "trainer.epochs=1", "threads=1"]) + "]"
    result = subprocess.run([sys.executable, "faults.py", "faults.runs=1", "faults.kills=1", "faults.terms=1",
                             f"faults.settings={settings}", f"hydra.run.dir={tmp_path}"], cwd=PROJECT_DIR,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "faults.json").read_text())
    summary = report["summary"]
    assert (summary["runs_resumed_to_the_end"], summary["epochs_lost"], summary["epochs_duplicated"]) == (1, 0, 0)
    assert summary["runs_equal_to_uninterrupted"] == 1 and sum(summary["moments"].values()) == 2
    assert [e["signal"] for e in report["events"]].count("SIGKILL") == 1
    assert (tmp_path / "faults.png").stat().st_size > 0


@pytest.mark.parametrize("overrides,message", [
    (["faults.runs=0"], "faults.runs=0: must be a positive integer"),
    (["faults.kills=-1"], "faults.kills=-1: must be an integer >= 0"),
    (["faults.max_seconds=nan"], "faults.max_seconds=nan: must be a finite number > 0"),
    (["faults.kills=0", "faults.terms=0"], "faults.kills=0 and faults.terms=0: no signal to send"),
])
def test_a_bad_fault_plan_is_one_line_before_any_training(overrides, message, tmp_path):
    result = subprocess.run([sys.executable, "faults.py", *overrides, f"hydra.run.dir={tmp_path}"], cwd=PROJECT_DIR,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith(f"error: {message}")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "faults.json").exists()
