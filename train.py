"""Train the VAE by stochastic variational inference: `python train.py estimator=reparam`.

Every step draws a minibatch x of B images out of N, and `pyro.infer.SVI` takes one optimizer
step on the loss -ELBO that the configured ELBO (Trace_ELBO by default) estimates from one
sample t ~ q(t|x) per image:

    ELBO = sum_i E_q[log p(x_i|t) + log p(t) - log q(t|x_i)]     (whole dataset, i = 1..N)
         ~ N/B * sum_{i in batch} [log p(x_i|t_i) + log p(t_i) - log q(t_i|x_i)]

The N/B comes from the plate in `model` and `guide`. The encoder's gradient is reparameterized
or score-function according to `estimator` (see guide.py). Everything is logged per image.
"""
from __future__ import annotations

import json
import logging
import math
import signal
import sys
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import hydra
import pyro
import pyro.poutine as poutine
import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from pyro.infer import (SVI, JitTrace_ELBO, JitTraceEnum_ELBO, JitTraceGraph_ELBO, JitTraceMeanField_ELBO,
                        TraceGraph_ELBO, TraceMeanField_ELBO)
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import save_image
from tqdm import tqdm

import checkpoint
from data import DataNotFoundError, bits_per_dim, epoch_batches, load_split, observe, observe_test_set
from elbo import dataset_elbo
from guide import guide
from model import LIKELIHOODS, check_image_shape, mean_image, model

log = logging.getLogger(__name__)
PRIOR_GRID_SEED = 0  # the same prior samples t are decoded every epoch


class ConfigError(ValueError):
    """A config value that training cannot use."""


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite."""


def check_config(cfg: DictConfig) -> None:
    """Stop before any work, naming the key and the value, when a setting cannot work."""
    positive_ints = ["model.latent_dim", "model.hidden_dim", "data.batch_size", "trainer.epochs",
                     "trainer.test_every", "estimator.elbo.num_particles"]
    for key in positive_ints:
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{key}={value!r}: must be a positive integer")
    channels = cfg.model.channels
    if not channels or any(not isinstance(c, int) or c <= 0 for c in channels):
        raise ConfigError(f"model.channels={list(channels)!r}: must be a non-empty list of positive integers")
    if cfg.model.likelihood not in LIKELIHOODS:
        raise ConfigError(f"model.likelihood={cfg.model.likelihood!r}: must be one of {LIKELIHOODS}")
    if not cfg.model.min_scale > 0:
        raise ConfigError(f"model.min_scale={cfg.model.min_scale!r}: must be > 0")
    subset = cfg.data.subset
    if subset is not None and (not isinstance(subset, int) or subset <= 0):
        raise ConfigError(f"data.subset={subset!r}: must be null or a positive integer")
    max_minutes = cfg.trainer.get("max_minutes")
    if max_minutes is not None and (isinstance(max_minutes, bool) or not isinstance(max_minutes, (int, float))
                                    or not max_minutes > 0):
        raise ConfigError(f"trainer.max_minutes={max_minutes!r}: must be null (no time budget) or > 0")
    lr = OmegaConf.select(cfg, "optim.optim_args.lr")
    if not isinstance(lr, (int, float)) or not lr > 0:
        raise ConfigError(f"optim.optim_args.lr={lr!r}: the learning rate must be > 0")
    check_estimator(cfg)
    device = str(cfg.device)
    if device != "auto" and not (device == "cpu" or device.startswith("cuda")):
        raise ConfigError(f"device={device!r}: must be auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r}: CUDA is not available on this machine; use device=cpu or auto")


def check_estimator(cfg: DictConfig) -> None:
    """The ELBO, the estimator and the baselines must fit together (else Pyro fails deep inside,
    or silently ignores the baseline)."""
    target = cfg.estimator.elbo._target_
    try:
        elbo_class = get_class(target)
    except Exception as error:
        raise ConfigError(f"estimator.elbo._target_={target}: cannot be imported ({error})") from error
    score = not cfg.estimator.reparameterized
    if score and issubclass(elbo_class, TraceMeanField_ELBO):
        raise ConfigError(f"estimator.elbo._target_={target} with estimator.reparameterized=false: an "
                          "analytic-KL ELBO needs a reparameterized guide; use estimator=reparam or a Trace ELBO")
    baseline_keys = [f"estimator.{key}" for key in ("baseline", "baseline_net") if cfg.estimator.get(key)]
    if baseline_keys and not (score and issubclass(elbo_class, TraceGraph_ELBO)):
        raise ConfigError(f"{' and '.join(baseline_keys)} with estimator.elbo._target_={target}, estimator."
                          f"reparameterized={cfg.estimator.reparameterized}: baselines need TraceGraph_ELBO and "
                          "a score-function guide (reparameterized=false)")
    jit_elbos = (JitTrace_ELBO, JitTraceGraph_ELBO, JitTraceMeanField_ELBO, JitTraceEnum_ELBO)
    if cfg.trainer.get("channels_last") and issubclass(elbo_class, jit_elbos):
        raise ConfigError(f"trainer.channels_last=true with estimator.elbo._target_={target}: Pyro's JIT trace "
                          "fails on channels-last weights (it takes them for constants); use one or the other")
    if OmegaConf.select(cfg, "estimator.baseline.use_decaying_avg_baseline") and not cfg.data.drop_last:
        raise ConfigError("estimator.baseline.use_decaying_avg_baseline=true with data.drop_last=false: the "
                          "average has the batch's shape, so every batch must be full (data.drop_last=true)")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class StopRequest:
    """Set by Ctrl-C, SIGTERM or SIGUSR2; the loop checks it after each step, saves and stops.

    SIGUSR2 is how submitit (the SLURM launcher) announces preemption or the time limit; its own
    handler requeues the job and exits at once, wherever the step is. Ours waits for the step to
    end and the checkpoint to be written, then hands the signal on (`hand_on`), so the requeued
    job continues from this step, not from the last epoch."""

    HANDED_ON = tuple(getattr(signal, name) for name in ("SIGUSR2",) if hasattr(signal, name))  # not on Windows

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def __call__(self, signum: int, frame: Any) -> None:
        self.signum, self.signal_name = signum, signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once

    def hand_on(self) -> None:
        """After the checkpoint: call the handler that was there before ours (submitit's requeue)."""
        handler = self.previous.get(self.signum)
        if self.signum in self.HANDED_ON and callable(handler):
            handler(self.signum, None)


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    request = StopRequest()
    request.previous = {sig: signal.signal(sig, request) for sig in (signal.SIGINT, signal.SIGTERM, *request.HANDED_ON)}
    try:
        yield request
    finally:
        for sig, handler in request.previous.items():
            signal.signal(sig, handler)


def resume_command(run_dir: Path) -> str:
    """The command line that continues the run in `run_dir`, with the run's own overrides."""
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
    kept = [o for o in overrides if not o.startswith("resume=")]
    return " ".join(["python train.py", *kept, f"resume={run_dir}"])


def checkpoint_to_resume(cfg: DictConfig, out_dir: Path) -> Path | None:
    """`resume=...` when given; else this run directory's own checkpoint, left by a
    preempted or requeued job; else none (a fresh start)."""
    if cfg.resume is not None:
        return checkpoint.checkpoint_path(cfg.resume)
    own = out_dir / checkpoint.CHECKPOINT_NAME
    return own if own.is_file() else None


def resume_position(saved: dict[str, Any], epochs: int) -> str:
    """Where a checkpoint continues, for the log: inside an epoch, at an epoch's start, or done."""
    if saved["batches"] is not None:
        return f"at epoch {saved['epoch']}, batch {saved['next_batch'] + 1} of {len(saved['batches'])}"
    if saved["epoch"] > epochs:
        return f"after epoch {saved['epoch'] - 1}: trainer.epochs={epochs} are done, nothing to train"
    return f"at the start of epoch {saved['epoch']}"


def build_networks(cfg: DictConfig, image_shape: tuple[int, ...], device: torch.device) -> tuple[nn.Module, nn.Module]:
    """The encoder and decoder of `cfg.model` on `device`, with the trainer's speed options:
    `trainer.channels_last` stores conv weights as NHWC, `trainer.bf16` runs their layers under
    bfloat16 autocast (outputs, log-densities and the ELBO stay float32), `trainer.compile`
    compiles each network's forward in place with torch.compile. None changes the parameters or
    their names, so a checkpoint made with one setting resumes with the other."""
    encoder = instantiate(cfg.model.encoder, image_shape=image_shape).to(device)
    decoder = instantiate(cfg.model.decoder, image_shape=image_shape).to(device)
    for network in (encoder, decoder):
        network.bf16 = bool(cfg.trainer.get("bf16"))
        if cfg.trainer.get("channels_last"):
            network.to(memory_format=torch.channels_last)
        if cfg.trainer.get("compile"):
            network.compile()
    return encoder, decoder


def build_svi(cfg: DictConfig, encoder: torch.nn.Module, decoder: torch.nn.Module, num_data: int) -> SVI:
    """SVI on the configured ELBO and optimizer, for `model` and `guide` over `num_data` images.

    A score-function estimator may add `estimator.baseline` (Pyro's baseline options for site
    "t") and `estimator.baseline_net` (a network b(x), built here and trained with the guide)."""
    baseline_net = None
    if cfg.estimator.get("baseline_net") is not None:
        baseline_net = instantiate(cfg.estimator.baseline_net, image_shape=decoder.image_shape)
        baseline_net = baseline_net.to(next(decoder.parameters()).device)
    baseline = cfg.estimator.get("baseline")
    return SVI(
        partial(model, decoder=decoder, num_data=num_data),
        partial(guide, encoder=encoder, num_data=num_data, reparameterized=cfg.estimator.reparameterized,
                baseline=OmegaConf.to_container(baseline) if baseline else None, baseline_net=baseline_net),
        instantiate(cfg.optim),
        loss=instantiate(cfg.estimator.elbo),
    )


def restore_params(param_store_state: dict, device: torch.device, *networks: tuple[str, torch.nn.Module]) -> None:
    """Load saved weights into the param store (on `device`) and into the networks."""
    params = {name: torch.nn.Parameter(value.detach().to(device)) for name, value in param_store_state["params"].items()}
    pyro.get_param_store().set_state({"params": params, "constraints": param_store_state["constraints"]})
    for name, network in networks:
        pyro.module(name, network, update_module_params=True)


@torch.no_grad()
def save_image_grids(out_dir: Path, epoch: int, encoder, decoder, x_shown: torch.Tensor, t_prior: torch.Tensor) -> None:
    """Reconstructions of fixed test images (originals above, E[x|t], t ~ q(t|x), below) and
    images decoded from fixed prior samples t ~ p(t)."""
    images_dir = out_dir / "images"
    images_dir.mkdir(exist_ok=True)
    index = torch.arange(len(x_shown), device=x_shown.device)
    t = poutine.trace(guide).get_trace(x_shown, index, encoder, len(x_shown)).nodes["t"]["value"]  # t ~ q(t|x)
    nrow = max(1, len(x_shown) // 2)
    save_image(torch.cat([x_shown, mean_image(decoder, t)]), images_dir / f"reconstructions_{epoch:03d}.png", nrow=nrow)
    save_image(mean_image(decoder, t_prior), images_dir / f"samples_{epoch:03d}.png", nrow=8)


def load_data(cfg: DictConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The training images (N, C, H, W) in [0, 1], and the test images as observed (binarized
    once, with a fixed seed, for the Bernoulli likelihood), both in memory on `device`."""
    train_images, _ = load_split(cfg.data, train=True)
    test_images, _ = load_split(cfg.data, train=False)
    try:
        check_image_shape(tuple(train_images.shape[1:]), cfg.model.channels)
    except ValueError as error:
        raise ConfigError(f"model.channels={list(cfg.model.channels)}: {error}") from error
    return train_images.to(device), observe_test_set(test_images, cfg.model.likelihood).to(device)


def svi_step(svi: SVI, x: torch.Tensor, index: torch.Tensor) -> float:
    """One SVI step on the minibatch `x` at positions `index`; returns the loss, -ELBO estimate.

    `svi.step` traces guide and model, backpropagates the loss, steps the optimizer of every
    parameter and then zeroes the gradients by writing zero tensors into `.grad`
    (pyro.infer.util.zero_grads), so the next backward pass would add its gradients into them.
    Setting `.grad` to None instead, as torch's `optimizer.zero_grad()` does by default, lets it
    write them directly: the same numbers, without an addition over every parameter (README, Speed).
    """
    loss = svi.step(x, index)  # -ELBO of the whole dataset, estimated on this batch
    for value in pyro.get_param_store().values():
        value.unconstrained().grad = None
    return loss


def svi_steps(svi: SVI, train_images: torch.Tensor, progress: dict[str, Any], cfg: DictConfig,
              stop: StopRequest, checkpoint_file: Path) -> None:
    """This epoch's SVI steps from batch `progress["next_batch"]` on, one per minibatch, adding
    each loss to `progress["loss_sum"]`; returns at the epoch's end, or after the step during
    which a stop was requested (`stop.signal_name`)."""
    batches, num_data = progress["batches"], len(train_images)
    likelihood, check_every_step = cfg.model.likelihood, cfg.trainer.check_every_step  # read once, not per step
    with tqdm(total=len(batches), initial=progress["next_batch"], desc=f"epoch {progress['epoch']}", unit="batch",
              disable=None, leave=False) as bar:
        while progress["next_batch"] < len(batches) and not stop.signal_name:
            index = batches[progress["next_batch"]].to(train_images.device)  # (B,)
            x = observe(train_images[index], likelihood)  # (B, C, H, W), binarized afresh
            # Pyro's and torch's argument and support checks: on every step, or on the epoch's first
            with pyro.validation_enabled(check_every_step or progress["next_batch"] == 0):
                loss = svi_step(svi, x, index)  # -ELBO of the whole dataset, estimated on this batch
            if not math.isfinite(loss):
                raise TrainingDiverged(
                    f"loss is {loss} at epoch {progress['epoch']}, step {progress['next_batch'] + 1} of "
                    f"{len(batches)}; the last good checkpoint {checkpoint_file} is kept. Try a lower learning "
                    f"rate (optim.optim_args.lr={cfg.optim.optim_args.lr} now) or optim=clipped_adam"
                )
            progress["loss_sum"] += loss
            progress["next_batch"] += 1
            bar.update()
            bar.set_postfix(loss_per_image=f"{loss / num_data:.2f}", refresh=False)


def record(metrics: dict[str, Any], out_dir: Path, writer: SummaryWriter) -> None:
    """One epoch's metrics: a line of metrics.jsonl, TensorBoard scalars, and the log."""
    with open(out_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(metrics) + "\n")
    for key, value in metrics.items():
        if key != "epoch" and value is not None:
            writer.add_scalar(key, value, metrics["epoch"])
    log.info(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))


def train(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """Train as configured, writing metrics, images and checkpoints to `out_dir`.

    Returns the last epoch's metrics (ELBOs in nats per image)."""
    check_config(cfg)
    out_dir = Path(out_dir)
    device = resolve_device(cfg.device)
    resume_from = checkpoint_to_resume(cfg, out_dir)
    saved = checkpoint.load(resume_from, cfg) if resume_from else None
    if resume_from:
        out_dir = resume_from.parent  # keep writing into the run being continued
        log.info(f"resuming {resume_from} {resume_position(saved, cfg.trainer.epochs)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_file = out_dir / checkpoint.CHECKPOINT_NAME

    # Data: the whole dataset in memory on the device, batched by index.
    pyro.set_rng_seed(cfg.seed)
    likelihood = cfg.model.likelihood
    train_images, x_test = load_data(cfg, device)
    image_shape, num_data = tuple(train_images.shape[1:]), len(train_images)

    # Model, guide and the SVI objective.
    encoder, decoder = build_networks(cfg, image_shape, device)
    pyro.clear_param_store()
    svi = build_svi(cfg, encoder, decoder, num_data)
    optimizer = svi.optim
    x_shown = x_test[: cfg.trainer.num_grid_images]
    t_prior = torch.randn(64, cfg.model.latent_dim, generator=torch.Generator().manual_seed(PRIOR_GRID_SEED)).to(device)

    progress = {"epoch": 1, "batches": None, "next_batch": 0, "loss_sum": 0.0, "epoch_seconds": 0.0, "wall_time": 0.0}
    if saved:
        restore_params(saved["param_store"], device, ("encoder", encoder), ("decoder", decoder))
        optimizer.set_state(saved["optimizer"])
        progress = {key: saved[key] for key in progress}
        checkpoint.set_rng_state(saved["rng"])

    def save_checkpoint() -> None:
        state = {
            "param_store": pyro.get_param_store().get_state(),
            "optimizer": optimizer.get_state(),
            "rng": checkpoint.rng_state(),
            "config": OmegaConf.to_container(cfg, resolve=True),
            **progress,
        }
        checkpoint.save(checkpoint_file, state)
        if cfg.trainer.get("keep_checkpoints") and progress["batches"] is None:  # an epoch's end: keep a copy
            checkpoint.save(checkpoint.epoch_checkpoint_path(out_dir, progress["epoch"] - 1), state)

    def evaluate(epoch: int) -> dict[str, float]:
        """The test ELBO and its parts (t sampled from q(t|x)), and this epoch's image grids."""
        started = time.perf_counter()
        test = dataset_elbo(x_test, encoder, decoder)
        result = {"test_elbo": test["elbo"], "test_recon": test["recon"], "test_kl": test["kl"]}
        if likelihood == "gaussian":
            result["test_bits_per_dim"] = bits_per_dim(test["elbo"], image_shape)
        save_image_grids(out_dir, epoch, encoder, decoder, x_shown, t_prior)
        result["test_seconds"] = time.perf_counter() - started
        return result

    writer = SummaryWriter(out_dir / "tensorboard", purge_step=progress["epoch"])
    metrics = last_metrics(out_dir) if saved else {}
    max_minutes = cfg.trainer.get("max_minutes")
    budget_seconds = 60.0 * max_minutes if max_minutes is not None else math.inf
    out_of_time = progress["wall_time"] >= budget_seconds  # a resumed run whose budget is spent
    with stop_on_signals() as stop, writer:
        if not saved:  # the untrained model, as the first point of every curve
            record({"epoch": 0, "train_elbo": None, **evaluate(0), "wall_time": 0.0}, out_dir, writer)
            save_checkpoint()
        while progress["epoch"] <= cfg.trainer.epochs and not out_of_time:
            epoch = progress["epoch"]
            if progress["batches"] is None:  # a new epoch: a fresh order of the images
                progress.update(batches=epoch_batches(num_data, cfg.data.batch_size, cfg.data.drop_last),
                                next_batch=0, loss_sum=0.0, epoch_seconds=0.0)
            started = time.perf_counter()
            svi_steps(svi, train_images, progress, cfg, stop, checkpoint_file)  # the rest of this epoch
            if stop.signal_name:  # stopped after a step: save it, then exit (or requeue)
                progress["epoch_seconds"] += time.perf_counter() - started
                save_checkpoint()
                log.warning(f"{stop.signal_name}: saved {checkpoint_file} at epoch {epoch}, "
                            f"batch {progress['next_batch']}. Continue with:\n  {resume_command(out_dir)}")
                stop.hand_on()  # submitit: requeue into this run directory, and exit
                return {**metrics, "interrupted": True, "run_dir": str(out_dir)}
            seconds = progress["epoch_seconds"] + time.perf_counter() - started
            metrics = {"epoch": epoch, "train_elbo": -progress["loss_sum"] / (len(progress["batches"]) * num_data),
                       "seconds": seconds}
            out_of_time = progress["wall_time"] + seconds >= budget_seconds
            if out_of_time:
                log.info(f"trainer.max_minutes={max_minutes}: the time budget is spent; epoch {epoch} is the last")
            if epoch % cfg.trainer.test_every == 0 or epoch == cfg.trainer.epochs or out_of_time:
                metrics.update(evaluate(epoch))
            else:
                metrics.update(test_elbo=None, test_recon=None, test_kl=None)
            progress["wall_time"] += time.perf_counter() - started + progress["epoch_seconds"]
            metrics["wall_time"] = progress["wall_time"]
            record(metrics, out_dir, writer)
            progress.update(epoch=epoch + 1, batches=None)
            save_checkpoint()
    return {**metrics, "run_dir": str(out_dir)}


def last_metrics(run_dir: Path) -> dict[str, Any]:
    """The last line of a run's metrics.jsonl (what a finished run returns when resumed)."""
    metrics_file = run_dir / "metrics.jsonl"
    lines = metrics_file.read_text().splitlines() if metrics_file.is_file() else []
    return json.loads(lines[-1]) if lines else {}


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Train, and return the final test ELBO (nats per image) for sweepers to optimize."""
    try:
        metrics = train(cfg, HydraConfig.get().runtime.output_dir)
    except (ConfigError, DataNotFoundError, checkpoint.CheckpointError, TrainingDiverged) as error:
        sys.exit(f"error: {error}")
    if metrics.get("interrupted"):
        sys.exit(130)
    return metrics.get("test_elbo")


if __name__ == "__main__":
    main()
