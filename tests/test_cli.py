"""The command line as a user meets it: Hydra's errors, one-line config errors (device=cuda without
CUDA among them), multirun with the basic and the joblib launcher, and Ctrl-C / SIGTERM followed by
the printed resume command. Each test runs train.py in a subprocess, except the second Ctrl-C's,
which must land inside a step: it runs train() here, the two signals sent from within that step."""
from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

import train as train_module
import vae.runner as runner_module
from conftest import FAST, PROJECT_DIR, compose_config, process_starts
from vae.runs import resume_command


# The runs below train with threads=1: on a machine whose cores are busy, torch's threads wait for
# each other, and a step of these tiny networks takes many times longer.
def run_train(*args: str, timeout: float = 300, cwd=PROJECT_DIR) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PROJECT_DIR / "train.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def test_unknown_group_option_lists_the_choices(tmp_path):
    result = run_train("estimator=nope", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert "Could not find 'estimator/nope'" in result.stderr
    assert "reparam" in result.stderr and "score" in result.stderr


@pytest.mark.parametrize("override, message", [
    ("model.latent_dim=-3", "error: model.latent_dim=-3: must be a positive integer"),
    pytest.param("device=cuda", "error: device='cuda': CUDA is not available on this machine; use device=cpu or auto",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")),
], ids=["latent_dim", "cuda_absent"])
def test_invalid_value_is_one_line_naming_key_and_value(override, message, tmp_path):
    """Refused before any work: exit 1, one line, nothing trained (device=cuda does not fall back to the CPU)."""
    result = run_train(*FAST, override, f"hydra.run.dir={tmp_path}")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == message
    assert not any((tmp_path / name).exists() for name in ("metrics.jsonl", "checkpoint.pt", "provenance.jsonl"))


def test_multirun_runs_every_job(tmp_path):
    result = run_train("-m", *FAST, "threads=1", "trainer.epochs=1", "data.subset=128", "estimator=reparam,score",
                       f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    for job in ("0", "1"):
        metrics = [json.loads(line) for line in (tmp_path / job / "metrics.jsonl").read_text().splitlines()]
        assert [m["epoch"] for m in metrics] == [0, 1]
    estimators = {(tmp_path / job / ".hydra" / "overrides.yaml").read_text().count("estimator=score") for job in "01"}
    assert estimators == {0, 1}


def interrupted_run(run_dir, signum: int) -> tuple[str, tuple[int, int]]:
    """Start a long run in `run_dir`, send it `signum` once it trains (after epoch 0's test), and
    check that it saved and exited as the shell reports a process ended by that signal; return the
    resume command it printed and where its checkpoint stands (epoch, next batch)."""
    args = [*FAST, "threads=1", "data.batch_size=4", "trainer.epochs=100", f"hydra.run.dir={run_dir}"]
    process = subprocess.Popen([sys.executable, "train.py", *args], cwd=PROJECT_DIR, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run_dir / "metrics.jsonl").is_file() and time.monotonic() < deadline:  # epoch 0 written: epoch 1 begins
        time.sleep(0.2)
    time.sleep(0.3)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr
    output = stdout + stderr  # Hydra logs to stdout
    assert f"{signal.Signals(signum).name}: saved {run_dir / 'checkpoint.pt'}" in output
    command = next(line.strip() for line in output.splitlines() if line.strip().startswith("python train.py"))
    assert command.endswith(f"resume={run_dir}") and "data.batch_size=4" in command
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert saved["batches"] is not None and saved["next_batch"] >= 1  # saved after the step it was in, mid-epoch
    return command, (saved["epoch"], saved["next_batch"])


def test_sigterm_saves_and_prints_the_resume_command(tmp_path):
    run_dir = tmp_path / "run"
    command, (epoch, batch) = interrupted_run(run_dir, signal.SIGTERM)
    # The printed command, shortened to finish the interrupted epoch (the last override wins).
    resumed = run_train(*shlex.split(command)[2:], f"trainer.epochs={epoch}", f"hydra.run.dir={tmp_path / 'resume'}")
    assert resumed.returncode == 0, resumed.stderr
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(epoch + 1))
    assert process_starts(run_dir) == [(1, 0), (epoch, batch)]  # continued from the saved step, not from scratch


def test_ctrl_c_saves_and_prints_the_resume_command(tmp_path):
    interrupted_run(tmp_path / "run", signal.SIGINT)  # exit status 130, as after Ctrl-C


def test_a_second_ctrl_c_stops_at_once(tmp_path, monkeypatch):
    """Ctrl-C twice within one step: the first asks for a stop after the step, the second raises
    KeyboardInterrupt there and then: no step finished, nothing saved (the checkpoint is epoch 0's).
    The handlers that were there before the run are back after it."""
    svi_step, caught = runner_module.svi_step, []

    def ctrl_c_twice_then_step(*args, **kwargs):
        if not caught:
            signal.raise_signal(signal.SIGINT)  # the first: handled, training goes on
            caught.append(True)
            signal.raise_signal(signal.SIGINT)  # the second: raises here
            caught.append(False)
        return svi_step(*args, **kwargs)

    monkeypatch.setattr(runner_module, "svi_step", ctrl_c_twice_then_step)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train_module.train(compose_config(*FAST, "trainer.epochs=1"), tmp_path)
    assert caught == [True]
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert (saved["epoch"], saved["batches"], saved["next_batch"]) == (1, None, 0)
    assert signal.getsignal(signal.SIGINT) is before


def test_the_joblib_launcher_runs_the_jobs_in_its_worker_processes(tmp_path):
    """`hydra/launcher=parallel` launches through joblib: each job trains in a worker process, not in
    the sweep's own (each run directory's train.lock holds the pid of the process that trained there)."""
    process = subprocess.Popen([sys.executable, "train.py", "-m", "hydra/launcher=parallel", "threads=1", *FAST,
                                "trainer.epochs=1", "data.subset=64", "seed=0,1", f"hydra.sweep.dir={tmp_path}"],
                               cwd=PROJECT_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in output
    for job in ("0", "1"):
        metrics = (tmp_path / job / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["epoch"] for line in metrics] == [0, 1]
        assert int((tmp_path / job / "train.lock").read_text()) not in (process.pid, 0)  # trained in a worker


def test_resume_alone_continues_with_the_runs_own_config_in_its_own_directory(tmp_path):
    """`python train.py resume=<run dir> trainer.epochs=2`: no other override repeated; the run goes on
    with its saved config (synthetic data, not the default MNIST), logs into its own train.log and
    keeps its own .hydra/overrides.yaml; a change of what the run is (the estimator) is refused."""
    run_dir = tmp_path / "run"
    first = run_train(*FAST, "threads=1", "trainer.epochs=1", f"hydra.run.dir={run_dir}")
    assert first.returncode == 0, first.stderr
    overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()
    resumed = run_train(f"resume={run_dir}", "trainer.epochs=2", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    assert "resume changes trainer.epochs: 1 -> 2" in (run_dir / "train.log").read_text()
    assert process_starts(run_dir) == [(1, 0), (2, 0)]  # the resumed process began after epoch 1
    assert (run_dir / ".hydra" / "overrides.yaml").read_text() == overrides
    assert len(list((run_dir / ".hydra").glob("resume-*/overrides.yaml"))) == 1 and not (tmp_path / "outputs").exists()
    refused = run_train(f"resume={run_dir}", "estimator=score", cwd=tmp_path)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1].startswith("error: checkpoint") and "estimator.reparameterized" in refused.stderr


def test_a_refused_command_leaves_the_runs_saved_config_as_it_was(tmp_path):
    """A command refused against an existing run's directory (another latent size) must not rewrite
    that run's .hydra/config.yaml and overrides.yaml, which report.py labels the run by and the
    resume command is built from: the refused invocation's own go to .hydra/resume-<time>/."""
    run_dir = tmp_path / "run"
    first = run_train(*FAST, "threads=1", "trainer.epochs=1", "data.subset=128", f"hydra.run.dir={run_dir}")
    assert first.returncode == 0, first.stderr
    saved = {name: (run_dir / ".hydra" / name).read_bytes() for name in ("config.yaml", "overrides.yaml", "hydra.yaml")}
    refused = run_train(*FAST, "threads=1", "trainer.epochs=1", "data.subset=128", "model.latent_dim=5",
                        f"hydra.run.dir={run_dir}")
    assert refused.returncode == 1 and "model.latent_dim: 4 -> 5" in refused.stderr.strip().splitlines()[-1]
    assert {name: (run_dir / ".hydra" / name).read_bytes() for name in saved} == saved
    (invocation,) = (run_dir / ".hydra").glob("resume-*/overrides.yaml")
    assert "model.latent_dim=5" in invocation.read_text()
    assert "model.latent_dim=5" not in resume_command(run_dir)  # the printed command continues the run as it was


@pytest.mark.parametrize("entry,args", [
    ("train.py", ["hydra.run.dir={file}"]),
    ("train.py", ["hydra.run.dir={file}/run"]),
    ("train.py", ["-m", "hydra.sweep.dir={file}/sweep"]),
    ("evaluate.py", ["run=somewhere", "hydra.run.dir={file}/evaluation"]),
], ids=["run-dir-is-a-file", "run-dir-under-a-file", "sweep-dir-under-a-file", "evaluation-dir-under-a-file"])
def test_an_output_directory_that_cannot_be_made_is_one_line(entry, args, tmp_path):
    file = tmp_path / "a-file"
    file.write_text("not a directory\n")
    command = [sys.executable, str(PROJECT_DIR / entry), *(a.format(file=file) for a in args),
               *(FAST if entry == "train.py" else [])]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: hydra.") and "is a file, not a directory; give another directory" in line, line
    assert file.read_text() == "not a directory\n" and sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


@pytest.mark.parametrize("entry,args", [
    ("train.py", [*FAST, "model.latent_dim=-3"]),
    ("train.py", [*FAST, "optim.optim_args.lr=0"]),
    ("evaluate.py", ["run=somewhere", "task.num_particles=0"]),
    ("evaluate.py", ["run=somewhere", "threads=0"]),
], ids=["train-latent", "train-lr", "evaluate-task", "evaluate-threads"])
def test_a_command_refused_for_a_value_leaves_nothing_behind(entry, args, tmp_path):
    """Refused in one line by the config alone, before Hydra makes an output directory (no outputs/,
    no .hydra/, no log): vae.config.RefuseBeforeWriting."""
    result = subprocess.run([sys.executable, str(PROJECT_DIR / entry), *args], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.strip().startswith("error: "), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
