"""Pictures of what the model has learned: images from p(x|t) for chosen latent codes t.

    samples          t ~ p(t) = N(0, I) with a fixed seed, decoded
    samples_drawn    the same t, and x ~ p(x|t): what the likelihood adds to E[x|t] (its pixel noise)
    reconstructions  test images x above, E[x|t_loc(x)] below (t at the mean of q(t|x))
    interpolations   t = (1 - a) t_loc(x_a) + a t_loc(x_b), a in [0, 1], for pairs of test images
    traversals       row d: t = v e_d for v in [-radius, radius], every other coordinate at 0
    manifold         latent_dim = 2 only: a grid of t at the standard normal's quantiles, decoded

Every picture but samples_drawn shows E[x|t] (the Bernoulli probabilities, the Gaussian mean, the
discretized logistic's mean), not a noisy sample.

Sample quality as a number, beside bits/dim (`vae.classifier`): a small CNN is trained on the
run's training split (raw intensities in [0, 1], `classifier_epochs` passes) and scores E[x|t] for
`scored_samples` draws t ~ p(t) (with `sample_seed`: the samples grid's kind of images, more of
them). `sample_confident_share` is the share of samples whose top class probability exceeds
`confidence_threshold`; `test_confident_share`, the same for the real test images, is the ceiling
to read it against. It rewards clear, digit-like means, not diversity (one well-drawn digit every
time would score high), hence `sample_confident_classes`, the predicted classes of the confident
samples. And the judge's confidence is no proof of a digit: a ReLU network can be confident far
from its data, so look at the samples grid too. Classes left out of the training split
(`data.exclude_classes`) are never learnt by the judge, which lowers `classifier_test_accuracy` by
about their share of the test split.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.utils import save_image

from guide import latent_point
from vae.classifier import accuracy, confident_share, train_classifier
from vae.config import ConfigError
from vae.data import NO_LABELS, labelled, load_split
from vae.runs import TrainedRun

CLASSIFIER_SEED = 0  # one judge for every sample_seed: only the samples change with it
CONFIDENCE_THRESHOLD = 0.9


def prior_latents(decoder: nn.Module, num_samples: int, seed: int) -> Tensor:
    """S latents t ~ p(t), (S, latent_dim), from a generator seeded with `seed` (the run's prior)."""
    t = decoder.prior.draw(num_samples, torch.Generator().manual_seed(seed))
    return t.to(next(decoder.parameters()).device)


@torch.no_grad()
def prior_samples(decoder: nn.Module, num_samples: int, seed: int) -> Tensor:
    """E[x|t] (S, C, H, W) for the S latents of `prior_latents`."""
    return decoder(prior_latents(decoder, num_samples, seed)).mean


@torch.no_grad()
def drawn_samples(decoder: nn.Module, num_samples: int, seed: int) -> Tensor:
    """x ~ p(x|t) (S, C, H, W) for the same latents: E[x|t] with the likelihood's pixel noise."""
    return decoder(prior_latents(decoder, num_samples, seed)).sample().clamp(0, 1)


@torch.no_grad()
def interpolate(encoder: nn.Module, decoder: nn.Module, x_a: Tensor, x_b: Tensor, steps: int) -> Tensor:
    """E[x|t] (P, steps, C, H, W) along the line from t(x_a) to t(x_b), the codes of `guide.latent_point`
    (t_loc for the Gaussian q), for P pairs."""
    t_a = latent_point(x_a, encoder)  # (P, L)
    t_b = latent_point(x_b, encoder)  # (P, L)
    a = torch.linspace(0, 1, steps, device=t_a.device)[None, :, None]  # (1, steps, 1)
    t = (1 - a) * t_a[:, None] + a * t_b[:, None]  # (P, steps, L)
    return decoder(t.flatten(0, 1)).mean.unflatten(0, t.shape[:2])


@torch.no_grad()
def traverse(decoder: nn.Module, steps: int, radius: float) -> Tensor:
    """E[x|t] (L, steps, C, H, W): row d moves t along coordinate d from -radius to radius."""
    device = next(decoder.parameters()).device
    values = torch.linspace(-radius, radius, steps, device=device)  # (steps,)
    t = torch.eye(decoder.latent_dim, device=device)[:, None, :] * values[None, :, None]  # (L, steps, L)
    return decoder(t.flatten(0, 1)).mean.unflatten(0, t.shape[:2])


def normal_quantile_grid(steps: int, device: torch.device | None = None) -> Tensor:
    """(steps * steps, 2) latents at the N(0, 1) quantiles of an evenly spaced grid in (0, 1),
    so the grid covers the prior's mass evenly; row-major, t_2 growing downwards."""
    probabilities = torch.linspace(0, 1, steps + 2, device=device)[1:-1]  # no 0 or 1
    values = torch.distributions.Normal(0.0, 1.0).icdf(probabilities)  # (steps,)
    t_2, t_1 = torch.meshgrid(values, values, indexing="ij")
    return torch.stack([t_1.flatten(), t_2.flatten()], dim=1)


def sample_quality(run: TrainedRun, scored_samples: int, sample_seed: int, epochs: int) -> dict[str, float | list[int]]:
    """A classifier trained on the raw training split: its test accuracy, and its confident share
    on the raw test images and on E[x|t] for `scored_samples` prior draws t ~ p(t)."""
    train_images, train_labels = load_split(run.cfg.data, train=True)  # intensities, not observations
    test_images, test_labels = load_split(run.cfg.data, train=False)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1  # the test split keeps held-out classes
    classifier = train_classifier(train_images.to(run.device), train_labels.to(run.device), num_classes,
                                  epochs, CLASSIFIER_SEED)
    test_images = test_images.to(run.device)
    test_share, _ = confident_share(classifier, test_images, CONFIDENCE_THRESHOLD)
    sample_share, sample_classes = confident_share(
        classifier, prior_samples(run.decoder, scored_samples, sample_seed), CONFIDENCE_THRESHOLD)
    return {"classifier_test_accuracy": accuracy(classifier, test_images, test_labels),
            "test_confident_share": test_share, "scored_samples": scored_samples, "sample_confident_share": sample_share,
            "sample_confident_classes": sample_classes.tolist(), "confidence_threshold": CONFIDENCE_THRESHOLD}


def generate(
    run: TrainedRun, out_dir: Path, num_samples: int = 64, sample_seed: int = 0, num_images: int = 16,
    num_pairs: int = 8, steps: int = 10, traversal_radius: float = 3.0, manifold_steps: int = 20,
    classifier_epochs: int = 2, scored_samples: int = 1000,
) -> dict[str, str | float | list[int]]:
    """Write the pictures as PNG grids under out_dir; return their paths and, unless
    classifier_epochs is 0, the sample-quality numbers of `sample_quality`."""
    x_test, labels = run.split(train=False)
    if classifier_epochs > 0 and not labelled(labels):
        raise ConfigError(f"task.classifier_epochs={classifier_epochs}: the sample-quality classifier learns labels, "
                          f"and {NO_LABELS}; set task.classifier_epochs=0")
    encoder, decoder = run.encoder, run.decoder
    files = {"samples": out_dir / "samples.png", "samples_drawn": out_dir / "samples_drawn.png",
             "reconstructions": out_dir / "reconstructions.png",
             "interpolations": out_dir / "interpolations.png", "traversals": out_dir / "traversals.png"}
    save_image(prior_samples(decoder, num_samples, sample_seed), files["samples"], nrow=int(num_samples**0.5))
    save_image(drawn_samples(decoder, num_samples, sample_seed), files["samples_drawn"], nrow=int(num_samples**0.5))
    with torch.no_grad():
        x_shown = x_test[:num_images]
        reconstruction = decoder(latent_point(x_shown, encoder)).mean
    save_image(torch.cat([x_shown, reconstruction]), files["reconstructions"], nrow=num_images)
    x_a, x_b = x_test[: 2 * num_pairs : 2], x_test[1 : 2 * num_pairs : 2]
    save_image(interpolate(encoder, decoder, x_a, x_b, steps).flatten(0, 1), files["interpolations"], nrow=steps)
    save_image(traverse(decoder, steps, traversal_radius).flatten(0, 1), files["traversals"], nrow=steps)
    if decoder.latent_dim == 2:
        files["manifold"] = out_dir / "manifold.png"
        with torch.no_grad():
            manifold = decoder(normal_quantile_grid(manifold_steps, run.device)).mean
        save_image(manifold, files["manifold"], nrow=manifold_steps)
    result: dict[str, str | float | list[int]] = {name: str(path) for name, path in files.items()}
    if classifier_epochs > 0:
        result.update(sample_quality(run, scored_samples, sample_seed, classifier_epochs))
    return result
