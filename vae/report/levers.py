"""The levers of a stronger density model at equal wall time (`bound_and_posterior/`, `depth_latent_warmup/`,
`lr_schedule/`, `bf16/`, `model_levers/`) and their combination over an hour (`best_one_hour/`, its IW fork included).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vae.report.common import (Outputs, bold_nll, label_options, last_tested, minutes, option_cell, provenance_line,
                               run_evaluations, sweep_progress, table, trained_jobs)
from vae.report.one_hour import ANCHORS, likelihood, likelihood_numbers
from vae.sweeps import mean_and_spread, nats


def lever_table(out: Outputs, name: str, columns: list[tuple[str, str, str]],
                epochs_header: str = "epochs in the budget") -> str:
    """The runs of `python train.py -m experiment=NAME` (seed 0 each), their options `columns`
    ((key, header, default) each), test ELBO when the run ended, and test NLL from the recipe
    NAME_likelihood (ELBO + the IW gap at K=1000), best NLL first."""
    sweep, jobs = trained_jobs(out, name)
    evaluation = out.sweep(f"{name}_likelihood")
    rows = [[*(option_cell(row["options"].get(key, default)) for key, _, default in columns), row["epoch"],
             minutes(row["wall_time"]), nats(row["test_elbo"]), f"{row['test_kl']:.1f}",
             f"**{nats(row['nll'])} ± {row['nll_standard_error']:.2f}**" if row["nll"] is not None
             else f"_not evaluated yet: `python evaluate.py -m experiment={name}/likelihood`_"]
            for row in lever_rows(jobs, run_evaluations(evaluation))]
    head = [header for _, header, _ in columns] + [
        epochs_header, "training time", "test ELBO (nats)", "KL(q ‖ p)", "test NLL (nats): ELBO + IW gap at K=1000"]
    return table(head, rows) + sweep_progress(sweep) + "\n\n" + provenance_line(out, sweep, evaluation)


def lever_rows(jobs: dict[str, list[list[dict[str, Any]]]], evaluations: list[tuple[str, int, dict[str, Any], Path]],
               ) -> list[dict[str, Any]]:
    """One row per run (seed 0 of each configuration), best (lowest) test NLL first, those not
    evaluated last: its options, its last tested epoch's epoch, wall time, test ELBO and KL, and the
    NLL and its standard error of its evaluation (None when not evaluated)."""
    evaluated = {label: metrics for label, _, metrics, _ in evaluations}
    rows = []
    for label, seeds in jobs.items():
        last = last_tested(seeds[0])  # seed 0
        nll = evaluated.get(label)
        rows.append({"configuration": label, "options": label_options(label), "epoch": last["epoch"],
                     "wall_time": last["wall_time"], "test_elbo": last["test_elbo"], "test_kl": last["test_kl"],
                     "nll": nll["whole_split_nll"] if nll else None,
                     "nll_standard_error": nll["whole_split_nll_standard_error"] if nll else None})
    return sorted(rows, key=lambda row: math.inf if row["nll"] is None else row["nll"])


def bound_and_posterior(out: Outputs) -> str:
    """The lecture's model against the IW bound and the flow posterior at equal wall time."""
    return lever_table(out, "bound_and_posterior", [("estimator", "estimator", "reparam"), ("posterior", "q(t\\|x)", "gaussian")])


def model_levers(out: Outputs) -> str:
    """A learned prior, a second stochastic layer and DReG, each alone against the strongest configuration."""
    return lever_table(out, "model_levers", [("+experiment/model_levers/arm", "lever (conf/experiment/model_levers/arm/)",
                                              "best")])


def depth_latent_warmup(out: Outputs) -> str:
    """Depth, latent size and KL warm-up around reparam + 2 flows, at equal wall time."""
    return lever_table(out, "depth_latent_warmup", [("model", "networks", "conv"),
                                                ("model.latent_dim", "latent dim", "16"),
                                                ("trainer.kl_warmup_epochs", "KL warm-up epochs", "0")])


def lr_schedule(out: Outputs) -> str:
    """A constant learning rate against the cosine schedule over the same epochs."""
    return lever_table(out, "lr_schedule", [("schedule", "learning-rate schedule", "none")], "epochs")


def bf16(out: Outputs) -> str:
    """The best configuration's layers in float32 against bfloat16 autocast, at equal wall time."""
    return lever_table(out, "bf16", [("trainer.bf16", "bfloat16 layers (`trainer.bf16`)", "false")])


def best_one_hour(out: Outputs) -> str:
    """The strongest configuration of the lever tables under the one-hour protocol, its K=5000 NLL."""
    return likelihood(out, "best_one_hour")


FORK_COMMAND = "python train.py experiment=best_one_hour/iwae"


def best_one_hour_iwae(out: Outputs) -> str:
    """The hour of `experiment=best_one_hour/train` forked after 40 minutes: its last 20 minutes on the ELBO
    as it was, or on the IW bound (`estimator=iwae`), side by side with their K=5000 NLLs."""
    runs = {"on the ELBO": likelihood_numbers(out, "best_one_hour"),
            "on the IW bound, K=5": likelihood_numbers(out, "best_one_hour_iwae", FORK_COMMAND)}
    columns = {}
    for label, (training_metrics, nll) in runs.items():
        last = last_tested(training_metrics)
        columns[label] = [last["epoch"], minutes(last["wall_time"]), nats(last["test_elbo"]),
                          f"**{nats(nll['whole_split_nll_with_whole_split_particles'])}**",
                          bold_nll(nll)]
    _, nll = runs["on the ELBO"]
    names = ["epochs", "training time", "test ELBO after the last epoch (nats)",
             f"NLL, IW bound with K={nll['whole_split_particles']} on every image",
             f"NLL, K={nll['num_particles']}: every image's ELBO + the IW gap on {nll['num_images']:,} random images"]
    rows = [[name, *(column[i] for column in columns.values())] for i, name in enumerate(names)]
    return (table(["last 20 minutes trained", *columns], rows) + "\n\n"
            + provenance_line(out, out.run("best_one_hour"), out.run("best_one_hour_iwae"),
                              out.run("best_one_hour_likelihood"), out.run("best_one_hour_iwae_likelihood")))


SEEDS_NAME = "best_hour_seeds"
TWO_LAYER_IWAE = "IWAE, two stochastic layers, k=50 (Burda et al. 2016)"


def seed_rows(out: Outputs) -> tuple[Path, list[tuple[int, dict[str, Any], dict[str, Any] | None]]]:
    """The sweep of `experiment=best_hour_seeds/train` and, per seed in order, (seed, its last tested
    epoch's metrics, the metrics of its evaluation by best_hour_seeds/likelihood or None)."""
    sweep, jobs = trained_jobs(out, SEEDS_NAME)
    (seeds,) = jobs.values()  # one configuration, its seeds in order
    evaluated = {seed: metrics for _, seed, metrics, _ in run_evaluations(out.sweep(f"{SEEDS_NAME}_likelihood"))}
    return sweep, [(seed, last_tested(metrics), evaluated.get(seed))
                   for seed, metrics in enumerate(seeds)]


def over_seeds(rows: list[tuple[int, dict[str, Any], dict[str, Any] | None]]) -> tuple[str, str] | None:
    """(the label "mean ± sd over N seeds (k of them below 82.90)", "**mean ± sd**") of the evaluated seeds'
    NLLs; None with fewer than two evaluated."""
    nlls = [nll["whole_split_nll"] for _, _, nll in rows if nll]
    if len(nlls) < 2:
        return None
    mean, sd = mean_and_spread(nlls)
    anchor = dict(ANCHORS)[TWO_LAYER_IWAE]
    return (f"mean ± sd over {len(nlls)} seeds ({sum(v < anchor for v in nlls)} of them below {anchor:.2f})",
            f"**{nats(mean)} ± {sd:.2f}**")


def nll_cell(nll: dict[str, Any] | None) -> str:
    return (bold_nll(nll) if nll else
            f"_not evaluated yet: `python evaluate.py -m experiment={SEEDS_NAME}/likelihood`_")


def best_hour_seeds(out: Outputs) -> str:
    """The strongest configuration's hour, three seeds in one command (the IW bound from minute 40): each seed's
    epochs and K=5000 NLL, their mean and standard deviation over seeds, beside the published anchors."""
    sweep, seeds = seed_rows(out)
    rows = [[f"seed {seed}", last["epoch"], minutes(last["wall_time"]), nats(last["test_elbo"]), nll_cell(nll)]
            for seed, last, nll in seeds]
    if summary := over_seeds(seeds):
        rows.append([summary[0], "", "", "", summary[1]])
    rows += [[anchor, "", "", "", f"{value:.2f}"] for anchor, value in ANCHORS]
    head = ["run", "epochs", "training time", "test ELBO after the last epoch (nats)",
            "test NLL (nats), K=5000: every image's ELBO + the IW gap on 1,000 random images"]
    return (table(head, rows) + sweep_progress(sweep) + "\n\n"
            + provenance_line(out, sweep, out.sweep(f"{SEEDS_NAME}_likelihood")))


def best_hour_seeds_short(out: Outputs) -> str:
    """The README's lines for the best hour: the mean ± sd over seeds, each seed's NLL and epochs, beside the
    two-layer IWAE."""
    sweep, seeds = seed_rows(out)
    rows = [[f"seed {seed} ({last['epoch']} epochs)", nll_cell(nll)] for seed, last, nll in seeds]
    if summary := over_seeds(seeds):
        rows.insert(0, list(summary))
    rows.append([TWO_LAYER_IWAE, f"{dict(ANCHORS)[TWO_LAYER_IWAE]:.2f}"])
    return (table(["test NLL, nats per image (K=5000, whole test set), an hour of training", "NLL"], rows)
            + sweep_progress(sweep) + "\n\n" + provenance_line(out, sweep, out.sweep(f"{SEEDS_NAME}_likelihood")))


BLOCKS: dict[str, Callable[[Outputs], str]] = {
    "bound_and_posterior": bound_and_posterior,
    "model_levers": model_levers,
    "depth_latent_warmup": depth_latent_warmup,
    "lr_schedule": lr_schedule,
    "bf16": bf16,
    "best_one_hour": best_one_hour,
    "best_one_hour_iwae": best_one_hour_iwae,
    "best_hour_seeds": best_hour_seeds,
    "best_hour_seeds_short": best_hour_seeds_short,
}
