"""Kill trainings at random moments and count what was lost: `python faults.py`.

Each of `faults.runs` short trainings (conf/faults.yaml: synthetic data by default) is started in
a scratch directory and stopped at a random moment of its training by SIGKILL (no chance to save)
or SIGTERM (the clean stop): U(0, `faults.max_seconds` x the uninterrupted run's training time)
after it has begun training (data loaded, checkpoint read, metrics.jsonl cut back to the checkpoint
by an atomic rename: its provenance line written), where each step and checkpoint is at stake; the
start-up before it is not aimed at. It is started again with
the same command, which continues from whatever checkpoint the directory holds, until
`faults.kills` SIGKILLs and `faults.terms` SIGTERMs have been sent in all; then every run
finishes. Against one uninterrupted run of the same command, each run must end with the same
weights and the same metrics, each epoch's line once and in order. At each signal the script
notes what the run was doing, read from its files: training, writing a checkpoint (a
checkpoint.pt.tmp present), or it had finished first. Writes faults.json and faults.png (signals
by moment, and the outcome per run) into the Hydra run directory.
"""
from __future__ import annotations

import json
import logging
import math
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from matplotlib.figure import Figure
from omegaconf import DictConfig

from vae.config import CHECKPOINT_NAME, ConfigError, is_int, is_number
from vae.logbook import METRICS_NAME
from vae.provenance import PROJECT_DIR, PROVENANCE_NAME, record_provenance

log = logging.getLogger(__name__)
TIMING = ("seconds", "test_seconds", "wall_time")


def command(settings: list[str], run_dir: Path) -> list[str]:
    return [sys.executable, str(PROJECT_DIR / "train.py"), *settings, f"hydra.run.dir={run_dir}"]


def starts(run_dir: Path) -> int:
    """How many processes have begun training in run_dir (lines of its provenance.jsonl)."""
    path = run_dir / PROVENANCE_NAME
    return len(path.read_text().splitlines()) if path.is_file() else 0


def moment(run_dir: Path, last_epoch: int) -> str:
    """What a run that has begun training was doing, as its files show: writing a checkpoint, training,
    or exiting after its last epoch (its signal handlers already put back: a SIGTERM then ends it at once,
    with nothing left to save)."""
    if any(run_dir.glob("*.tmp")):
        return "writing a checkpoint"
    lines = (run_dir / METRICS_NAME).read_text().splitlines() if (run_dir / METRICS_NAME).is_file() else []
    try:
        done = bool(lines) and json.loads(lines[-1])["epoch"] >= last_epoch
    except (json.JSONDecodeError, KeyError):  # a line being written: still training
        done = False
    return "exiting after its last epoch" if done else "training"


def wait_for_training(process: subprocess.Popen, run_dir: Path, started_before: int) -> bool:
    """Wait until the process has begun training in run_dir (its provenance line is written: data
    loaded, checkpoint read) or has ended; True if it is training."""
    while starts(run_dir) <= started_before and process.poll() is None:
        time.sleep(0.01)
    return process.poll() is None


def interrupt(settings: list[str], run_dir: Path, signum: int, seconds: float, last_epoch: int) -> tuple[str, int]:
    """Start (or continue) the run and send `signum` `seconds` after it has begun training; (what it
    was doing, exit code). A run that ends first is not interrupted ('finished first')."""
    before = starts(run_dir)
    process = subprocess.Popen(command(settings, run_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if wait_for_training(process, run_dir, before):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.01)
    if process.poll() is not None:
        return "finished first", process.returncode
    doing = moment(run_dir, last_epoch)
    process.send_signal(signum)
    return doing, process.wait(timeout=300)


def training_seconds(settings: list[str], run_dir: Path) -> float:
    """Run the command uninterrupted; the seconds from the start of its training to its end."""
    process = subprocess.Popen(command(settings, run_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_training(process, run_dir, 0)
    started = time.perf_counter()
    if process.wait() != 0:
        raise SystemExit(f"error: the uninterrupted run failed (exit {process.returncode}): {' '.join(command(settings, run_dir))}")
    return time.perf_counter() - started


def outcome(run_dir: Path, reference: Path) -> dict[str, Any]:
    """Epochs lost and duplicated in metrics.jsonl, and whether metrics and weights equal the reference's."""
    lines = [json.loads(line) for line in (run_dir / METRICS_NAME).read_text().splitlines()]
    expected = [json.loads(line) for line in (reference / METRICS_NAME).read_text().splitlines()]
    counts = Counter(m["epoch"] for m in lines)
    strip = lambda ms: [{k: v for k, v in m.items() if k not in TIMING} for m in ms]  # noqa: E731
    weights = torch.load(run_dir / CHECKPOINT_NAME, map_location="cpu", weights_only=False)["param_store"]["params"]
    reference_weights = torch.load(reference / CHECKPOINT_NAME, map_location="cpu", weights_only=False)["param_store"]["params"]
    return {"epochs_lost": sum(1 for m in expected if m["epoch"] not in counts),
            "epochs_duplicated": sum(n - 1 for n in counts.values()),
            "metrics_equal": strip(lines) == strip(expected),
            "weights_equal": weights.keys() == reference_weights.keys()
                             and all(torch.equal(weights[k], reference_weights[k]) for k in weights)}


def check_plan(plan: DictConfig) -> None:
    """faults.*, refused in one line before any training: counts, a finite moment, a seed."""
    if not is_int(plan.runs) or plan.runs < 1:
        raise ConfigError(f"faults.runs={plan.runs!r}: must be a positive integer")
    for key in ("kills", "terms"):
        if not is_int(plan[key]) or plan[key] < 0:
            raise ConfigError(f"faults.{key}={plan[key]!r}: must be an integer >= 0")
    if plan.kills + plan.terms == 0:
        raise ConfigError("faults.kills=0 and faults.terms=0: no signal to send; give at least one")
    if not is_number(plan.max_seconds) or not 0 < plan.max_seconds < math.inf:
        raise ConfigError(f"faults.max_seconds={plan.max_seconds!r}: must be a finite number > 0")
    if not is_int(plan.seed):
        raise ConfigError(f"faults.seed={plan.seed!r}: must be an integer")


def faults(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    settings, plan = list(cfg.faults.settings), cfg.faults
    scratch = out_dir / "runs"
    reference = scratch / "uninterrupted"
    reference_seconds = training_seconds(settings, reference)
    last_epoch = json.loads((reference / METRICS_NAME).read_text().splitlines()[-1])["epoch"]
    chance = random.Random(plan.seed)
    signals = [signal.SIGKILL] * plan.kills + [signal.SIGTERM] * plan.terms
    chance.shuffle(signals)
    events = []
    for i, signum in enumerate(signals):
        run_dir = scratch / f"run_{i % plan.runs}"
        seconds = chance.uniform(0.0, plan.max_seconds * reference_seconds)  # after training has begun
        doing, code = interrupt(settings, run_dir, signum, seconds, last_epoch)
        events.append({"run": run_dir.name, "signal": signal.Signals(signum).name, "after_seconds": seconds,
                       "moment": doing, "exit_code": code})
        log.info(f"{i + 1}/{len(signals)} {run_dir.name}: {events[-1]['signal']} after {seconds:.1f} s, {doing} "
                 f"(exit {code})")
    runs = {}
    for i in range(plan.runs):
        run_dir = scratch / f"run_{i}"
        finished = subprocess.run(command(settings, run_dir), capture_output=True, text=True)
        runs[run_dir.name] = {"final_exit_code": finished.returncode, "starts": starts(run_dir),
                              **(outcome(run_dir, reference) if finished.returncode == 0 else {})}
    summary = {"runs": plan.runs, "kills": plan.kills, "terms": plan.terms, "training_seconds": reference_seconds,
               "runs_resumed_to_the_end": sum(r["final_exit_code"] == 0 for r in runs.values()),
               "epochs_lost": sum(r.get("epochs_lost", 0) for r in runs.values()),
               "epochs_duplicated": sum(r.get("epochs_duplicated", 0) for r in runs.values()),
               "runs_equal_to_uninterrupted": sum(bool(r.get("weights_equal") and r.get("metrics_equal")) for r in runs.values()),
               "moments": dict(Counter(f"{e['signal']}, {e['moment']}" for e in events)),
               "sigterm_exit_codes": dict(Counter(e["exit_code"] for e in events if e["signal"] == "SIGTERM"))}
    return {"summary": summary, "settings": settings, "runs": runs, "events": events}


def plot(result: dict[str, Any], path: Path) -> None:
    """Signals by what the run was doing when they came, and each run's outcome."""
    figure = Figure(figsize=(10, 3.8))
    left, right = figure.subplots(1, 2)
    moments = result["summary"]["moments"]
    left.barh(list(moments), list(moments.values()))
    left.set(xlabel="signals", title="what the run was doing")
    names = list(result["runs"])
    left_over = [result["runs"][n].get("epochs_lost", 0) + result["runs"][n].get("epochs_duplicated", 0) for n in names]
    equal = [bool(result["runs"][n].get("weights_equal")) for n in names]
    right.bar(names, [result["runs"][n]["starts"] for n in names], color=["tab:green" if e else "tab:red" for e in equal])
    right.set(ylabel="processes started", title="runs (green: ended equal to the uninterrupted run)")
    right.tick_params(axis="x", rotation=90)
    for x, n in enumerate(left_over):
        if n:
            right.annotate(f"{n} epochs lost or doubled", (x, 0.5), rotation=90, color="white")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


@hydra.main(version_base="1.3", config_path="conf", config_name="faults")
def main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        check_plan(cfg.faults)
    except ConfigError as error:
        sys.exit(f"error: {error}")
    record_provenance(out_dir)
    result = faults(cfg, out_dir)
    (out_dir / "faults.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out_dir / "faults.png")
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
