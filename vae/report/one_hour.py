"""One hour of training against the published NLLs (`experiment=one_hour/`) and the one-hour runs over
seeds of the likelihoods of gray levels (`one_hour_gaussian/`, `one_hour_gaussian_loc/`, `one_hour_logistic_mixture/`).
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from omegaconf import OmegaConf

from vae.report.common import (Outputs, bold_nll, copy_figure, last_tested, minutes, provenance_line, read_json,
                               read_jsonl, sweep_progress, table, trained_jobs)
from vae.sweeps import nats, read_failures


def likelihood_numbers(out: Outputs, name: str = "one_hour", train_command: str | None = None,
                       ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(the training metrics of `python train.py experiment=NAME` (or of `train_command`), the metrics
    of its NAME_likelihood)."""
    training_metrics = read_jsonl(out.run(name) / "metrics.jsonl", train_command or f"python train.py experiment={name}/train")
    nll = read_json(out.run(f"{name}_likelihood") / "metrics.json", f"python evaluate.py experiment={name}/likelihood")
    return training_metrics, nll


# Published test NLLs on dynamically binarized MNIST (nats, K=5000), Burda et al. 2016, Table 1.
ANCHORS = [("VAE, one stochastic layer (Burda et al. 2016)", 86.76),
           ("IWAE, one stochastic layer, k=50 (Burda et al. 2016)", 84.78),
           ("IWAE, two stochastic layers, k=50 (Burda et al. 2016)", 82.90)]


def likelihood(out: Outputs, name: str = "one_hour") -> str:
    """The test set's NLL of the run of `experiment=NAME`: the ELBO it ended with, the direct IW bound on
    every image and the whole-split estimator (every image's ELBO + the IW gap on a random sample)."""
    training_metrics, nll = likelihood_numbers(out, name)
    last = last_tested(training_metrics)
    k, images = nll["whole_split_particles"], nll["whole_split_images"]
    rows = [[f"ELBO after epoch {last['epoch']} ({minutes(last['wall_time'])} of training), one t per image",
             nats(last["test_elbo"])],
            [f"ELBO, K={k} particles per image", nats(nll["whole_split_elbo"])],
            [f"**NLL, IW bound with K={k} on every image**", f"**{nats(nll['whole_split_nll_with_whole_split_particles'])}**"],
            [f"**NLL, IW bound with K={nll['num_particles']}**: every image's ELBO + the IW gap on "
             f"{nll['num_images']:,} random images", bold_nll(nll)],
            [f"NLL, K={nll['num_particles']}, on the {nll['num_images']:,} random images alone",
             f"{nats(nll['nll'])} ± {nll['nll_standard_error']:.2f}"]]
    rows += [[anchor, f"{value:.2f}"] for anchor, value in ANCHORS]
    return (table([f"test set, {images:,} images, nats per image", "value"], rows) + "\n\n"
            + provenance_line(out, out.run(name), out.run(f"{name}_likelihood")))


def likelihood_short(out: Outputs) -> str:
    training_metrics, nll = likelihood_numbers(out)
    last = training_metrics[-1]
    rows = [[f"this model, {minutes(last['wall_time'])} of training ({last['epoch']} epochs)",
             bold_nll(nll)]]
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



PIXEL_STUDIES = ("one_hour_gaussian", "one_hour_gaussian_loc", "one_hour_logistic_mixture")


def model_label(config: dict[str, Any]) -> str:
    """A one-hour run's model in words: "5 discretized logistics", "Gaussian, beta 0.25, `both`"."""
    likelihood, trainer = config["likelihood"], config["trainer"]
    if "components" in likelihood:
        return f"{likelihood['components']} discretized logistics"
    name = likelihood["_target_"].rsplit(".", 1)[-1].replace("LogitGaussian", "logit-Gaussian")
    beta = trainer.get("nll_beta", 0)
    return f"{name}, beta {beta}, `{trainer.get('nll_beta_target', 'both')}`" if beta else f"{name}, the ELBO"


def pixel_costs(out: Outputs) -> str:
    """Seed 0 of each one-hour likelihood of gray levels: its bits/dim at t_loc(x) and the background's
    (recipe <study>/pixels), against the ELBO's reconstruction term after its last epoch (test bits/dim
    minus the KL in bits/dim): the difference is what a draw t ~ q(t|x) costs over t_loc."""
    rows, directories = [], []
    for study in PIXEL_STUDIES:
        run = out.sweep(study) / "0"
        pixels = read_json(out.run(f"{study}_pixels") / "metrics.json", f"python evaluate.py experiment={study}/pixels")
        tested = [m for m in read_jsonl(run / "metrics.jsonl", f"python train.py -m experiment={study}/train")
                  if m.get("test_bits_per_dim") is not None]
        config = OmegaConf.to_container(OmegaConf.load(run / ".hydra" / "config.yaml"))
        bits, kl_bits = tested[-1]["test_bits_per_dim"], tested[-1]["test_kl"] / (pixels["dims_per_image"] * math.log(2))
        recon = bits - kl_bits
        background = pixels["groups"]["background"]
        floor = f", {background['at_floor']:.0%}" if "at_floor" in background else ""
        rows.append([model_label(config), f"{pixels['bits_per_dim']:.3f}",
                     f"{background['bits_per_pixel']:.2f}{floor}" if floor else "",
                     f"{bits:.3f} - {kl_bits:.3f} = {recon:.3f}", f"{recon - pixels['bits_per_dim']:.2f}"])
        directories += [run, out.run(f"{study}_pixels")]
    head = ["one-hour model", "bits/dim at t_loc(x)", "background: bits per pixel, at the floor",
            "ELBO's reconstruction (bits/dim): test bits/dim minus KL", "cost of a draw t ~ q over t_loc"]
    return table(head, rows) + "\n\n" + provenance_line(out, *directories)

BLOCKS: dict[str, Callable[[Outputs], str]] = {
    "pixel_costs": pixel_costs,
    "likelihood": likelihood,
    "likelihood_short": likelihood_short,
    "one_hour_logistic_mixture": one_hour_seeds,
    "one_hour_gaussian": lambda out: one_hour_seeds(out, "one_hour_gaussian"),
    "one_hour_gaussian_loc": lambda out: one_hour_seeds(out, "one_hour_gaussian_loc"),
}
