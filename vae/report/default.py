"""The default model (`experiment=default/train`) and what its density is for (`default/applications`:
generation, representation, anomaly detection, missing data), with the held-out digit (`heldout_digit/`).
"""
from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vae.report.common import NotRun, Outputs, copy_figure, provenance_line, read_json, read_jsonl, table
from vae.sweeps import nats


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
            f"**{probe['linear_probe_accuracy']:.1%}** test accuracy.\n\n"
            + provenance_line(out, out.sweep("default_applications") / "represent"))


def ood(out: Outputs) -> str:
    result = use(out, "anomaly")
    rows = [[row["anomalies"], row["n"], *(auc(row[score]) for score, _ in SCORES)] for row in result["detection"]]
    means = result["mean_scores"]
    rows.append(["mean score: normal / " + " / ".join(name for name in means if name != "normal"), "",
                 *(" / ".join(f"{means[name][score]:.1f}" for name in means) for score, _ in SCORES)])
    return (table(["anomalies", "images", *(f"{label} AUROC / AUPRC" for _, label in SCORES)], rows) + "\n\n"
            + provenance_line(out, out.sweep("default_applications") / "anomaly"))


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



def image_folder_mnist_png(out: Outputs) -> str:
    """The default model's first epoch on MNIST read as PNG files through data=image_folder: its test ELBO
    before and after the epoch, to set beside the quickstart's (the same images in the same order)."""
    directory = out.run("image_folder_mnist_png")
    metrics = read_jsonl(directory / "metrics.jsonl", "python -m tools.mnist_as_png outputs/mnist_png && "
                                                        "python train.py experiment=image_folder/mnist_png")
    rows = [[f"after epoch {m['epoch']}" if m["epoch"] else "untrained (epoch 0)", f"{m['test_elbo']:.2f}"]
            for m in metrics if m.get("test_elbo") is not None]
    return table(["MNIST as PNG files, `data=image_folder`", "test ELBO (nats)"], rows) + "\n\n" + provenance_line(out, directory)

BLOCKS: dict[str, Callable[[Outputs], str]] = {
    "quickstart": quickstart,
    "training": training,
    "generation": generation,
    "representation": representation,
    "ood": ood,
    "heldout_digit": heldout,
    "impute": impute,
    "applications_short": applications_short,
    "image_folder_mnist_png": image_folder_mnist_png,
}
