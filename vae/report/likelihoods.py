"""The likelihoods of gray levels (`experiment=likelihoods/`) and the beta-NLL (`beta_nll/`, `beta_nll_loc/`).
"""
from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from vae.report.common import (NotRun, Outputs, at_common_epoch, copy_figure, failed_seeds, label_options, provenance_line,
                               run_evaluations, sweep_progress, table, trained_jobs)


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


BLOCKS: dict[str, Callable[[Outputs], str]] = {
    "likelihoods": likelihoods,
    "likelihood_pixels": likelihood_pixels,
    "beta_nll": beta_nll,
    "beta_nll_loc": lambda out: beta_nll(out, "beta_nll_loc", "loc"),
}
