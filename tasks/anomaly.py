"""Anomaly and out-of-distribution detection with the density model's own scores.

Scores per image, each oriented so that larger = more anomalous:

    neg_elbo    -ELBO(x) = -E_q[log p(x|t)] + KL(q(t|x) || p(t))      (K-sample estimate)
    kl          KL(q(t|x) || p(t)): how far the code of x is from the prior's typical codes
    neg_recon   -E_q[log p(x|t)]: how badly x is reconstructed
    iw_nll      -log p(x) by the importance-weighted bound (vae/importance.py)

Protocol 1 (held-out class): a run trained with `data.exclude_classes=[k]` never saw digit k;
the test images of k are the anomalies, the other test images the normal ones.
Protocol 2 (out-of-distribution): uniform noise, inverted test images, and other datasets whose
files exist (e.g. Fashion-MNIST for an MNIST run), all against the run's normal test images.
AUROC = P(score(anomaly) > score(normal)); AUPRC = average precision with anomalies positive.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf
from sklearn.metrics import average_precision_score, roc_auc_score
from torch import Tensor, nn

from vae.data import DataNotFoundError, load_split, observe_test_set
from vae.importance import dataset_iw
from vae.runs import TrainedRun

log = logging.getLogger(__name__)
SCORES = ("neg_elbo", "kl", "neg_recon", "iw_nll")


def scores(x: Tensor, encoder: nn.Module, decoder: nn.Module, num_particles: int,
           batch_size: int = 100, particles_per_chunk: int = 100) -> dict[str, Tensor]:
    """The four scores (N,) of the images x (N, C, H, W), all from the same K particles."""
    iw = dataset_iw(x, encoder, decoder, num_particles, batch_size, particles_per_chunk)
    return {"neg_elbo": -iw["elbo"], "kl": iw["kl"], "neg_recon": -iw["recon"], "iw_nll": -iw["log_px"]}


def labelled(normal: Tensor, anomalous: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(labels, scores) over every image: label 1 for an anomaly, 0 for a normal image."""
    scores = torch.cat([normal, anomalous]).double().cpu().numpy()
    labels = np.concatenate([np.zeros(len(normal)), np.ones(len(anomalous))])
    return labels, scores


def auroc(normal: Tensor, anomalous: Tensor) -> float:
    """P(a > n) + P(a = n) / 2 for a random anomaly a and normal image n (scikit-learn's ROC AUC)."""
    return float(roc_auc_score(*labelled(normal, anomalous)))


def average_precision(normal: Tensor, anomalous: Tensor) -> float:
    """AUPRC as average precision with the anomalies as positives (scikit-learn's): the precision
    at each anomaly's score, over all images scored at least as high, averaged over the anomalies."""
    return float(average_precision_score(*labelled(normal, anomalous)))


def other_dataset_config(data_cfg: DictConfig, target: str) -> DictConfig:
    """The run's data config with another torchvision dataset class, nothing left out, no download."""
    other = OmegaConf.create(OmegaConf.to_container(data_cfg, resolve=True))
    other.dataset = {"_target_": target, "download": False}
    other.exclude_classes = []
    return other


def outlier_sets(run: TrainedRun, x_normal: Tensor, other_datasets: dict[str, str],
                 max_images: int, seed: int) -> dict[str, Tensor]:
    """Out-of-distribution observations (N, C, H, W), observed by the run's likelihood rule:
    uniform-noise intensities, the inverted test observations 1 - x, and each other dataset that loads
    and has the run's image shape."""
    generator = torch.Generator().manual_seed(seed)
    likelihood = run.decoder.likelihood
    noise = likelihood.observe(torch.rand(x_normal.shape, generator=generator), generator)
    sets = {"noise": noise, "inverted": 1 - x_normal.cpu()}  # 1 - x is a valid observation under every likelihood
    for name, target in other_datasets.items():
        if target == run.cfg.data.dataset._target_:
            continue  # the run's own data is not an outlier
        try:
            images, _ = load_split(other_dataset_config(run.cfg.data, target), train=False)
        except DataNotFoundError:
            log.info(f"{name}: no files under {run.cfg.data.root}, left out")
            continue
        if tuple(images.shape[1:]) != run.image_shape:
            log.info(f"{name}: images {tuple(images.shape[1:])} do not match the run's {run.image_shape}, left out")
            continue
        sets[name] = observe_test_set(images[:max_images], likelihood)
    return {name: x.to(run.device) for name, x in sets.items()}


def histograms(score_sets: dict[str, dict[str, Tensor]], path: Path) -> None:
    """One panel per score: the normal test images against each anomalous set."""
    figure = Figure(figsize=(4.5 * len(SCORES), 3.6))
    panels = figure.subplots(1, len(SCORES))
    for panel, score in zip(panels, SCORES):
        values = {name: s[score].cpu().numpy() for name, s in score_sets.items()}
        bins = np.histogram_bin_edges(np.concatenate(list(values.values())), bins=60)
        for name, v in values.items():
            panel.hist(v, bins=bins, alpha=0.5, density=True, label=name)
        panel.set(title=score, xlabel="score (larger = more anomalous)", yscale="log")
    panels[0].set_ylabel("density")
    panels[-1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def table(rows: list[dict]) -> str:
    """Markdown: one row per anomalous set, AUROC / AUPRC of every score."""
    head = "| anomalies | n | " + " | ".join(f"{s} AUROC / AUPRC" for s in SCORES) + " |"
    lines = [head, "|" + " --- |" * (2 + len(SCORES))]
    for row in rows:
        cells = " | ".join(f"{row[s]['auroc']:.3f} / {row[s]['auprc']:.3f}" for s in SCORES)
        lines.append(f"| {row['anomalies']} | {row['n']} | {cells} |")
    return "\n".join(lines)


def detect_anomalies(
    run: TrainedRun, out_dir: Path, num_particles: int = 100, max_images: int = 2000, batch_size: int = 100,
    particles_per_chunk: int = 100, other_datasets: dict[str, str] | None = None, seed: int = 0,
) -> dict:
    """Scores of the normal test images, the held-out classes (protocol 1) and the outlier sets
    (protocol 2); AUROC and AUPRC of each score per anomalous set; anomaly.md and a histogram."""
    x_test, labels = run.split(train=False)
    excluded = torch.as_tensor(list(run.cfg.data.get("exclude_classes") or []), dtype=torch.long)
    held_out = torch.isin(labels, excluded)
    x_normal = x_test[~held_out][:max_images]
    sets = {"normal": x_normal}
    if held_out.any():
        sets[f"held-out class {excluded.tolist()}"] = x_test[held_out][:max_images]
    sets.update(outlier_sets(run, x_normal, dict(other_datasets or {}), max_images, seed))
    score_sets = {name: scores(x, run.encoder, run.decoder, num_particles, batch_size, particles_per_chunk)
                  for name, x in sets.items()}
    rows = []
    for name, anomalous in score_sets.items():
        if name == "normal":
            continue
        row = {"anomalies": name, "n": len(sets[name])}
        for s in SCORES:
            row[s] = {"auroc": auroc(score_sets["normal"][s], anomalous[s]),
                      "auprc": average_precision(score_sets["normal"][s], anomalous[s])}
        rows.append(row)
    (out_dir / "anomaly.md").write_text(table(rows) + "\n")
    histograms(score_sets, out_dir / "anomaly_scores.png")
    np.savez(out_dir / "anomaly_scores.npz",
             **{f"{name}/{s}": v[s].cpu().numpy() for name, v in score_sets.items() for s in SCORES})
    log.info("\n" + table(rows))
    means = {name: {s: v[s].mean().item() for s in SCORES} for name, v in score_sets.items()}
    return {"num_particles": num_particles, "num_normal": len(x_normal), "mean_scores": means, "detection": rows}
