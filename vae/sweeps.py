"""A Hydra multirun aggregated over seeds: jobs whose overrides differ only in `seed` form one
configuration; per configuration, the test ELBO's median, range, mean and sd over seeds, as a
table and as curves against epoch and wall time.

The median and the range, not the mean and sd, lead, because one diverging seed (-1e9) would
otherwise hide the seeds that learn; for the same reason the curves show -ELBO on a log axis when
every ELBO is negative.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from vae.checkpoint import CHECKPOINT_NAME
from vae.logbook import FAILED_NAME, METRICS_NAME
from vae.runs import run_overrides

IGNORED_OVERRIDES = ("seed=", "resume=", "hydra.", "experiment=")  # what does not make a different configuration
# (a recipe names the sweep; the overrides its sweeper adds are what tell its configurations apart)


class SweepNotRun(ValueError):
    """A sweep directory that holds no finished job."""


def sweep_jobs(sweep: str) -> str:
    """The jobs of the multirun in `sweep` that hold a checkpoint, as Hydra's sweep syntax "a,b,c" in job
    order: an evaluation recipe sweeps `run: ${sweep_jobs:multirun/experiments/NAME}` instead of listing
    them (evaluate.py registers the resolver)."""
    jobs = sorted((job for job in Path(sweep).glob("*") if job.name.isdigit() and (job / CHECKPOINT_NAME).is_file()),
                  key=lambda job: int(job.name))
    if not jobs:
        raise SweepNotRun(f"no trained job in {sweep}: run its training recipe first (its command is in the recipe's header)")
    return ",".join(str(job) for job in jobs)


def configuration(job_dir: Path) -> tuple[str, int]:
    """(the label of a job's configuration: its overrides but the seed's, the job's seed)."""
    overrides = run_overrides(job_dir)
    label = " ".join(sorted(o for o in overrides if not o.startswith(IGNORED_OVERRIDES))) or "default"
    seed = next((int(o.split("=", 1)[1]) for o in overrides if o.startswith("seed=")), 0)  # conf: seed 0
    return label, seed


def read_jobs(*sweeps: Path) -> dict[str, list[list[dict[str, Any]]]]:
    """{configuration label: [metrics of each seed's job (one dict per epoch)], in seed order},
    over every job (a directory holding metrics.jsonl) in or under each of `sweeps`."""
    jobs: dict[str, list[tuple[int, list[dict[str, Any]]]]] = {}
    for metrics_file in sorted(file for sweep in sweeps for file in sweep.rglob(METRICS_NAME)):
        label, seed = configuration(metrics_file.parent)
        metrics = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
        if metrics:
            jobs.setdefault(label, []).append((seed, metrics))
    return {label: [metrics for _, metrics in sorted(seeds, key=lambda pair: pair[0])] for label, seeds in jobs.items()}


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def curves(seeds: list[list[dict[str, Any]]]) -> dict[str, list]:
    """Per tested epoch that every seed reached: epoch, mean wall time, and over seeds the test
    ELBO's mean, spread (sd), median, worst and best, and each seed's value."""
    tested = [{m["epoch"]: m for m in metrics if m.get("test_elbo") is not None} for metrics in seeds]
    epochs = sorted(set.intersection(*(set(t) for t in tested)))
    out: dict[str, list] = {key: [] for key in ("wall_time", "mean", "spread", "median", "worst", "best", "seeds")}
    out["epoch"] = epochs
    for epoch in epochs:
        values = [t[epoch]["test_elbo"] for t in tested]
        mean, spread = mean_and_spread(values)
        out["wall_time"].append(statistics.fmean(t[epoch].get("wall_time") or 0.0 for t in tested))
        out["mean"].append(mean)
        out["spread"].append(spread)
        out["median"].append(statistics.median(values))
        out["worst"].append(min(values))
        out["best"].append(max(values))
        out["seeds"].append(values)
    return out


def summarize(jobs: dict[str, list[list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """One row per configuration: seeds, last common tested epoch, test ELBO mean/spread, wall time."""
    rows = []
    for label, seeds in jobs.items():
        curve = curves(seeds)
        if not curve["epoch"]:
            continue
        rows.append({"configuration": label, "seeds": len(seeds), "epoch": curve["epoch"][-1],
                     "test_elbo_mean": curve["mean"][-1], "test_elbo_spread": curve["spread"][-1],
                     "test_elbo_median": curve["median"][-1], "test_elbo_seeds": curve["seeds"][-1],
                     "wall_time_mean": curve["wall_time"][-1], "curve": curve})
    return sorted(rows, key=lambda row: -row["test_elbo_median"])


def nats(value: float) -> str:
    """Two decimals, or three significant digits for a diverged run's -1.34e+09."""
    return f"{value:.2f}" if abs(value) < 1e5 else f"{value:.2e}"


def read_failures(*sweeps: Path) -> list[dict[str, Any]]:
    """Every job in or under `sweeps` that stopped with an error (its failed.json): the job's
    directory, configuration, seed and the error's message."""
    failures = []
    for failed_file in sorted(file for sweep in sweeps for file in sweep.rglob(FAILED_NAME)):
        label, seed = configuration(failed_file.parent)
        failures.append({"job": str(failed_file.parent), "configuration": label, "seed": seed,
                         **json.loads(failed_file.read_text())})
    return failures


def write_table(rows: list[dict[str, Any]], path: Path, failures: list[dict[str, Any]] = ()) -> None:
    lines = ["| configuration | seeds | epoch | test ELBO: mean ± sd over seeds | median | each seed, in seed order "
             "| wall time (s), mean |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| `{r['configuration']}` | {r['seeds']} | {r['epoch']} | "
              f"{nats(r['test_elbo_mean'])} ± {nats(r['test_elbo_spread'])} | {nats(r['test_elbo_median'])} | "
              f"{' / '.join(nats(v) for v in r['test_elbo_seeds'])} | {r['wall_time_mean']:.0f} |" for r in rows]
    if failures:
        lines += ["", f"Failed jobs ({len(failures)}): their epochs up to the failure are in the rows above.", ""]
        lines += [f"- `{f['job']}` (`{f['configuration']}`, seed {f['seed']}): {f['error']}: {f['message']}"
                  for f in failures]
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict[str, Any]]) -> Figure:
    """Test ELBO against epoch and wall time: the median over seeds, and a band from the worst
    seed to the best. When every ELBO is negative (discrete data), the axis shows -ELBO on a log
    scale, so that a diverging run (-1e9) does not flatten the others."""
    log_axis = all(best < 0 for row in rows for best in row["curve"]["best"])
    sign = -1.0 if log_axis else 1.0
    legend_rows = 1 + (len(rows) + 1) // 2
    fig = Figure(figsize=(11, 4 + 0.25 * legend_rows))
    axes = fig.subplots(1, 2, sharey=True)
    for row in rows:
        curve = row["curve"]
        label = f"{row['configuration']} ({row['seeds']} seeds)"
        for ax, x in zip(axes, (curve["epoch"], curve["wall_time"])):
            (line,) = ax.plot(x, [sign * m for m in curve["median"]], marker=".", label=label)
            ax.fill_between(x, [sign * v for v in curve["worst"]], [sign * v for v in curve["best"]],
                            color=line.get_color(), alpha=0.2)
    if log_axis:
        axes[0].set(yscale="log", ylabel="-test ELBO (nats/image; lower is better)")
    else:
        axes[0].set(ylabel="test ELBO (nats per image)")
    axes[0].set(xlabel="epoch")
    axes[1].set(xlabel="wall time (s)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize="small",
               title="median over seeds; band: worst to best seed", title_fontsize="small")
    fig.tight_layout(rect=(0, 0.06 * legend_rows, 1, 1))  # room for the legend below the axes
    return fig
