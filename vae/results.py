"""The documents' result tables, written from the outputs of the recipes in conf/experiment/.

README.md and docs/results.md hold blocks `<!-- report:NAME -->` ... `<!-- /report:NAME -->`;
`python report.py` replaces each block's contents by what BLOCKS[NAME] makes of the recipe's
outputs, with the machine, versions (and, in docs/, the commit and date) that its
provenance.jsonl files record, and copies the figures the documents show into docs/. A block whose
recipe has not been run says so and names the command. Nothing in a block is typed by hand.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import statistics
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from vae.logbook import read_metrics
from vae.provenance import read_provenance
from vae.sweeps import configuration, nats, plot, read_failures, read_jobs, summarize

BLOCK = re.compile(r"(<!-- report:(\w+) -->\n).*?(<!-- /report:\2 -->)", re.DOTALL)
# Published test NLLs on dynamically binarized MNIST (nats, K=5000), Burda et al. 2016, Table 1.
ANCHORS = [("VAE, one stochastic layer (Burda et al. 2016)", 86.76),
           ("IWAE, one stochastic layer, k=50 (Burda et al. 2016)", 84.78),
           ("IWAE, two stochastic layers, k=50 (Burda et al. 2016)", 82.90)]
ESTIMATOR_ORDER = ("reparam", "score", "score_avg_baseline", "score_nn_baseline", "score_loo")


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


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {round(seconds % 60):02d} s"


# --- training ----------------------------------------------------------------------------------

def default_run(out: Outputs) -> list[dict[str, Any]]:
    return read_jsonl(out.run("default") / "metrics.jsonl", "python train.py experiment=default/train")


def quickstart(out: Outputs) -> str:
    metrics = default_run(out)
    last, first = metrics[-1], metrics[1]
    seconds = statistics.median(m["seconds"] for m in metrics[1:])
    return (f"{last['epoch']} epochs of MNIST take about {last['epoch'] * seconds / 60:.0f} minutes ({seconds:.0f} s "
            f"per epoch, the median of the {len(metrics) - 1}) and end at a test ELBO of **{last['test_elbo']:.2f}** "
            f"nats per image ({first['test_elbo']:.2f} after the first epoch, {metrics[0]['test_elbo']:.2f} untrained). "
            + provenance_line(out, out.run("default")))


def training(out: Outputs) -> str:
    metrics = default_run(out)
    rows = [[m["epoch"], nats(m["test_elbo"]), nats(m["test_recon"]), nats(m["test_kl"]),
             nats(m["train_elbo"]) if m["train_elbo"] is not None else "", f"{m.get('seconds', 0):.1f}"]
            for m in metrics]
    figures = {"samples.png": f"samples_{metrics[-1]['epoch']:03d}.png",
               "reconstructions.png": f"reconstructions_{metrics[-1]['epoch']:03d}.png"}
    for target, source in figures.items():
        copy_figure(out.run("default") / "images" / source, out.figures / target)
    return (table(["epoch", "test ELBO", "reconstruction", "KL", "train ELBO", "seconds"], rows) + "\n\n"
            + provenance_line(out, out.run("default")))


def copy_figure(source: Path, target: Path) -> None:
    if source.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)


# --- estimators --------------------------------------------------------------------------------

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
        return bool(metrics) and (metrics[-1]["epoch"] >= planned[job]
                                  or (budget is not None and metrics[-1].get("wall_time", 0) >= 60 * budget))

    done = [d for d in jobs if finished(d)]
    multirun = sweep / "multirun.yaml"  # the sweep's own config: how many jobs it launches
    params = OmegaConf.load(multirun).hydra.sweeper.get("params") or {} if multirun.is_file() else {}
    total = max(len(jobs), math.prod(len(str(values).split(",")) for values in params.values()))
    if len(done) == total:
        return ""
    return (f"\n\n**In progress:** {len(done)} of {total} jobs have trained their {max(planned.values())} epochs; "
            "each row is shown at the last epoch that all its seeds have reached.")


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


# --- likelihoods of gray levels ----------------------------------------------------------------

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


def likelihood_options(label: str) -> tuple[str, str]:
    """(likelihood, likelihood.scale) of a configuration label of experiment=likelihoods/train (runs from before
    the likelihood group: model.likelihood, model.scale)."""
    options = label_options(label)
    return (options.get("likelihood", options.get("model.likelihood", "?")),
            options.get("likelihood.scale", options.get("model.scale", "pixel")))


def likelihood_sample_quality(out: Outputs, sweep: str = "likelihoods_samples",
                              name_of: Callable[[str], str] = lambda label: "_".join(likelihood_options(label)),
                              ) -> tuple[dict[str, list[float]], str]:
    """({configuration label: the sample-confident share of each seed's run}, the seed-0 sample grids
    side by side, E[x|t] above x ~ p(x|t), copied into the figures as likelihoods_<name_of(label)>_*.png)
    from the generate evaluations of `experiment=<study>/samples` (({}, '') when they have not run)."""
    shares: dict[str, list[tuple[int, float]]] = {}
    grids = []
    for label, seed, metrics, directory in run_evaluations(out.sweep(sweep)):
        shares.setdefault(label, []).append((seed, metrics["sample_confident_share"]))
        if seed == 0:
            name = name_of(label)
            for kind in ("samples", "samples_drawn"):
                copy_figure(directory / f"{kind}.png", out.figures / f"likelihoods_{name}_{kind}.png")
            grids.append((name, f"![{name}: E[x|t]](likelihoods_{name}_samples.png) "
                                f"![{name}: x ~ p(x|t)](likelihoods_{name}_samples_drawn.png)"))
    pictures = "".join(f"\n\n`{name}` (seed 0): E[x|t] of 64 prior samples, and a draw x ~ p(x|t) of each\n\n{images}"
                       for name, images in sorted(grids))
    return {label: [share for _, share in sorted(pairs)] for label, pairs in shares.items()}, pictures


def likelihood_rows(jobs: dict[str, list[list[dict[str, Any]]]], failed: dict[str, list[int]]) -> list[dict[str, Any]]:
    """One row per configuration of experiment=likelihoods/train whose seeds all have test bits/dim, best
    (lowest) median first: at the last epoch every seed reached, the median bits/dim over seeds and
    each seed's bits/dim, KL and share of pixels at the scale's floor (None when not recorded), and
    the seeds that failed or diverged."""
    rows = []
    for label, seeds in jobs.items():
        epoch, at = at_common_epoch(seeds)
        bits = [m.get("test_bits_per_dim") for m in at]
        if any(b is None for b in bits):
            continue
        rows.append({"configuration": label, "options": likelihood_options(label), "epoch": epoch,
                     "median": statistics.median(bits), "bits": bits, "kl": [m["test_kl"] for m in at],
                     "at_floor": [m.get("test_scale_at_floor", 0) for m in at] if "test_scale_at_floor" in at[0] else None,
                     "failed": failed.get(label, [])})
    return sorted(rows, key=lambda row: row["median"])


def likelihoods(out: Outputs) -> str:
    sweep, jobs = trained_jobs(out, "likelihoods")
    samples, pictures = likelihood_sample_quality(out)
    rows = [[*(f"`{option}`" for option in row["options"]), row["epoch"], f"**{row['median']:.3f}**",
             " / ".join(f"{b:.3f}" for b in row["bits"]), " / ".join(f"{kl:.1f}" for kl in row["kl"]),
             " / ".join(f"{share:.1%}" for share in row["at_floor"]) if row["at_floor"] is not None else "",
             " / ".join(f"{share:.0%}" for share in samples[row["configuration"]]) if row["configuration"] in samples else "",
             ", ".join(f"seed {seed}" for seed in row["failed"]) or "none"]
            for row in likelihood_rows(jobs, failed_seeds(sweep))]
    head = ["likelihood", "scale", "epochs", "test bits/dim (ELBO): median", "each seed", "KL (nats), each seed",
            "pixels at the scale's floor", "confident samples, each seed", "failed or diverged"]
    return (table(head, rows) + sweep_progress(sweep)
            + "\n\n" + provenance_line(out, sweep, out.sweep("likelihoods_samples")) + pictures)


def likelihood_pixels(out: Outputs) -> str:
    """Where each likelihood spends its bits (seed 0 of each configuration): `task=pixels`."""
    evaluations = run_evaluations(out.sweep("likelihoods_pixels"))
    results = {label: metrics for label, seed, metrics, _ in evaluations if seed == 0}
    if not results:
        raise NotRun("python evaluate.py -m experiment=likelihoods/pixels")
    rows = []
    for label, metrics in sorted(results.items(), key=lambda item: item[1]["bits_per_dim"]):
        groups = metrics["groups"]
        cells = [*(f"`{option}`" for option in likelihood_options(label)), f"{metrics['bits_per_dim']:.3f}",
                 *(f"{groups[g]['bits_per_pixel']:.2f}" for g in ("background", "edge", "ink"))]
        if "median_scale" in groups["background"]:
            cells += [f"{groups['background']['median_scale']:.4f} / {groups['edge']['median_scale']:.4f}",
                      f"{groups['background']['at_floor']:.1%}",
                      f"{groups['background']['mean_gradient_weight'] / groups['edge']['mean_gradient_weight']:.3g}"]
        else:
            cells += ["", "", ""]
        rows.append(cells)
    shares = next(iter(results.values()))["groups"]
    head = ["likelihood", "scale", "bits/dim at t_loc(x)", "background: bits per pixel", "edge", "ink",
            "median scale: background / edge", "background at the floor", "1/scale^2: background over edge"]
    return (f"The first {next(iter(results.values()))['num_images']:,} test images, seed 0 of each configuration; "
            f"background (level 0) is {shares['background']['share_of_pixels']:.1%} of the pixels, edge (1 to 254) "
            f"{shares['edge']['share_of_pixels']:.1%}, ink (255) {shares['ink']['share_of_pixels']:.1%}.\n\n"
            + table(head, rows) + "\n\n" + provenance_line(out, out.sweep("likelihoods_pixels")))


def nll_beta_of(label: str) -> float:
    """trainer.nll_beta of a configuration label of experiment=beta_nll/train (0: the ELBO)."""
    return float(label_options(label).get("trainer.nll_beta", 0))


def largest_rise(metrics: list[dict[str, Any]], last_epoch: int) -> float:
    """The largest increase of the test bits/dim from one tested epoch to the next, up to `last_epoch`
    (0 when it only fell): how far training went backwards at its worst."""
    bits = [m["test_bits_per_dim"] for m in metrics if 1 <= m["epoch"] <= last_epoch]
    return max([0.0, *(later - earlier for earlier, later in zip(bits, bits[1:]))])


def beta_rows(jobs: dict[str, list[list[dict[str, Any]]]], failed: dict[str, list[int]]) -> list[dict[str, Any]]:
    """One row per trainer.nll_beta of experiment=beta_nll/train, smallest beta first: at the last
    epoch every seed reached, the median test bits/dim over seeds, each seed's bits/dim, KL, share of
    pixels at the scale's floor and largest rise of bits/dim up to there, and the seeds that failed
    or diverged."""
    rows = []
    for label, seeds in sorted(jobs.items(), key=lambda item: nll_beta_of(item[0])):
        epoch, at = at_common_epoch(seeds)
        bits = [m["test_bits_per_dim"] for m in at]
        rows.append({"configuration": label, "beta": nll_beta_of(label), "epoch": epoch, "median": statistics.median(bits),
                     "bits": bits, "kl": [m["test_kl"] for m in at], "at_floor": [m.get("test_scale_at_floor", 0) for m in at],
                     "largest_rise": [largest_rise(metrics, epoch) for metrics in seeds], "failed": failed.get(label, [])})
    return rows


def beta_nll(out: Outputs, name: str = "beta_nll", target: str = "both") -> str:
    """The lecture's Gaussian (per-pixel scale) trained on the ELBO and on the beta-NLL (recipe `name`, its
    weight on `target`: trainer.nll_beta_target): each seed's test bits/dim and KL (the ELBO's, whatever
    the training objective), the samples' confident share, and seed 0's scales (`task=pixels`)."""
    sweep, jobs = trained_jobs(out, name)
    suffix = "" if target == "both" else f"_{target}"
    name_of = lambda label: f"gaussian_pixel_beta_{nll_beta_of(label):g}{suffix}"  # noqa: E731
    samples, pictures = likelihood_sample_quality(out, f"{name}_samples", name_of)
    pixels = {label: metrics["groups"] for label, seed, metrics, _ in run_evaluations(out.sweep(f"{name}_pixels"))
              if seed == 0}
    rows = []
    for row in beta_rows(jobs, failed_seeds(sweep)):
        beta, label = row["beta"], row["configuration"]
        groups = pixels.get(label)
        rows.append([f"`trainer.nll_beta={beta:g}`" + (" (the ELBO)" if beta == 0 else "")
                     + (f", `nll_beta_target={target}`" if beta and target != "both" else ""), row["epoch"],
                     f"**{row['median']:.3f}**", " / ".join(f"{b:.3f}" for b in row["bits"]),
                     " / ".join(f"{kl:.1f}" for kl in row["kl"]), " / ".join(f"{share:.1%}" for share in row["at_floor"]),
                     " / ".join(f"{rise:+.2f}" for rise in row["largest_rise"]),
                     " / ".join(f"{share:.0%}" for share in samples[label]) if label in samples else "",
                     f"{groups['background']['median_scale']:.4f} / {groups['edge']['median_scale']:.4f}" if groups else "",
                     f"{groups['background']['bits_per_pixel']:.2f} / {groups['edge']['bits_per_pixel']:.2f}" if groups else "",
                     ", ".join(f"seed {seed}" for seed in row["failed"]) or "none"])
    head = ["trained on", "epochs", "test bits/dim (ELBO): median", "each seed", "KL (nats), each seed",
            "pixels at the scale's floor", "largest rise of bits/dim in one epoch", "confident samples, each seed",
            "seed 0: median scale, background / edge",
            "seed 0: bits per pixel, background / edge", "failed or diverged"]
    return (table(head, rows) + sweep_progress(sweep) + "\n\n"
            + provenance_line(out, sweep, out.sweep(f"{name}_samples")) + pictures)


# --- gradient variance -------------------------------------------------------------------------

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


# --- likelihood --------------------------------------------------------------------------------

def likelihood_numbers(out: Outputs, name: str = "one_hour", train_command: str | None = None,
                       ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(the training metrics of `python train.py experiment=NAME` (or of `train_command`), the metrics
    of its NAME_likelihood)."""
    training_metrics = read_jsonl(out.run(name) / "metrics.jsonl", train_command or f"python train.py experiment={name}/train")
    nll = read_json(out.run(f"{name}_likelihood") / "metrics.json", f"python evaluate.py experiment={name}/likelihood")
    return training_metrics, nll


def likelihood(out: Outputs, name: str = "one_hour") -> str:
    """The test set's NLL of the run of `experiment=NAME`: the ELBO it ended with, the direct IW bound on
    every image and the whole-split estimator (every image's ELBO + the IW gap on a random sample)."""
    training_metrics, nll = likelihood_numbers(out, name)
    last = [m for m in training_metrics if m.get("test_elbo") is not None][-1]
    k, images = nll["whole_split_particles"], nll["whole_split_images"]
    rows = [[f"ELBO after epoch {last['epoch']} ({minutes(last['wall_time'])} of training), one t per image",
             nats(last["test_elbo"])],
            [f"ELBO, K={k} particles per image", nats(nll["whole_split_elbo"])],
            [f"**NLL, IW bound with K={k} on every image**", f"**{nats(nll['whole_split_nll_with_whole_split_particles'])}**"],
            [f"**NLL, IW bound with K={nll['num_particles']}**: every image's ELBO + the IW gap on "
             f"{nll['num_images']:,} random images", f"**{nats(nll['whole_split_nll'])} ± {nll['whole_split_nll_standard_error']:.2f}**"],
            [f"NLL, K={nll['num_particles']}, on the {nll['num_images']:,} random images alone",
             f"{nats(nll['nll'])} ± {nll['nll_standard_error']:.2f}"]]
    rows += [[anchor, f"{value:.2f}"] for anchor, value in ANCHORS]
    return (table([f"test set, {images:,} images, nats per image", "value"], rows) + "\n\n"
            + provenance_line(out, out.run(name), out.run(f"{name}_likelihood")))


def likelihood_short(out: Outputs) -> str:
    training_metrics, nll = likelihood_numbers(out)
    last = training_metrics[-1]
    rows = [[f"this model, {minutes(last['wall_time'])} of training ({last['epoch']} epochs)",
             f"**{nats(nll['whole_split_nll'])} ± {nll['whole_split_nll_standard_error']:.2f}**"]]
    rows += [[name, f"{value:.2f}"] for name, value in ANCHORS]
    return (table(["test NLL, nats per image (K=5000, whole test set)", "NLL"], rows) + "\n\n"
            + provenance_line(out, out.run("one_hour"), out.run("one_hour_likelihood")))


# Published test bits/dim on 8-bit MNIST of models that are not factorized over pixels.
GRAY_ANCHORS = [("RealNVP (Dinh et al. 2017)", 1.06), ("Glow (Kingma & Dhariwal 2018)", 1.05)]


def one_hour_seeds(out: Outputs, name: str = "one_hour_logistic_mixture") -> str:
    """The one-hour runs of recipe `name` (a likelihood of gray levels), each seed, seed 0's K=5000
    bits/dim (recipe NAME_likelihood) and its prior samples with their confident share (NAME_samples)."""
    sweep, jobs = trained_jobs(out, name)
    (seeds,) = jobs.values()  # one configuration, its seeds in order
    tested = [[m for m in metrics if m.get("test_bits_per_dim") is not None] for metrics in seeds]
    rows = [[f"test bits/dim, ELBO after each seed's last epoch ({' / '.join(str(t[-1]['epoch']) for t in tested)} epochs, "
             f"{' / '.join(minutes(t[-1]['wall_time']) for t in tested)})",
             " / ".join(f"{t[-1]['test_bits_per_dim']:.3f}" for t in tested)]]
    curve = [m for m in tested[0] if m["epoch"] >= 1]  # seed 0, as trained: did it keep improving?
    rows.append([f"seed 0's test bits/dim (ELBO) after epochs {' / '.join(str(m['epoch']) for m in curve)}",
                 " / ".join(f"{m['test_bits_per_dim']:.3f}" for m in curve)])
    failures = read_failures(sweep)
    rows.append(["seeds that failed or diverged", ", ".join(f"seed {f['seed']}" for f in failures) or "none"])
    nll_file = out.run(f"{name}_likelihood") / "metrics.json"
    if nll_file.is_file():
        nll = json.loads(nll_file.read_text())
        rows.append([f"**test bits/dim, IW bound with K={nll['num_particles']}**, seed 0: every image's ELBO + the IW gap "
                     f"on {nll['num_images']:,} random images",
                     f"**{nll['whole_split_bits_per_dim']:.3f} ± {nll['whole_split_bits_per_dim_standard_error']:.3f}**"])
    rows += [[f"{anchor}, test bits/dim", f"{value:.2f}"] for anchor, value in GRAY_ANCHORS]
    samples = out.run(f"{name}_samples")
    if (samples / "metrics.json").is_file():  # task=generate: the classifier's judgement and both grids
        generated = json.loads((samples / "metrics.json").read_text())
        rows.append([f"seed 0's prior samples a digit classifier is confident about (p > {generated['confidence_threshold']}), "
                     f"against real test digits", f"{generated['sample_confident_share']:.0%} / "
                     f"{generated['test_confident_share']:.0%}"])
        for kind in ("samples", "samples_drawn"):
            copy_figure(samples / f"{kind}.png", out.figures / f"{name}_{kind}.png")
        picture = (f"\n\nSeed 0: E[x|t] of 64 prior samples, and a draw x ~ p(x|t) of each\n\n"
                   f"![{name}: E[x|t]]({name}_samples.png) ![{name}: x ~ p(x|t)]({name}_samples_drawn.png)")
    else:
        picture = ""
        last_samples = sorted((sweep / "0" / "images").glob("samples_*.png"))
        if last_samples:
            copy_figure(last_samples[-1], out.figures / f"{name}_samples.png")
            picture = f"\n\n![E[x|t] of prior samples, seed 0 after its last epoch]({name}_samples.png)"
    return (table(["test set, 8-bit MNIST", "value"], rows) + sweep_progress(sweep) + "\n\n"
            + provenance_line(out, sweep, out.run(f"{name}_likelihood"), samples) + picture)


# --- tighter bounds and richer posteriors ------------------------------------------------------

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
        last = [m for m in seeds[0] if m.get("test_elbo") is not None][-1]  # seed 0
        nll = evaluated.get(label)
        rows.append({"configuration": label, "options": label_options(label), "epoch": last["epoch"],
                     "wall_time": last["wall_time"], "test_elbo": last["test_elbo"], "test_kl": last["test_kl"],
                     "nll": nll["whole_split_nll"] if nll else None,
                     "nll_standard_error": nll["whole_split_nll_standard_error"] if nll else None})
    return sorted(rows, key=lambda row: math.inf if row["nll"] is None else row["nll"])


def option_cell(value: str) -> str:
    """A config option's value as a table cell: numbers as they are, names as code."""
    return value if value.lstrip("-").replace(".", "", 1).isdigit() else f"`{value}`"


def bound_and_posterior(out: Outputs) -> str:
    """The lecture's model against the IW bound and the flow posterior at equal wall time."""
    return lever_table(out, "bound_and_posterior", [("estimator", "estimator", "reparam"), ("posterior", "q(t\\|x)", "gaussian")])


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
        last = [m for m in training_metrics if m.get("test_elbo") is not None][-1]
        columns[label] = [last["epoch"], minutes(last["wall_time"]), nats(last["test_elbo"]),
                          f"**{nats(nll['whole_split_nll_with_whole_split_particles'])}**",
                          f"**{nats(nll['whole_split_nll'])} ± {nll['whole_split_nll_standard_error']:.2f}**"]
    _, nll = runs["on the ELBO"]
    names = ["epochs", "training time", "test ELBO after the last epoch (nats)",
             f"NLL, IW bound with K={nll['whole_split_particles']} on every image",
             f"NLL, K={nll['num_particles']}: every image's ELBO + the IW gap on {nll['num_images']:,} random images"]
    rows = [[name, *(column[i] for column in columns.values())] for i, name in enumerate(names)]
    return (table(["last 20 minutes trained", *columns], rows) + "\n\n"
            + provenance_line(out, out.run("best_one_hour"), out.run("best_one_hour_iwae"),
                              out.run("best_one_hour_likelihood"), out.run("best_one_hour_iwae_likelihood")))


# --- data-parallel training ---------------------------------------------------------------------

def data_parallel(out: Outputs) -> str:
    """One process against two ranks on the same global batch: each epoch's seconds, the test ELBO."""
    runs = {"1 process, 2 threads": (out.run("speed_data_parallel"), "python train.py experiment=speed/data_parallel"),
            "2 ranks (torchrun), 1 thread each": (out.run("speed_data_parallel_2ranks"), "torchrun --standalone "
                "--nproc_per_node=2 train.py experiment=speed/data_parallel hydra.run.dir=outputs/experiments/speed_data_parallel_2ranks")}
    metrics = {name: read_jsonl(run / "metrics.jsonl", command) for name, (run, command) in runs.items()}
    rows = [[name, " / ".join(f"{m['seconds']:.1f}" for m in lines[1:]), nats(lines[-1]["test_elbo"])]
            for name, lines in metrics.items()]
    return (table(["training", "seconds per epoch", f"test ELBO after epoch {metrics[next(iter(metrics))][-1]['epoch']}"],
                  rows) + "\n\n" + provenance_line(out, *(run for run, _ in runs.values())))


# --- what the density model is for -------------------------------------------------------------

USES = "python evaluate.py -m experiment=default/applications"
SCORES = (("neg_elbo", "-ELBO"), ("kl", "KL"), ("neg_recon", "-reconstruction"), ("iw_nll", "IW NLL"))


def use(out: Outputs, task: str) -> dict[str, Any]:
    return read_json(out.sweep("default_applications") / task / "metrics.json", USES)


def auc(cell: dict[str, float]) -> str:
    return f"{cell['auroc']:.3f} / {cell['auprc']:.3f}"


def generation(out: Outputs) -> str:
    directory = out.sweep("default_applications") / "generate"
    if not (directory / "samples.png").is_file():
        raise NotRun(USES)
    for name in ("interpolations", "traversals"):  # its prior samples are those of the README's picture
        copy_figure(directory / f"{name}.png", out.figures / f"generate_{name}.png")
    metrics = use(out, "generate")
    quality = ""
    if "sample_confident_share" in metrics:  # the digit classifier's judgement (vae/classifier.py)
        classes = metrics["sample_confident_classes"]
        quality = (f"A small digit classifier (test accuracy {metrics['classifier_test_accuracy']:.1%}) is confident "
                   f"(p > {metrics['confidence_threshold']}) on **{metrics['sample_confident_share']:.1%}** "
                   f"of {metrics['scored_samples']:,} decoded "
                   f"prior samples, against {metrics['test_confident_share']:.1%} of the real test digits; the confident "
                   f"samples fall in {sum(c > 0 for c in classes)} of the {len(classes)} classes "
                   f"(from {min(classes)} to {max(classes)} samples each).\n\n")
    return quality + provenance_line(out, directory)


def representation(out: Outputs) -> str:
    probe = use(out, "represent")
    return (f"A multinomial logistic regression on the latent means t_loc(x) (training split -> test split): "
            f"**{probe['linear_probe_accuracy']:.1%}** test accuracy.\n\n" + provenance_line(out, out.sweep("default_applications") / "represent"))


def ood(out: Outputs) -> str:
    result = use(out, "anomaly")
    rows = [[row["anomalies"], row["n"], *(auc(row[score]) for score, _ in SCORES)] for row in result["detection"]]
    means = result["mean_scores"]
    rows.append(["mean score: normal / " + " / ".join(name for name in means if name != "normal"), "",
                 *(" / ".join(f"{means[name][score]:.1f}" for name in means) for score, _ in SCORES)])
    return (table(["anomalies", "images", *(f"{label} AUROC / AUPRC" for _, label in SCORES)], rows) + "\n\n"
            + provenance_line(out, out.sweep("default_applications") / "anomaly"))


def heldout_rows(out: Outputs) -> list[tuple[int, dict[str, Any], list[dict[str, Any]]]]:
    evaluations = out.sweep("heldout_digit_anomaly")
    found = sorted(evaluations.glob("*/metrics.json")) if evaluations.is_dir() else []
    if not found:
        raise NotRun("python train.py -m experiment=heldout_digit/train && python evaluate.py -m experiment=heldout_digit/anomaly")
    rows = []
    for path in found:
        result = json.loads(path.read_text())
        run = Path(result["run"])
        rows.append((int(run.name), result, read_jsonl(run / "metrics.jsonl", "python train.py -m experiment=heldout_digit/train")))
    return sorted(rows, key=lambda row: row[0])


def heldout(out: Outputs) -> str:
    lines = []
    for digit, result, training_metrics in heldout_rows(out):
        detection = {row["anomalies"]: row for row in result["detection"]}
        held = next(row for name, row in detection.items() if name.startswith("held-out"))
        lines.append([digit, held["n"], nats(training_metrics[-1]["test_elbo"]), *(auc(held[score]) for score, _ in SCORES),
                      f"{detection['noise']['neg_elbo']['auroc']:.2f}, {detection['inverted']['neg_elbo']['auroc']:.2f}"])
    head = ["held-out digit", "images", "test ELBO of the run", *(f"{label} AUROC / AUPRC" for _, label in SCORES),
            "noise, inverted: -ELBO AUROC"]
    return table(head, lines) + "\n\n" + provenance_line(out, out.sweep("heldout_digit"), out.sweep("heldout_digit_anomaly"))


def impute(out: Outputs) -> str:
    result = use(out, "impute")
    methods = [name for name in result["rows"] if name not in ("masked", "truth")]
    lines = []
    for kind, errors in result["errors"].items():
        best = min(errors[name]["mse"] for name in methods)
        cells = []
        for name in methods:
            cell = f"{errors[name]['mse']:.3f}"
            if "effective_sample_size" in errors[name]:
                cell += f" ({errors[name]['effective_sample_size']:.1f})"
            cells.append(f"**{cell}**" if errors[name]["mse"] == best else cell)
        lines.append([kind.replace("_", " "), *cells])
    return (f"{result['num_images']:,} test images; MSE on the missing pixels (in brackets: the mean effective sample size "
            "of the importance weights).\n\n" + table(["mask", *(name.replace("_", " ") for name in methods)], lines)
            + "\n\n" + provenance_line(out, out.sweep("default_applications") / "impute"))


def applications_short(out: Outputs) -> str:
    probe, anomaly, imputation = use(out, "represent"), use(out, "anomaly"), use(out, "impute")
    detection = {row["anomalies"]: row for row in anomaly["detection"]}
    errors = imputation["errors"]
    baselines = ("mean_image", "nearest_neighbour")
    rows = [["representation: a linear probe on t_loc(x)", f"test accuracy **{probe['linear_probe_accuracy']:.1%}**"],
            ["anomalies: uniform noise, inverted digits", "-ELBO AUROC " + ", ".join(
                f"{detection[name]['neg_elbo']['auroc']:.2f}" for name in ("noise", "inverted"))],
            ["missing data: fitted importance sampling against the better baseline, MSE", "; ".join(
                f"{kind.replace('_', ' ')} **{e['fitted_importance']['mse']:.3f}** vs {min(e[b]['mse'] for b in baselines):.3f}"
                for kind, e in errors.items())]]
    generated = use(out, "generate")
    if "sample_confident_share" in generated:
        rows.insert(0, [f"generation: prior samples a digit classifier is confident about (p > {generated['confidence_threshold']})",
                        f"**{generated['sample_confident_share']:.1%}** of samples, {generated['test_confident_share']:.1%} "
                        "of real test digits"])
    try:
        held = [(digit, next(r for r in result["detection"] if r["anomalies"].startswith("held-out"))["neg_elbo"]["auroc"])
                for digit, result, _ in heldout_rows(out)]
        rows.insert(2, ["anomalies: a digit left out of training", "-ELBO AUROC " + ", ".join(
            f"{digit}: {value:.2f}" for digit, value in held)])
    except NotRun:
        pass
    return table(["use", "result"], rows) + "\n\n" + provenance_line(out, out.sweep("default_applications"))


# --- speed -------------------------------------------------------------------------------------

def bench_report(out: Outputs) -> dict[str, Any]:
    return read_json(out.run("speed_bench") / "bench.json", "python bench.py experiment=speed/bench")


def speed(out: Outputs) -> str:
    report = bench_report(out)
    rows = [[f"`{name}`", f"{r['median_ms']:.2f}", f"{r['iqr_ms']:.2f}", f"{r['ratio_to_raw']:.3f}", f"{r['ratio_iqr']:.3f}"]
            for name, r in report["results"].items()]
    e = report["evaluation"]
    return (f"Batch {report['batch_size']}, {report['rounds']} rounds of {report['steps_per_round']} steps per variant.\n\n"
            + table(["variant", "median ms per step", "IQR ms", "ratio to `raw`, median over rounds", "IQR"], rows)
            + f"\n\nProducing one training batch costs {report['data_fraction_of_step']:.1%} of a raw step; the IW "
            f"estimate of log p(x) (K={e['particles']}) runs at {e['iw_throughput_fraction_of_decoder']:.1%} of the "
            f"bare decoder's throughput" + (f"; with {e['flows']} inverse autoregressive flows in q(t|x) it takes "
                                            f"{e['flow_time_ratio']:.2f}x the time per image of the Gaussian q(t|x)"
                                            if "flows" in e else "")
            + ".\n\n" + provenance_line(out, out.run("speed_bench")))


def speed_short(out: Outputs) -> str:
    results = bench_report(out)["results"]
    rows = [[f"`{name}`", f"{results[name]['median_ms']:.1f}", f"{results[name]['ratio_to_raw']:.2f}"]
            for name in ("raw", "reparam", "reparam_jit", "reparam_bf16", "score", "score_loo") if name in results]
    return (table(["one training step (batch " + str(bench_report(out)["batch_size"]) + ")", "ms", "/ raw"], rows)
            + "\n\n" + provenance_line(out, out.run("speed_bench")))


# --- faults ------------------------------------------------------------------------------------

def faults(out: Outputs) -> str:
    directory = out.run("reliability_faults")
    result = read_json(directory / "faults.json", "python faults.py experiment=reliability/faults")
    copy_figure(directory / "faults.png", out.figures / "faults.png")
    s = result["summary"]
    rows = [["SIGKILLs / SIGTERMs sent", f"{s['kills']} / {s['terms']}"],
            ["runs continued to the end", f"{s['runs_resumed_to_the_end']} of {s['runs']}"],
            ["runs ending with the uninterrupted run's weights and metrics", f"{s['runs_equal_to_uninterrupted']} of {s['runs']}"],
            ["epochs lost / duplicated in metrics.jsonl", f"{s['epochs_lost']} / {s['epochs_duplicated']}"],
            ["exit codes after SIGTERM", ", ".join(f"{code}: {n}" for code, n in sorted(s["sigterm_exit_codes"].items()))]]
    for key, n in sorted(s["moments"].items()):  # "SIGKILL, training": what the run was doing at the signal
        signal, moment = key.split(", ", 1)
        rows.append([f"{signal}s {'that came after the run had ended' if moment == 'finished first' else 'while ' + moment}", n])
    if "training_seconds" in s:
        rows.append(["the uninterrupted run's training time, s", f"{s['training_seconds']:.1f}"])
    return table(["", "count"], rows) + "\n\n" + provenance_line(out, directory)


BLOCKS: dict[str, Callable[[Outputs], str]] = {
    "quickstart": quickstart, "training": training, "estimators": estimators, "estimators_short": estimators_short,
    "variance": variance, "likelihood": likelihood, "likelihood_short": likelihood_short, "generation": generation,
    "representation": representation, "ood": ood, "heldout_digit": heldout, "impute": impute, "applications_short": applications_short,
    "speed": speed, "speed_short": speed_short, "faults": faults, "likelihoods": likelihoods,
    "likelihood_pixels": likelihood_pixels, "one_hour_logistic_mixture": one_hour_seeds,
    "one_hour_gaussian": lambda out: one_hour_seeds(out, "one_hour_gaussian"), "bound_and_posterior": bound_and_posterior,
    "depth_latent_warmup": depth_latent_warmup, "lr_schedule": lr_schedule, "bf16": bf16, "best_one_hour": best_one_hour,
    "best_one_hour_iwae": best_one_hour_iwae,
    "data_parallel": data_parallel, "beta_nll": beta_nll,
    "beta_nll_loc": lambda out: beta_nll(out, "beta_nll_loc", "loc"),
    "one_hour_gaussian_loc": lambda out: one_hour_seeds(out, "one_hour_gaussian_loc"),
}


class UnknownBlock(KeyError):
    """A report block name that BLOCKS does not know; report.py says it in one line."""


def check_blocks(only: Collection[str] | None) -> None:
    unknown = sorted(set(only or ()) - set(BLOCKS))
    if unknown:
        raise UnknownBlock(f"blocks={unknown}: no such block; known: {', '.join(BLOCKS)}")


def fill(text: str, out: Outputs, only: Collection[str] | None = None) -> str:
    """`text` with every report block's contents (or those of the blocks named in `only`) made
    anew from the outputs."""
    check_blocks(only)

    def block(match: re.Match) -> str:
        name = match.group(2)
        if name not in BLOCKS:
            raise UnknownBlock(f"<!-- report:{name} -->: no such block; known: {', '.join(BLOCKS)}")
        if only is not None and name not in only:
            return match.group(0)
        try:
            contents = BLOCKS[name](out)
        except NotRun as missing:
            contents = f"_Not run yet: `{missing}`._"
        return f"{match.group(1)}{contents}\n{match.group(3)}"

    return BLOCK.sub(block, text)


def write_results(experiments: Path, sweeps: Path, documents: list[Path], figures: Path,
                  only: Collection[str] | None = None) -> list[Path]:
    """Fill the report blocks of each document (those named in `only`; docs/ documents with commits
    and dates); return them."""
    check_blocks(only)
    figures.mkdir(parents=True, exist_ok=True)
    for document in documents:
        if not document.is_file():
            raise FileNotFoundError(f"no document {document} to fill in")
        out = Outputs(experiments, sweeps, figures, full=document.name != "README.md")
        document.write_text(fill(document.read_text(), out, only))
    return documents
