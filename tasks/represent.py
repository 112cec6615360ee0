"""The latent code as a representation: t_loc(x), the mean of q(t|x), for every image (with a richer
posterior, the code of `guide.latent_point`: the point t_loc maps to, e.g. through the flows).

    export        latents_<split>.npz per split: t_loc (N, latent_dim) that code, t_scale (N, latent_dim)
                  the Gaussian's scale (with a richer posterior: its base's), labels (N,)
    linear probe  multinomial logistic regression p(y|t_loc) = softmax(A t_loc + c), fitted on the
                  training split and scored on the test split: accuracy is the number for how
                  linearly the labels can be read off the code (no labels were used to train it)
    scatter       latent_dim = 2 only: the test set's t_loc coloured by label

The probe is scikit-learn's `LogisticRegression` (L-BFGS) on features standardized with the
training split's statistics.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor, nn

from vae.config import ConfigError
from vae.data import NO_LABELS, labelled
from vae.runs import TrainedRun


@torch.no_grad()
def latent_means(encoder: nn.Module, x: Tensor, batch_size: int = 1000) -> tuple[Tensor, Tensor]:
    """(the code of `guide.latent_point`, t_scale of the Gaussian), each (N, latent_dim), for all of x (N, C, H, W)."""
    codes, scales = [], []
    for x_batch in x.split(batch_size):  # one encoder pass per batch gives both
        t_loc, t_scale, h = encoder(x_batch)
        codes.append(encoder.posterior.point(t_loc, h))
        scales.append(t_scale)
    return torch.cat(codes), torch.cat(scales)


def linear_probe(
    t_train: Tensor, y_train: Tensor, t_test: Tensor, y_test: Tensor, l2: float = 1e-4, max_iter: int = 200
) -> float:
    """Test accuracy of softmax(A t + c) fitted to (t_train, y_train) by minimizing
    mean cross-entropy + l2 * ||A||^2 (features standardized by the training mean and std).

    scikit-learn minimizes C * sum cross-entropy + ||A||^2 / 2, the same objective times C N when
    C = 1 / (2 l2 N)."""
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=1 / (2 * l2 * len(t_train)), max_iter=max_iter))
    probe.fit(t_train.double().cpu().numpy(), y_train.cpu().numpy())
    return float(probe.score(t_test.double().cpu().numpy(), y_test.cpu().numpy()))


def scatter(t_loc: Tensor, labels: Tensor, path: Path) -> None:
    """The 2-d codes t_loc (N, 2) as points coloured by label."""
    figure = Figure(figsize=(6, 5))
    axes = figure.subplots()
    points = axes.scatter(t_loc[:, 0].cpu(), t_loc[:, 1].cpu(), c=labels.cpu(), cmap="tab10", s=2)
    figure.colorbar(points, ax=axes, label="label")
    axes.set(xlabel="t_1 (mean of q(t|x))", ylabel="t_2", title="test set in the latent plane")
    figure.savefig(path, dpi=120, bbox_inches="tight")


def represent(run: TrainedRun, out_dir: Path, splits: tuple[str, ...] = ("train", "test"),
              l2: float = 1e-4, max_iter: int = 200) -> dict[str, float | str]:
    """Export the latent means of each split, fit the linear probe train -> test, and scatter the
    2-d test codes."""
    codes = {}
    for split in splits:
        x, labels = run.split(train=split == "train")
        if not labelled(labels):
            raise ConfigError(f"task=represent: the linear probe and the scatter read labels, and {NO_LABELS}")
        t_loc, t_scale = latent_means(run.encoder, x)
        codes[split] = (t_loc, labels)
        np.savez(out_dir / f"latents_{split}.npz", t_loc=t_loc.cpu().numpy(), t_scale=t_scale.cpu().numpy(),
                 labels=labels.numpy())
    result: dict[str, float | str] = {"latents": str(out_dir)}
    if "train" in codes and "test" in codes:
        result["linear_probe_accuracy"] = linear_probe(*codes["train"], *codes["test"], l2=l2, max_iter=max_iter)
    if run.decoder.latent_dim == 2 and "test" in codes:
        scatter(*codes["test"], out_dir / "latent_scatter.png")
        result["scatter"] = str(out_dir / "latent_scatter.png")
    return result
