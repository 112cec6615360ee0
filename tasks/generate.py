"""Pictures of what the model has learned: images from p(x|t) for chosen latent codes t.

    samples          t ~ p(t) = N(0, I) with a fixed seed, decoded
    reconstructions  test images x above, E[x|t_loc(x)] below (t at the mean of q(t|x))
    interpolations   t = (1 - a) t_loc(x_a) + a t_loc(x_b), a in [0, 1], for pairs of test images
    traversals       row d: t = v e_d for v in [-radius, radius], every other coordinate at 0
    manifold         latent_dim = 2 only: a grid of t at the standard normal's quantiles, decoded

Every picture shows E[x|t] (the Bernoulli probabilities or the Gaussian mean), not a noisy sample.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.utils import save_image

from model import mean_image
from vae.runs import TrainedRun


@torch.no_grad()
def prior_samples(decoder: nn.Module, num_samples: int, seed: int) -> Tensor:
    """E[x|t] (S, C, H, W) for S latents t ~ p(t) drawn from a generator seeded with `seed`."""
    t = torch.randn(num_samples, decoder.latent_dim, generator=torch.Generator().manual_seed(seed))  # (S, L)
    return mean_image(decoder, t.to(next(decoder.parameters()).device))


@torch.no_grad()
def interpolate(encoder: nn.Module, decoder: nn.Module, x_a: Tensor, x_b: Tensor, steps: int) -> Tensor:
    """E[x|t] (P, steps, C, H, W) along the line from t_loc(x_a) to t_loc(x_b), for P pairs."""
    t_a, _ = encoder(x_a)  # (P, L)
    t_b, _ = encoder(x_b)  # (P, L)
    a = torch.linspace(0, 1, steps, device=t_a.device)[None, :, None]  # (1, steps, 1)
    t = (1 - a) * t_a[:, None] + a * t_b[:, None]  # (P, steps, L)
    return mean_image(decoder, t.flatten(0, 1)).unflatten(0, t.shape[:2])


@torch.no_grad()
def traverse(decoder: nn.Module, steps: int, radius: float) -> Tensor:
    """E[x|t] (L, steps, C, H, W): row d moves t along coordinate d from -radius to radius."""
    device = next(decoder.parameters()).device
    values = torch.linspace(-radius, radius, steps, device=device)  # (steps,)
    t = torch.eye(decoder.latent_dim, device=device)[:, None, :] * values[None, :, None]  # (L, steps, L)
    return mean_image(decoder, t.flatten(0, 1)).unflatten(0, t.shape[:2])


def normal_quantile_grid(steps: int, device: torch.device | None = None) -> Tensor:
    """(steps * steps, 2) latents at the N(0, 1) quantiles of an evenly spaced grid in (0, 1),
    so the grid covers the prior's mass evenly; row-major, t_2 growing downwards."""
    probabilities = torch.linspace(0, 1, steps + 2, device=device)[1:-1]  # no 0 or 1
    values = torch.distributions.Normal(0.0, 1.0).icdf(probabilities)  # (steps,)
    t_2, t_1 = torch.meshgrid(values, values, indexing="ij")
    return torch.stack([t_1.flatten(), t_2.flatten()], dim=1)


def generate(
    run: TrainedRun, out_dir: Path, num_samples: int = 64, sample_seed: int = 0, num_images: int = 16,
    num_pairs: int = 8, steps: int = 10, traversal_radius: float = 3.0, manifold_steps: int = 20,
) -> dict[str, str]:
    """Write the pictures as PNG grids under out_dir; return their paths."""
    x_test, _ = run.split(train=False)
    encoder, decoder = run.encoder, run.decoder
    files = {"samples": out_dir / "samples.png", "reconstructions": out_dir / "reconstructions.png",
             "interpolations": out_dir / "interpolations.png", "traversals": out_dir / "traversals.png"}
    save_image(prior_samples(decoder, num_samples, sample_seed), files["samples"], nrow=int(num_samples**0.5))
    with torch.no_grad():
        x_shown = x_test[:num_images]
        reconstruction = mean_image(decoder, encoder(x_shown)[0])
    save_image(torch.cat([x_shown, reconstruction]), files["reconstructions"], nrow=num_images)
    x_a, x_b = x_test[: 2 * num_pairs : 2], x_test[1 : 2 * num_pairs : 2]
    save_image(interpolate(encoder, decoder, x_a, x_b, steps).flatten(0, 1), files["interpolations"], nrow=steps)
    save_image(traverse(decoder, steps, traversal_radius).flatten(0, 1), files["traversals"], nrow=steps)
    if decoder.latent_dim == 2:
        files["manifold"] = out_dir / "manifold.png"
        with torch.no_grad():
            manifold = mean_image(decoder, normal_quantile_grid(manifold_steps, run.device))
        save_image(manifold, files["manifold"], nrow=manifold_steps)
    return {name: str(path) for name, path in files.items()}
