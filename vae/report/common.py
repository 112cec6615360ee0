"""What every study's tables share: where the recipes wrote (`Outputs`), reading their outputs (a missing one
is `NotRun`, naming the command that makes it), the provenance line under each table, and the sweeps' jobs.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from vae.logbook import read_metrics
from vae.provenance import read_provenance
from vae.runner import another_epoch_fits
from vae.sweeps import configuration, nats, read_failures, read_jobs


@dataclass
class Outputs:
    """Where the recipes wrote (outputs/experiments/<name>, multirun/experiments/<name>) and where
    the documents' figures go; `full`: docs/ (commit and date in the provenance line), not the README."""

    experiments: Path
    sweeps: Path
    figures: Path
    full: bool = True

    def run(self, name: str) -> Path:
        return self.experiments / name

    def sweep(self, name: str) -> Path:
        return self.sweeps / name


class NotRun(Exception):
    """A recipe's outputs are not there yet; the message is the command that makes them."""


def read_json(path: Path, command: str) -> Any:
    if not path.is_file():
        raise NotRun(command)
    return json.loads(path.read_text())


def read_jsonl(path: Path, command: str) -> list[dict[str, Any]]:
    if not path.is_file():
        raise NotRun(command)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def provenance_line(out: Outputs, *directories: Path) -> str:
    """One line: CPU, threads, GPU, torch, pyro (docs/: also the commits and dates) of every
    process that wrote into `directories` or the job directories under them."""
    entries = [e for d in directories for p in [d, *sorted(d.glob("*/"))] for e in read_provenance(p)]
    if not entries:
        return "_(no provenance.jsonl found)_"
    values = lambda key: sorted({str(e.get(key)) for e in entries})  # noqa: E731
    gpus = [g for g in values("gpu") if g != "None"]
    threads = values("threads")
    parts = [f"{' / '.join(values('cpu'))}, {' / '.join(threads)} thread{'' if threads == ['1'] else 's'}",
             f"GPU {' / '.join(gpus)}" if gpus else "no GPU",
             f"torch {' / '.join(values('torch'))}", f"pyro {' / '.join(values('pyro'))}"]
    if out.full:
        commits = sorted({(e.get("commit") or "unknown")[:7] + ("+changes" if e.get("uncommitted_changes") else "")
                          for e in entries})
        dates = sorted(e["date"][:10] for e in entries)
        parts += [f"commit {', '.join(commits)}", dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"]
    return "Measured on " + "; ".join(parts) + "."


def table(head: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def last_tested(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """The line of metrics.jsonl of the run's last tested epoch."""
    return [m for m in metrics if m.get("test_elbo") is not None][-1]


def bold_nll(nll: dict[str, Any]) -> str:
    """The whole test set's NLL of an evaluation, with its standard error: "**82.86 ± 0.10**"."""
    return f"**{nats(nll['whole_split_nll'])} ± {nll['whole_split_nll_standard_error']:.2f}**"


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {round(seconds % 60):02d} s"


def copy_figure(source: Path, target: Path) -> None:
    if source.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)


def trained_jobs(out: Outputs, name: str) -> tuple[Path, dict[str, list[list[dict[str, Any]]]]]:
    """(the sweep directory of `python train.py -m experiment=<name>/train`, its jobs by configuration);
    NotRun, naming that command, while it holds none."""
    sweep = out.sweep(name)
    jobs = read_jobs(sweep) if sweep.is_dir() else {}
    if not jobs:
        raise NotRun(f"python train.py -m experiment={name}/train")
    return sweep, jobs


def label_options(label: str) -> dict[str, str]:
    """{key: value} of the overrides in a configuration label ("model.flows=2 estimator=iwae")."""
    return dict(o.split("=", 1) for o in label.split() if "=" in o)


def failed_seeds(sweep: Path) -> dict[str, list[int]]:
    """{configuration label: the seeds whose job failed or diverged} of a sweep."""
    failed: dict[str, list[int]] = {}
    for failure in read_failures(sweep):
        failed.setdefault(failure["configuration"], []).append(failure["seed"])
    return failed


def at_common_epoch(seeds: list[list[dict[str, Any]]]) -> tuple[int, list[dict[str, Any]]]:
    """(the last epoch every seed reached, each seed's metrics at it)."""
    epoch = min(metrics[-1]["epoch"] for metrics in seeds)
    return epoch, [next(m for m in metrics if m["epoch"] == epoch) for metrics in seeds]


def sweep_progress(sweep: Path) -> str:
    """'' when every job of the sweep has trained all its epochs or spent its time budget, else a
    sentence saying how many have."""
    jobs = [d for d in sorted(sweep.glob("*/")) if (d / ".hydra" / "config.yaml").is_file()]
    trainers = {d: OmegaConf.load(d / ".hydra" / "config.yaml").trainer for d in jobs}
    planned = {d: trainer.epochs for d, trainer in trainers.items()}
    if not planned:  # no job has started
        return ""

    def finished(job: Path) -> bool:
        metrics, budget = read_metrics(job), trainers[job].get("max_minutes")
        return bool(metrics) and (metrics[-1]["epoch"] >= planned[job] or (budget is not None and budget_spent(metrics, budget)))

    done = [d for d in jobs if finished(d)]
    multirun = sweep / "multirun.yaml"  # the sweep's own config: how many jobs it launches
    params = OmegaConf.load(multirun).hydra.sweeper.get("params") or {} if multirun.is_file() else {}
    total = max(len(jobs), math.prod(len(str(values).split(",")) for values in params.values()))
    if len(done) == total:
        return ""
    return (f"\n\n**In progress:** {len(done)} of {total} jobs have trained their {max(planned.values())} epochs; "
            "each row is shown at the last epoch that all its seeds have reached.")


def budget_spent(metrics: list[dict[str, Any]], max_minutes: float) -> bool:
    """Whether a run ended by its time budget (vae/runner.py's rule, on the wall time before its last epoch's
    test): another epoch as long as its last would not fit; runs from before that rule stopped on reaching it."""
    before = metrics[-2]["wall_time"] if len(metrics) > 1 else 0.0
    seconds = metrics[-1].get("seconds") or 0.0
    return (not another_epoch_fits(before + seconds, seconds, 60 * max_minutes)
            or metrics[-1].get("wall_time", 0.0) >= 60 * max_minutes)


def run_evaluations(sweep: Path) -> list[tuple[str, int, dict[str, Any], Path]]:
    """(the evaluated run's configuration label, its seed, the metrics, the evaluation's directory)
    for every job of an evaluation sweep over the runs of another sweep."""
    evaluations = []
    for metrics_file in sorted(sweep.glob("*/metrics.json")):
        metrics = json.loads(metrics_file.read_text())
        run = Path(metrics["run"])
        if not run.is_dir():  # its label and seed come from the run's overrides: never guess them
            raise NotRun(f"the run {run} that {metrics_file} evaluated (run the report where the runs are)")
        label, seed = configuration(run)
        evaluations.append((label, seed, metrics, metrics_file.parent))
    return evaluations


def option_cell(value: str) -> str:
    """A config option's value as a table cell: numbers as they are, names as code."""
    return value if value.lstrip("-").replace(".", "", 1).isdigit() else f"`{value}`"
