"""The gradient estimators (`experiment=estimators/train`) and their variance (`estimators/variance`).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vae.report.common import Outputs, copy_figure, provenance_line, read_json, sweep_progress, table, trained_jobs
from vae.sweeps import nats, plot, read_failures, summarize


ESTIMATOR_ORDER = ("reparam", "score", "score_avg_baseline", "score_nn_baseline", "score_loo")


def estimator_numbers(jobs: dict[str, list[list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """summarize's row per estimator, in ESTIMATOR_ORDER, each with every seed's best test ELBO up to
    the row's epoch (the last that all its seeds reached) and its test KL at that epoch, as its test ELBO."""
    rows = summarize(jobs)
    order = {f"estimator={name}": i for i, name in enumerate(ESTIMATOR_ORDER)}
    rows.sort(key=lambda row: order.get(row["configuration"], len(order)))
    for row in rows:
        seeds = [[m for m in metrics if m["epoch"] <= row["epoch"]] for metrics in jobs[row["configuration"]]]
        row["test_elbo_best_seeds"] = [max(m["test_elbo"] for m in metrics if m.get("test_elbo") is not None)
                                       for metrics in seeds]
        row["test_kl_seeds"] = [metrics[-1].get("test_kl") for metrics in seeds]
    return rows


def estimator_rows(out: Outputs) -> list[dict[str, Any]]:
    """estimator_numbers of experiment=estimators/train; its figure, estimators.png, into the figures."""
    rows = estimator_numbers(trained_jobs(out, "estimators")[1])
    plot(rows).savefig(out.figures / "estimators.png", dpi=110)
    return rows


def estimator_name(row: dict[str, Any]) -> str:
    return f"`{row['configuration'].removeprefix('estimator=')}`"


def estimators(out: Outputs) -> str:
    lines = [[estimator_name(row), row["seeds"], row["epoch"], f"**{nats(row['test_elbo_median'])}**",
              f"{nats(row['test_elbo_mean'])} ± {nats(row['test_elbo_spread'])}",
              " / ".join(nats(v) for v in row["test_elbo_seeds"]), " / ".join(nats(v) for v in row["test_elbo_best_seeds"]),
              " / ".join(nats(v) for v in row["test_kl_seeds"]), f"{row['wall_time_mean']:.0f}"]
             for row in estimator_rows(out)]
    head = ["estimator", "seeds", "epochs", "test ELBO: median", "mean ± sd", "each seed (0 / 1 / 2)",
            "best epoch, each seed", "KL(q ‖ p) at that epoch, each seed", "wall time (s), mean, two jobs at a time"]
    failures = "".join(f"\n\nFailed: `{f['configuration']}` seed {f['seed']}: {f['message']}"
                       for f in read_failures(out.sweep("estimators")))
    return (table(head, lines) + sweep_progress(out.sweep("estimators")) + failures + "\n\n"
            + provenance_line(out, out.sweep("estimators")))


def estimators_short(out: Outputs) -> str:
    lines = [[estimator_name(row), row["epoch"], f"**{nats(row['test_elbo_median'])}**",
              " / ".join(nats(v) for v in row["test_elbo_seeds"])] for row in estimator_rows(out)]  # speed: the speed table
    return (table(["estimator", "epochs", "test ELBO, median of seeds", "each seed"], lines)
            + sweep_progress(out.sweep("estimators")) + "\n\n" + provenance_line(out, out.sweep("estimators")))


def variance(out: Outputs) -> str:
    directory = out.run("estimators_variance")
    points = read_json(directory / "variance.json", "python variance.py experiment=estimators/variance")
    copy_figure(directory / "variance.png", out.figures / "variance.png")
    shown = [points[0], points[1], points[-1]] if len(points) > 2 else points
    epochs = " / ".join(f"{p['epoch']:g}" for p in shown)
    lines = []
    for name in points[0]["estimators"]:
        at = [p["estimators"][name] for p in shown]
        score = [p["estimators"].get("score") for p in shown]
        ratio = " / ".join(f"{a['encoder'].get('ratio_to_reparam', float('nan')):.3g}" for a in at)
        cut = " / ".join(f"{s['encoder']['variance'] / a['encoder']['variance']:,.0f}x" if s else "" for s, a in zip(score, at))
        lines.append([f"`{name}`", at[0]["particles"], ratio, cut if name != "score" else "1",
                      f"{at[0]['encoder']['snr']:.3g} / {at[-1]['encoder']['snr']:.3g}",
                      f"{at[-1]['decoder'].get('ratio_to_reparam', float('nan')):.3g}"])
    head = ["estimator", "particles", f"encoder variance / reparam, after {epochs} epochs",
            "cut of `score`'s variance", f"encoder SNR, {shown[0]['epoch']:g} / {shown[-1]['epoch']:g}",
            f"decoder variance / reparam, {shown[-1]['epoch']:g}"]
    return table(head, lines) + "\n\n" + provenance_line(out, directory)


BLOCKS: dict[str, Callable[[Outputs], str]] = {
    "estimators": estimators,
    "estimators_short": estimators_short,
    "variance": variance,
}
