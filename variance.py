"""How noisy is each gradient estimator of the ELBO? `python variance.py run=<run dir> samples=200`.

On one fixed minibatch x of B training images, each estimator in `estimators` (an option of the
`estimator` config group) draws S independent estimates g_1..g_S of the gradient that one
training step would take, grad(-ELBO) / N (per image), and for the encoder (q(t|x)) and the
decoder (p(x|t)) parameters apart reports, over their coordinates j,

    variance = mean_j Var_s[g_sj]                      mean per-coordinate variance
    snr      = mean_j |mean_s g_sj| / std_s g_sj       signal-to-noise ratio
    ratio    = variance / variance of reparam          (when reparam is measured)

Baselines are fitted first (`baseline_warmup_steps` steps on random training minibatches, the
networks frozen; the decaying average is then frozen too), so each estimator is measured as it
would act in training. The networks come from a run's checkpoint, from each kept
checkpoint_epoch_NNN.pt of the run (trainer.keep_checkpoints=true; then variance.png plots
variance against epoch), or, with run=null, from a fresh initialization of this config.
Writes variance.json (and variance.png) into the Hydra run directory.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from copy import deepcopy
from pathlib import Path
from typing import Any

import hydra
import pyro
import torch
from hydra.core.hydra_config import HydraConfig
from matplotlib.figure import Figure
from omegaconf import DictConfig, open_dict
from torch import Tensor, nn

from vae import checkpoint
from vae.build import build_networks, build_svi
from vae.config import ConfigError, check_config, register_resolvers, resolve_device, use_threads
from vae.data import DataNotFoundError, load_split, observe_test_set
from vae.provenance import record_provenance
from vae.runs import RunError, load_run

log = logging.getLogger(__name__)
NETWORKS = ("encoder", "decoder")


def gradient_moments(draw: Any, samples: int) -> tuple[Tensor, Tensor]:
    """Per-coordinate mean and unbiased variance of `samples` draws of the vector `draw()`."""
    total = total_sq = None
    for _ in range(samples):
        g = draw().double()  # (D,)
        total = g.clone() if total is None else total + g
        total_sq = g**2 if total_sq is None else total_sq + g**2
    mean = total / samples
    variance = ((total_sq - samples * mean**2) / (samples - 1)).clamp(min=0)
    return mean, variance


def summarize(mean: Tensor, variance: Tensor) -> dict[str, float]:
    """Mean per-coordinate variance and SNR |mean| / std (over coordinates that vary)."""
    varies = variance > 0
    snr = mean[varies].abs() / variance[varies].sqrt()
    return {"variance": variance.mean().item(), "snr": snr.mean().item() if varies.any() else float("nan")}


def estimator_moments(cfg: DictConfig, encoder: nn.Module, decoder: nn.Module, x_train: Tensor,
                      batch_size: int, samples: int, warmup_steps: int) -> dict[str, tuple[Tensor, Tensor]]:
    """{"encoder"/"decoder": per-coordinate (mean, variance)} of `samples` estimates of
    grad(-ELBO) / N by `cfg.estimator`, on the fixed minibatch x_train[:batch_size]."""
    num_data = len(x_train)
    svi = build_svi(cfg, encoder, decoder, num_data)
    if cfg.estimator.get("baseline") or cfg.estimator.get("baseline_net"):  # fit the baseline, networks frozen
        for _ in range(warmup_steps):
            index = torch.randint(num_data, (batch_size,), device=x_train.device)
            svi.loss_and_grads(svi.model, svi.guide, x_train[index], index)
            store = pyro.get_param_store()
            svi.optim([value for name, value in store.named_parameters() if name.startswith("baseline$$$")])
            for value in store.values():
                value.grad = None
    frozen = {name: value.detach().clone() for name, value in pyro.get_param_store().items()
              if name.startswith("__baseline_avg")}  # the decaying average, as it stands after warm-up
    index = torch.arange(batch_size, device=x_train.device)
    x = x_train[index]  # the fixed minibatch (B, C, H, W)
    networks = {"encoder": encoder, "decoder": decoder}
    sizes = [sum(p.numel() for p in networks[name].parameters()) for name in NETWORKS]

    def draw() -> Tensor:
        """One estimate of grad(-ELBO) / N, encoder then decoder coordinates."""
        for network in networks.values():
            network.zero_grad(set_to_none=False)
        svi.loss_and_grads(svi.model, svi.guide, x, index)
        for name, value in frozen.items():
            pyro.get_param_store()[name] = value
        grads = [p.grad.flatten() for name in NETWORKS for p in networks[name].parameters()]
        return torch.cat(grads) / num_data

    mean, variance = gradient_moments(draw, samples)
    return {name: (m, v) for name, m, v in zip(NETWORKS, mean.split(sizes), variance.split(sizes))}


def measure(cfg: DictConfig, encoder: nn.Module, decoder: nn.Module, x_train: Tensor,
            estimators: dict[str, DictConfig]) -> dict[str, dict[str, Any]]:
    """Variance and SNR of each named estimator config (see the module docstring), all from the same weights."""
    if cfg.batch_size > len(x_train):
        raise ConfigError(f"batch_size={cfg.batch_size}: larger than the {len(x_train)} training images")
    weights = {name: deepcopy(network.state_dict()) for name, network in zip(NETWORKS, (encoder, decoder))}
    results = {}
    for name, estimator_cfg in estimators.items():
        pyro.clear_param_store()  # baselines start afresh; the networks from the same weights
        encoder.load_state_dict(weights["encoder"])
        decoder.load_state_dict(weights["decoder"])
        pyro.set_rng_seed(cfg.seed)
        run_cfg = deepcopy(cfg)
        with open_dict(run_cfg):
            run_cfg.estimator = estimator_cfg
            run_cfg.data.drop_last = True  # the fixed minibatch is always full
        check_config(run_cfg)
        started = time.perf_counter()
        moments = estimator_moments(run_cfg, encoder.train(), decoder.train(), x_train, cfg.batch_size,
                                    cfg.samples, cfg.baseline_warmup_steps)
        results[name] = {net: summarize(*moments[net]) for net in NETWORKS}
        results[name]["particles"] = estimator_cfg.elbo.num_particles  # decoder passes per estimate
        results[name]["seconds"] = time.perf_counter() - started
        log.info(f"{name}: " + "  ".join(f"{net} variance={results[name][net]['variance']:.3g} "
                                         f"snr={results[name][net]['snr']:.3g}" for net in NETWORKS))
    if "reparam" in results:
        for result in results.values():
            for net in NETWORKS:
                result[net]["ratio_to_reparam"] = result[net]["variance"] / results["reparam"][net]["variance"]
    return results


def checkpoints_of(run: str, all_epochs: bool) -> list[Path]:
    """The per-epoch copies of a run when asked for and kept, else its one checkpoint."""
    kept = checkpoint.epoch_checkpoints(Path(run)) if all_epochs and Path(run).is_dir() else []
    return kept or [checkpoint.checkpoint_path(run)]


def plot(points: list[dict[str, Any]], path: Path) -> None:
    """Variance against epoch on a log scale, one line per estimator, encoder and decoder apart."""
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2, sharex=True)
    for ax, net in zip(axes, NETWORKS):
        for name in points[0]["estimators"]:
            ax.plot([p["epoch"] for p in points], [p["estimators"][name][net]["variance"] for p in points],
                    marker="o", label=name)
        ax.set(yscale="log", xlabel="epoch", ylabel="mean per-coordinate variance", title=f"{net} gradient")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def variance(cfg: DictConfig, estimators: dict[str, DictConfig], out_dir: Path) -> list[dict[str, Any]]:
    """Measure every estimator at every checkpoint (or at a fresh init); write JSON and a plot."""
    if not isinstance(cfg.samples, int) or cfg.samples < 2:
        raise ConfigError(f"samples={cfg.samples!r}: must be an integer >= 2")
    if not isinstance(cfg.batch_size, int) or cfg.batch_size < 1:
        raise ConfigError(f"batch_size={cfg.batch_size!r}: must be a positive integer")
    use_threads(cfg)
    record_provenance(out_dir, resolve_device(cfg.device), run=cfg.run)
    points = []
    if cfg.run is None:  # a fresh initialization of this config
        check_config(cfg)
        pyro.set_rng_seed(cfg.seed)
        device = resolve_device(cfg.device)
        images, _ = load_split(cfg.data, train=True)
        encoder, decoder = build_networks(cfg, tuple(images.shape[1:]), device, cfg.trainer)
        x_train = observe_test_set(images, decoder.likelihood).to(device)  # observed once, fixed seed
        points.append({"epoch": 0, "checkpoint": None,
                       "estimators": measure(cfg, encoder, decoder, x_train, estimators)})
    for path in checkpoints_of(cfg.run, cfg.all_epochs) if cfg.run is not None else []:
        run = load_run(path, device=cfg.device, data_root=cfg.data.root)
        x_train, _ = run.split(train=True)  # observed once, fixed seed
        run_cfg = deepcopy(run.cfg)
        with open_dict(run_cfg):  # the run's model and data; this tool's settings
            for key in ("seed", "device", "run", "samples", "batch_size", "baseline_warmup_steps"):
                run_cfg[key] = cfg[key]
        points.append({"epoch": run.state.epochs_done(), "checkpoint": str(path),
                       "estimators": measure(run_cfg, run.encoder, run.decoder, x_train, estimators)})
    (out_dir / "variance.json").write_text(json.dumps(points, indent=2) + "\n")
    if len(points) > 1:
        plot(points, out_dir / "variance.png")
    return points


@hydra.main(version_base="1.3", config_path="conf", config_name="variance")
def main(cfg: DictConfig) -> None:
    """Compose each named estimator option and measure them all."""
    try:
        estimators = {name: hydra.compose("config", overrides=[f"estimator={name}"]).estimator
                      for name in cfg.estimators}
        variance(cfg, estimators, Path(HydraConfig.get().runtime.output_dir))
    except (ConfigError, DataNotFoundError, RunError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    register_resolvers()  # conf/config.yaml's hydra.run.dir
    main()
