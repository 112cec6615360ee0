"""The command line as a user meets it: Hydra's errors, one-line config errors, multirun,
and Ctrl-C / SIGTERM followed by the printed resume command. Each test runs train.py in a
subprocess."""
from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time

from conftest import FAST, PROJECT_DIR


def run_train(*args: str, timeout: float = 300, cwd=PROJECT_DIR) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PROJECT_DIR / "train.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def test_unknown_group_option_lists_the_choices(tmp_path):
    result = run_train("estimator=nope", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert "Could not find 'estimator/nope'" in result.stderr
    assert "reparam" in result.stderr and "score" in result.stderr


def test_invalid_value_is_one_line_naming_key_and_value(tmp_path):
    result = run_train(*FAST, "model.latent_dim=-3", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == "error: model.latent_dim=-3: must be a positive integer"


def test_multirun_runs_every_job(tmp_path):
    result = run_train("-m", *FAST, "trainer.epochs=1", "data.subset=128", "estimator=reparam,score",
                       f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    for job in ("0", "1"):
        metrics = [json.loads(line) for line in (tmp_path / job / "metrics.jsonl").read_text().splitlines()]
        assert [m["epoch"] for m in metrics] == [0, 1]
    estimators = {(tmp_path / job / ".hydra" / "overrides.yaml").read_text().count("estimator=score") for job in "01"}
    assert estimators == {0, 1}


def test_sigterm_saves_and_prints_the_resume_command(tmp_path):
    run_dir = tmp_path / "run"
    args = [*FAST, "data.subset=null", "data.batch_size=4", "trainer.epochs=100", f"hydra.run.dir={run_dir}"]
    process = subprocess.Popen([sys.executable, "train.py", *args], cwd=PROJECT_DIR, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    metrics_file = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not metrics_file.is_file() and time.monotonic() < deadline:  # epoch 0 written: epoch 1 begins
        time.sleep(0.2)
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr  # as the shell reports a process ended by it
    output = stdout + stderr  # Hydra logs to stdout
    command = next(line.strip() for line in output.splitlines() if line.strip().startswith("python train.py"))
    assert command.endswith(f"resume={run_dir}") and "data.batch_size=4" in command

    # The printed command, shortened to finish the interrupted first epoch (the last override wins).
    resumed = run_train(*shlex.split(command)[2:], "trainer.epochs=1", f"hydra.run.dir={tmp_path / 'resume'}")
    assert resumed.returncode == 0, resumed.stderr
    epochs = [json.loads(line)["epoch"] for line in metrics_file.read_text().splitlines()]
    assert epochs == [0, 1]


def test_resume_alone_continues_with_the_runs_own_config_in_its_own_directory(tmp_path):
    """`python train.py resume=<run dir> trainer.epochs=2`: no other override repeated; the run goes on
    with its saved config (synthetic data, not the default MNIST), logs into its own train.log and
    keeps its own .hydra/overrides.yaml; a change of what the run is (the estimator) is refused."""
    run_dir = tmp_path / "run"
    first = run_train(*FAST, "trainer.epochs=1", f"hydra.run.dir={run_dir}")
    assert first.returncode == 0, first.stderr
    overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()
    resumed = run_train(f"resume={run_dir}", "trainer.epochs=2", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    assert "resume changes trainer.epochs: 1 -> 2" in (run_dir / "train.log").read_text()
    assert (run_dir / ".hydra" / "overrides.yaml").read_text() == overrides
    assert len(list((run_dir / ".hydra").glob("resume-*/overrides.yaml"))) == 1 and not (tmp_path / "outputs").exists()
    refused = run_train(f"resume={run_dir}", "estimator=score", cwd=tmp_path)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1].startswith("error: checkpoint") and "estimator.reparameterized" in refused.stderr
