"""The likelihood task: test NLL = -(1/N) sum_i log p(x_i) by the importance-weighted bound
(vae/importance.py), with its standard error, beside the ELBO; bits/dim for the likelihoods of gray levels.

`python evaluate.py run=<run dir> task=likelihood` (tasks/conf/task/likelihood.yaml).
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vae.data import bits_per_dim
from vae.elbo import dataset_elbo
from vae.importance import dataset_iw, mean_and_standard_error
from vae.runs import TrainedRun

log = logging.getLogger(__name__)


def images_to_evaluate(num_images: int, max_images: int | None, sample_seed: int | None) -> Tensor:
    """Indices into a split of `num_images`: all of them; the first `max_images`; or, with a
    `sample_seed`, `max_images` drawn uniformly without replacement, whose mean is an unbiased
    estimate of the whole split's mean (the first images of a split need not be typical)."""
    if max_images is None or max_images >= num_images:
        return torch.arange(num_images)
    if sample_seed is None:
        return torch.arange(max_images)
    return torch.randperm(num_images, generator=torch.Generator().manual_seed(sample_seed))[:max_images].sort().values


def evaluate_likelihood(
    run: TrainedRun, out_dir: Path, num_particles: int = 5000, batch_size: int = 100,
    particles_per_chunk: int = 100, max_images: int | None = None, sample_seed: int | None = None,
    whole_split_particles: int | None = 100, split: str = "test",
) -> dict[str, float]:
    """Test NLL = -(1/N) sum_i log p(x_i) by the IW bound with K = `num_particles`, its standard
    error, and the ELBO beside it (one sample per image, as in training, and K samples); bits/dim
    too for the likelihoods of gray levels. Writes the per-image values (and their indices) to likelihood.npz.

    On a random sample of the split (`sample_seed`), also the whole split's NLL by a difference
    estimator: its mean log p_K(x) = mean ELBO + mean gap, with gap_i = log p_K(x_i) - ELBO(x_i).
    The ELBO is cheap, so it is averaged over every image (`whole_split_particles` each); the gap
    varies far less from image to image than log p(x) does, so the sample pins its mean down with
    a small standard error. Unbiased for what K particles on every image would give. The standard
    error is the sample's; the whole-split ELBO's own Monte Carlo error, about
    sd(log w) / sqrt(N K'), is far smaller and left out."""
    all_x, _ = run.split(train=split == "train")
    index = images_to_evaluate(len(all_x), max_images, sample_seed)
    x = all_x[index.to(all_x.device)]
    started = time.perf_counter()
    iw = dataset_iw(x, run.encoder, run.decoder, num_particles, batch_size, particles_per_chunk)
    seconds = time.perf_counter() - started
    nll, nll_se = mean_and_standard_error(-iw["log_px"])
    elbo_k, elbo_k_se = mean_and_standard_error(iw["elbo"])
    result = {
        "split": split, "num_images": len(x), "num_particles": num_particles,
        "nll": nll, "nll_standard_error": nll_se,
        "elbo": dataset_elbo(x, run.encoder, run.decoder)["elbo"],  # one t per image, as train.py logs
        "elbo_k_samples": elbo_k, "elbo_k_samples_standard_error": elbo_k_se,
        "kl": iw["kl"].mean().item(), "seconds": seconds, "images_per_second": len(x) / seconds,
    }
    if sample_seed is not None and len(x) < len(all_x) and whole_split_particles:
        whole = dataset_iw(all_x, run.encoder, run.decoder, whole_split_particles, batch_size, particles_per_chunk)
        elbo_whole = whole["elbo"].double().mean().item()  # (1/N) sum_i ELBO(x_i), every image
        gap, gap_se = mean_and_standard_error(iw["log_px"] - iw["elbo"])  # log p_K(x) - ELBO, on the sample
        result.update({
            "whole_split_images": len(all_x), "whole_split_particles": whole_split_particles,
            "whole_split_elbo": elbo_whole, "whole_split_nll_with_whole_split_particles": -whole["log_px"].mean().item(),
            "whole_split_nll": -(elbo_whole + gap), "whole_split_nll_standard_error": gap_se,
            "gap_iw_minus_elbo": gap,
        })
        log.info(f"whole {split} split: NLL {result['whole_split_nll']:.2f} +- {gap_se:.2f} nats (ELBO "
                 f"{elbo_whole:.2f} over {len(all_x)} images + IW gap {gap:.2f} from the sample)")
    log_bin_width = run.decoder.likelihood.log_bin_width
    if log_bin_width is not None:  # 8-bit levels: the NLLs in bits/dim too
        bits_per_nat = 1 / (math.prod(run.image_shape) * math.log(2))
        result["bits_per_dim"] = bits_per_dim(-nll, run.image_shape, log_bin_width)
        result["bits_per_dim_standard_error"] = nll_se * bits_per_nat
        if "whole_split_nll" in result:
            result["whole_split_bits_per_dim"] = bits_per_dim(-result["whole_split_nll"], run.image_shape,
                                                              log_bin_width)
            result["whole_split_bits_per_dim_standard_error"] = result["whole_split_nll_standard_error"] * bits_per_nat
    np.savez(out_dir / "likelihood.npz", index=index.numpy(), **{key: value.cpu().numpy() for key, value in iw.items()})
    log.info(f"{split} NLL {nll:.2f} +- {nll_se:.2f} nats (K={num_particles}, {len(x)} images), "
             f"ELBO {result['elbo']:.2f}; {result['images_per_second']:.1f} images/s")
    return result
