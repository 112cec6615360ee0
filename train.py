"""Train the VAE by stochastic variational inference: `python train.py estimator=reparam`.

Every step draws a minibatch x of B images out of N, and `pyro.infer.SVI` takes one optimizer
step on the loss -ELBO that the configured ELBO (Trace_ELBO by default) estimates from one
sample t ~ q(t|x) per image:

    ELBO = sum_i E_q[log p(x_i|t) + log p(t) - log q(t|x_i)]     (whole dataset, i = 1..N)
         ~ N/B * sum_{i in batch} [log p(x_i|t_i) + log p(t_i) - log q(t_i|x_i)]

The N/B comes from the plate in `model` and `guide`. The encoder's gradient is reparameterized
or score-function according to `estimator` (see guide.py). Everything is logged per image.
What the loop uses lives in vae/: building (build.py), checks (config.py), data (data.py),
checkpoints and the loop's state (checkpoint.py), signals (preemption.py), records (logbook.py).
"""
from __future__ import annotations

import logging
import math
import sys
import time
import uuid
from pathlib import Path
from collections.abc import Callable
from typing import Any

import hydra
import pyro
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from pyro.infer import SVI
from tqdm import tqdm

from guide import posterior
from vae import checkpoint, distributed
from vae.build import build_networks, build_svi, learning_rate, step_schedule, svi_step
from vae.checkpoint import RunState
from vae.config import ConfigError, check_config, register_resolvers, resolve_device, use_threads
from vae.data import DataNotFoundError, load_training_data, observe_test_set
from vae.distributed import ALONE, Ranks
from vae.elbo import dataset_elbo
from vae.logbook import Logbook, RunDirectoryBusy, record_failure
from vae.preemption import StopRequest, stop_on_signals
from vae.runs import resume_command

log = logging.getLogger(__name__)
PRIOR_GRID_SEED = 0  # the same prior samples t are decoded every epoch


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite."""


def train(cfg: DictConfig, out_dir: str | Path, ranks: Ranks = ALONE) -> dict[str, Any]:
    """Train as configured, writing metrics, images and checkpoints to `out_dir` (a resumed run
    goes on in its own directory). Returns the last epoch's metrics (ELBOs in nats per image).
    With `ranks` of several processes, this one trains on its share of every batch (vae/distributed.py)."""
    check_config(cfg)
    distributed.check(cfg, ranks)
    device = distributed.local_device(resolve_device(cfg.device), ranks)
    use_threads(cfg)
    resume_from = checkpoint.to_resume(cfg, Path(out_dir))
    out_dir = checkpoint.run_directory(resume_from, Path(out_dir))
    checkpoint_file = out_dir / checkpoint.CHECKPOINT_NAME
    with Logbook(out_dir, writes=ranks.writer) as logbook, stop_on_signals() as stop:  # the directory is ours
        saved = checkpoint.load(resume_from, cfg) if resume_from else None
        distributed.barrier(ranks)  # every rank has read the checkpoint before rank 0 writes one
        # Data: the whole dataset in memory on the device, batched by index.
        pyro.set_rng_seed(cfg.seed)
        train_images, test_images = load_training_data(cfg, device)
        image_shape, num_data = tuple(train_images.shape[1:]), len(train_images)

        # Model, guide and the SVI objective; a resumed run gets its weights, optimizer and RNG back.
        encoder, decoder = build_networks(cfg, image_shape, device, cfg.trainer)
        x_test = observe_test_set(test_images, decoder.likelihood).to(device)  # binarized / dequantized once
        pyro.clear_param_store()
        svi = build_svi(cfg, encoder, decoder, num_data)
        if ranks.parallel:  # the gradient of the global batch, summed over the ranks' shares
            svi.optim = distributed.GradientAveraging(svi.optim)
        distributed.seed_noise(cfg.seed, ranks)  # the same weights on every rank, each its own noise
        state = checkpoint.restore(saved, svi.optim, cfg, device, ranks, encoder=encoder, decoder=decoder) if saved else RunState()
        state.run_id = state.run_id or distributed.from_writer(uuid.uuid4().hex, ranks)  # this run's, from its start
        if saved:
            log.info(f"resuming {resume_from} {state.position(cfg.trainer.epochs)}")
        metrics = logbook.start(state.epoch if saved else 0, device, resume_from.parent if saved else None,
                                epoch=state.epoch, ranks=ranks.world_size, run_id=state.run_id,
                                batch=state.batch_in_epoch)  # where it begins
        x_shown = x_test[: cfg.trainer.num_grid_images]

        @torch.no_grad()
        def test(epoch: int) -> dict[str, float]:
            """The test ELBO and its parts (t sampled from q(t|x)), and this epoch's image grids."""
            started = time.perf_counter()
            result = {f"test_{key}": value for key, value in dataset_elbo(x_test, encoder, decoder).items()}
            _, t = posterior(x_shown, encoder)  # t ~ q(t|x)
            t_prior = decoder.prior.draw(64, torch.Generator().manual_seed(PRIOR_GRID_SEED)).to(device)  # t ~ p(t)
            logbook.images(epoch, reconstructions=(torch.cat([x_shown, decoder(t).mean]), max(1, len(x_shown) // 2)),
                           samples=(decoder(t_prior).mean, 8))
            result["test_seconds"] = time.perf_counter() - started
            return result

        def save() -> None:
            checkpoint.save(checkpoint_file, state, svi.optim, cfg, keep_copy=cfg.trainer.keep_checkpoints, ranks=ranks)

        max_minutes = cfg.trainer.max_minutes
        budget_seconds = 60.0 * max_minutes if max_minutes is not None else math.inf
        out_of_time = state.wall_time >= budget_seconds  # a resumed run whose budget is spent
        if not saved:  # the untrained model, as the first point of every curve
            if ranks.writer:
                logbook.record({"epoch": 0, "train_elbo": None, **test(0), "wall_time": 0.0})
            save()
        while state.epoch <= cfg.trainer.epochs and not out_of_time:
            epoch = state.epoch
            if state.batches is None:  # a new epoch: a fresh order of the images
                state.start_epoch(distributed.epoch_batches(num_data, cfg.data, ranks))
            started = time.perf_counter()
            if train_steps(svi, train_images, decoder.likelihood.observe, state, cfg, stop, checkpoint_file, ranks):  # the rest of this epoch
                # stopped after a step (every rank after the same one): save it, then exit (or requeue)
                state.epoch_seconds += time.perf_counter() - started
                save()
                log.warning(f"{stop.signal_name}: saved {checkpoint_file} at epoch {epoch}, "
                            f"batch {state.next_batch}. Continue with:\n  {resume_command(out_dir)}")
                stop.hand_on()  # submitit: requeue into this run directory, and exit
                return {**metrics, "interrupted": stop.signum, "run_dir": str(out_dir)}
            seconds = state.epoch_seconds + time.perf_counter() - started
            metrics = {"epoch": epoch, "train_elbo": -state.loss_sum / (len(state.batches) * num_data),
                       "seconds": seconds, "lr": learning_rate(svi.optim)}
            out_of_time = distributed.from_writer(state.wall_time + seconds >= budget_seconds, ranks)  # rank 0's clock
            if out_of_time:
                log.info(f"trainer.max_minutes={max_minutes}: the time budget is spent; epoch {epoch} is the last")
            if ranks.writer and (epoch % cfg.trainer.test_every == 0 or epoch == cfg.trainer.epochs or out_of_time):
                metrics.update(test(epoch))  # rank 0 tests and writes
            else:
                metrics.update(test_elbo=None, test_recon=None, test_kl=None)
            state.wall_time += time.perf_counter() - started + state.epoch_seconds
            metrics["wall_time"] = state.wall_time
            logbook.record(metrics)  # first the epoch's line, then the checkpoint that ends it
            state.end_epoch()
            step_schedule(svi.optim)  # schedule=...: the next epoch's learning rate
            save()
    return {**metrics, "run_dir": str(out_dir)}


def train_steps(svi: SVI, train_images: torch.Tensor, observe: Callable, state: RunState, cfg: DictConfig,
                stop: StopRequest, checkpoint_file: Path, ranks: Ranks = ALONE) -> bool:
    """This epoch's SVI steps from batch `state.next_batch` on, one per minibatch (this rank's
    share of it), adding each loss (of the whole minibatch) to `state.loss_sum`; returns False at
    the epoch's end, True after the step during which a stop was requested (on any rank)."""
    batches, num_data = state.batches, len(train_images)
    check_every_step = cfg.trainer.check_every_step  # read once, not per step
    warmup_steps = cfg.trainer.get("kl_warmup_epochs", 0) * len(batches)
    objective = {}  # the warm-up's kl_weight, for model and guide
    with tqdm(total=len(batches), initial=state.next_batch, desc=f"epoch {state.epoch}", unit="batch",
              disable=None, leave=False) as bar:
        stopping = False
        while state.next_batch < len(batches) and not stopping:
            index, weight = distributed.share(batches[state.next_batch], ranks)  # all B, or B_r of them
            index = index.to(train_images.device)  # (B,)
            if ranks.parallel:
                svi.optim.weight = weight  # B_r/B: the ranks' gradients add up to the batch's
            x = observe(train_images[index])  # (B, C, H, W), binarized (or dequantized) afresh
            # Pyro's and torch's argument and support checks: on every step, or on the epoch's first
            try:
                with pyro.validation_enabled(check_every_step or state.next_batch == 0):
                    if warmup_steps:  # beta = this step's number / warm-up steps, up to 1: -(recon - beta KL)
                        step = (state.epoch - 1) * len(batches) + state.next_batch + 1
                        objective["kl_weight"] = min(1.0, step / warmup_steps)
                    loss = svi_step(svi, x, index, **objective)  # -ELBO (or -objective) of the dataset, from this batch
            except ValueError as error:  # torch's check of a distribution's parameters: NaN outputs
                if "found invalid values" not in str(error):
                    raise
                loss = math.nan  # diverged, seen by the check before the loss
                if ranks.parallel:  # the other ranks wait for this one's gradients: end the job
                    raise TrainingDiverged(f"invalid values at epoch {state.epoch}, step {state.next_batch + 1} "
                                           f"on rank {ranks.rank}; the last good checkpoint {checkpoint_file} is kept")
            loss, stopping = distributed.agree(loss, weight, stop, ranks)  # the whole batch's; a stop on any rank: on all
            if not math.isfinite(loss):
                raise TrainingDiverged(
                    f"loss is {loss} at epoch {state.epoch}, step {state.next_batch + 1} of {len(batches)}; "
                    f"the last good checkpoint {checkpoint_file} is kept. Try a lower learning rate "
                    f"(optim.optim_args.lr={cfg.optim.optim_args.lr} now) or optim=clipped_adam"
                )
            state.loss_sum += loss
            state.next_batch += 1
            bar.update()
            bar.set_postfix(loss_per_image=f"{loss / num_data:.2f}", refresh=False)
    return stopping


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Train, and return the final test ELBO (nats per image) for sweepers to optimize.

    A run that fails for a known reason (a bad value, missing data, a checkpoint that does not
    fit, a busy directory, divergence) says why in one line. Alone, it exits with status 1; in a
    multirun it returns None, so that the other jobs go on (Optuna counts the trial as failed).
    failed.json in the job's directory keeps the reason of a divergence, and of any failed job of
    a sweep, whatever the error, for report.py."""
    hydra_cfg = HydraConfig.get()
    job_dir, multirun = Path(hydra_cfg.runtime.output_dir), hydra_cfg.mode == RunMode.MULTIRUN
    ranks, job_dir = distributed.join(resolve_device(cfg.device), job_dir)  # torchrun, SLURM tasks: rank 0's directory
    try:  # a resumed run goes on with its own config, changed only where this command line says
        metrics = train(checkpoint.resumed_config(cfg, list(hydra_cfg.overrides.task), job_dir), job_dir, ranks)
    except (ConfigError, DataNotFoundError, checkpoint.CheckpointError, TrainingDiverged, RunDirectoryBusy) as error:
        distributed.leave(ranks)
        if isinstance(error, TrainingDiverged) or (multirun and not isinstance(error, RunDirectoryBusy)):
            record_failure(job_dir, error)  # the run's own failure (not a refused resume of another run)
        if multirun:
            log.error(f"error: {error} (job {job_dir}; the sweep goes on)")
            return None
        sys.exit(f"error: {error}")
    except Exception as error:  # an error the checks did not foresee: in a sweep, recorded like the others
        if ranks.parallel and distributed.lost_peer(error):  # another rank died: this one cannot go on
            if multirun:
                record_failure(job_dir, error)
            sys.exit(f"error: rank {ranks.rank}: another rank of this job is gone ({str(error).splitlines()[0][:120]}); "
                     f"the last checkpoint {job_dir / checkpoint.CHECKPOINT_NAME} is kept. Continue with: "
                     f"{resume_command(job_dir)}")
        if not multirun:
            raise  # alone, the traceback says where
        distributed.leave(ranks)
        record_failure(job_dir, error)
        log.exception(f"error: {type(error).__name__}: {error} (job {job_dir}; the sweep goes on)")
        return None
    distributed.leave(ranks)
    if metrics.get("interrupted"):
        sys.exit(128 + metrics["interrupted"])  # the shell's code for a process ended by that signal
    return metrics.get("test_elbo")


if __name__ == "__main__":
    register_resolvers()  # conf/config.yaml's hydra.run.dir
    main()
