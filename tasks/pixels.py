"""Where the likelihood spends its bits: the test pixels in three groups by their 8-bit level,

    background  level 0           (most of a digit's pixels)
    edge        levels 1 to 254   (the rims of the strokes)
    ink         level 255

and for each group: its share of the pixels, the bits per pixel that -log p(x_pixel|t) costs
(a density of dequantized pixels counts its bin's width, as bits/dim does), its share of all the
bits, and, for a learned scale, the median scale, the share at the floor `likelihood.min_scale` and the
mean of 1/scale^2, the weight that the gradient of log p gives the pixel's mean (a Gaussian's
d log p / d x_loc = (x - x_loc) / scale^2). t is the mean of q(t|x): what the decoder says of the
image it is shown. A likelihood that rewards the background's precision shows here: bits that go to
the groups unlike their pixels' share, and gradient weights thousands of times apart.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from guide import latent_point
from vae.config import ConfigError
from vae.data import bits_per_dim, load_split, observe_test_set
from vae.elbo import FLOOR_MARGIN
from vae.runs import TrainedRun

GROUPS = {"background": (0, 0), "edge": (1, 254), "ink": (255, 255)}  # inclusive ranges of levels


@torch.no_grad()
def pixel_costs(run: TrainedRun, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """(bits per pixel of -log p(x_pixel|t(x)), (B, C, H, W); the pixels' scales or None), at the
    code t(x) of `guide.latent_point` (t_loc for the Gaussian q)."""
    t_loc = latent_point(x, run.encoder)
    p_x = run.decoder(t_loc).base_dist  # per pixel: batch (B, C, H, W), no event
    bits = bits_per_dim(p_x.log_prob(x), (1,), run.decoder.likelihood.log_bin_width)  # one pixel at a time
    likelihood = run.decoder.likelihood
    scale = likelihood.learned_scale(p_x) if likelihood.min_scale is not None else None  # None: no learned scale
    if scale is not None and scale.dim() > x.dim():  # a mixture: the scale of its heaviest component
        scale = scale.gather(-1, p_x.logits.argmax(-1, keepdim=True)).squeeze(-1)
    return bits, scale


def pixels(run: TrainedRun, out_dir: Path, max_images: int = 1000, batch_size: int = 250) -> dict:
    """The table above for the first `max_images` test images, as metrics and pixels.md."""
    if run.decoder.likelihood.log_bin_width is None:
        raise ConfigError(f"task=pixels with likelihood._target_={run.cfg.likelihood._target_}: its observations are "
                          "not the 8-bit levels this task groups and counts in bits; evaluate a run of a likelihood "
                          "of gray levels (likelihood=gaussian, logit_gaussian or discretized_logistic)")
    images, _ = load_split(run.cfg.data, train=False)
    images = images[:max_images]
    levels = torch.round(images * 255).to(run.device)
    x = observe_test_set(images, run.decoder.likelihood).to(run.device)  # as run.split observes them
    costs = [pixel_costs(run, batch) for batch in x.split(batch_size)]
    bits = torch.cat([c[0] for c in costs])
    scale = torch.cat([c[1] for c in costs]) if costs[0][1] is not None else None
    groups = {}
    for name, (low, high) in GROUPS.items():
        inside = (levels >= low) & (levels <= high)
        row = {"share_of_pixels": inside.float().mean().item(),
               "bits_per_pixel": bits[inside].mean().item() if inside.any() else float("nan"),
               "share_of_bits": (bits[inside].sum() / bits.sum()).item()}
        if scale is not None and inside.any():
            row.update(median_scale=scale[inside].median().item(),
                       at_floor=(scale[inside] < FLOOR_MARGIN * run.decoder.likelihood.min_scale).float().mean().item(),
                       mean_gradient_weight=scale[inside].pow(-2).mean().item())
        groups[name] = row
    result = {"num_images": len(x), "dims_per_image": x[0].numel(), "bits_per_dim": bits.mean().item(), "groups": groups}
    (out_dir / "pixels.md").write_text(markdown(result) + "\n")
    return result


def markdown(result: dict) -> str:
    head = ["pixels", "share of pixels", "bits per pixel", "share of the bits", "median scale", "at the floor",
            "mean 1/scale^2"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, row in result["groups"].items():
        scale = ([f"{row['median_scale']:.4f}", f"{row['at_floor']:.1%}", f"{row['mean_gradient_weight']:.3g}"]
                 if "median_scale" in row else ["", "", ""])
        lines.append("| " + " | ".join([name, f"{row['share_of_pixels']:.1%}", f"{row['bits_per_pixel']:.3f}",
                                        f"{row['share_of_bits']:.1%}", *scale]) + " |")
    return "\n".join(lines)
