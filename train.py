"""Train the VAE by stochastic variational inference: `python train.py estimator=reparam`.

Every step draws a minibatch x of B images out of N, and `pyro.infer.SVI` takes one optimizer
step on the loss -ELBO that the configured ELBO (Trace_ELBO by default) estimates from one
sample t ~ q(t|x) per image:

    ELBO = sum_i E_q[log p(x_i|t) + log p(t) - log q(t|x_i)]     (whole dataset, i = 1..N)
         ~ N/B * sum_{i in batch} [log p(x_i|t_i) + log p(t_i) - log q(t_i|x_i)]

The N/B comes from the plate in `model` and `guide`. The encoder's gradient is reparameterized
or score-function according to `estimator` (see guide.py). Everything is logged per image.
What the loop uses lives in vae/: building (build.py), checks (config.py), data (data.py), and
the run around the loop (runner.py: checkpoints and resume, signals, the time budget, divergence,
records, and this process's share of a data-parallel job).
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import pyro
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from guide import posterior
from vae import checkpoint, distributed
from vae.build import build_networks, build_svi
from vae.config import ConfigError, check_config, register_resolvers, resolve_device
from vae.data import DataNotFoundError, load_training_data, observe_test_set
from vae.elbo import dataset_elbo
from vae.logbook import RunDirectoryBusy, record_failure
from vae.runner import Runner, TrainingDiverged
from vae.runs import RunError, fork_point, resume_command

log = logging.getLogger(__name__)
PRIOR_GRID_SEED = 0  # the same prior samples t are decoded every epoch


def train(cfg: DictConfig, out_dir: str | Path, place: distributed.Ranks = distributed.ALONE) -> dict[str, Any]:
    """Train as configured, writing metrics, images and checkpoints to `out_dir` (a resumed run
    goes on in its own directory). Returns the last epoch's metrics (ELBOs in nats per image).
    `place`: this process's in a data-parallel job, which the Runner takes care of (vae/runner.py)."""
    check_config(cfg)
    with Runner(cfg, out_dir, place) as run:  # its directory, checkpoint, signals, budget, data-parallel share
        # Data: the whole dataset in memory on the device, batched by index.
        pyro.set_rng_seed(cfg.seed)
        train_images, test_images = load_training_data(cfg, run.device)
        image_shape, num_data = tuple(train_images.shape[1:]), len(train_images)

        # Model, guide and the SVI objective; a resumed run gets its weights, optimizer and RNG back.
        encoder, decoder = build_networks(cfg, image_shape, run.device, cfg.trainer)
        x_test = observe_test_set(test_images, decoder.likelihood).to(run.device)  # binarized / dequantized once
        x_shown = x_test[: cfg.trainer.num_grid_images]
        pyro.clear_param_store()
        run.start(build_svi(cfg, encoder, decoder, num_data), num_data, encoder=encoder, decoder=decoder)

        @torch.no_grad()
        def test(epoch: int) -> dict[str, float]:
            """The test ELBO and its parts (t sampled from q(t|x)), and this epoch's image grids."""
            started = time.perf_counter()
            result = {f"test_{key}": value for key, value in dataset_elbo(x_test, encoder, decoder).items()}
            _, t = posterior(x_shown, encoder)  # t ~ q(t|x)
            t_prior = decoder.prior.draw(64, torch.Generator().manual_seed(PRIOR_GRID_SEED)).to(run.device)  # t ~ p(t)
            run.logbook.images(epoch, reconstructions=(torch.cat([x_shown, decoder(t).mean]), max(1, len(x_shown) // 2)),
                               samples=(decoder(t_prior).mean, 8))
            result["test_seconds"] = time.perf_counter() - started
            return result

        for epoch in run.epochs(test):  # from where the run stands; the untrained model tested first
            for index in run.minibatches():  # a fresh order each epoch; this process's share of each batch
                x = decoder.likelihood.observe(train_images[index])  # (B, C, H, W), binarized (or dequantized) afresh
                run.step(x, index)  # svi.step: -ELBO of the dataset, estimated on this batch
            run.end_epoch(test)  # the epoch's metrics, the test when due, the checkpoint
    return run.result


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
    try:
        with distributed.job(resolve_device(cfg.device), job_dir) as (place, job_dir):  # torchrun, SLURM tasks: the job's directory
            # a resumed run goes on with its own config, changed only where this command line says
            metrics = train(checkpoint.resumed_config(cfg, list(hydra_cfg.overrides.task), job_dir), job_dir, place)
    except distributed.LostPeer as error:  # the job cannot go on: its last checkpoint can
        if multirun:
            record_failure(job_dir, error)
        sys.exit(f"error: {error}; the last checkpoint {job_dir / checkpoint.CHECKPOINT_NAME} is kept. "
                 f"Continue with: {resume_command(job_dir)}")
    except (ConfigError, DataNotFoundError, checkpoint.CheckpointError, TrainingDiverged, RunDirectoryBusy) as error:
        if isinstance(error, TrainingDiverged) or (multirun and not isinstance(error, RunDirectoryBusy)):
            record_failure(job_dir, error)  # the run's own failure (not a refused resume of another run)
        if multirun:
            log.error(f"error: {error} (job {job_dir}; the sweep goes on)")
            return None
        sys.exit(f"error: {error}")
    except Exception as error:  # an error the checks did not foresee: in a sweep, recorded like the others
        if not multirun:
            raise  # alone, the traceback says where
        record_failure(job_dir, error)
        log.exception(f"error: {type(error).__name__}: {error} (job {job_dir}; the sweep goes on)")
        return None
    if metrics.get("interrupted"):
        sys.exit(128 + metrics["interrupted"])  # the shell's code for a process ended by that signal
    return metrics.get("test_elbo")


def fork_point_or_exit(source: str, minutes: float, fork: str) -> str:
    """`${fork_point:<run>,<minutes>,<fork dir>}` in a recipe: the checkpoint to go on from (vae/runs.py), or one line."""
    try:
        return fork_point(source, minutes, fork)
    except RunError as error:
        sys.exit(f"error: {error}")  # a SystemExit passes through OmegaConf and Hydra as it is


if __name__ == "__main__":
    register_resolvers()  # conf/config.yaml's hydra.run.dir
    OmegaConf.register_new_resolver("fork_point", fork_point_or_exit)  # a recipe that forks a run
    main()
