"""Evaluate a trained run: `python evaluate.py run=<run dir> task=<task>`.

    task=likelihood  test NLL by the importance-weighted bound, with its standard error
    task=generate    prior samples, reconstructions, interpolations, traversals, 2-d manifold
    task=represent   latent means per split to .npz, linear-probe accuracy, 2-d scatter
    task=anomaly     AUROC / AUPRC of likelihood-based scores, held-out class and OOD sets
    task=impute      imputation of masked pixels against baselines
    task=pixels      where the likelihood spends its bits: background, edge and ink pixels

Each task is a function `task(run, out_dir, **options)` in tasks/<task>.py, named by `_target_` in
tasks/conf/task/<task>.yaml; it returns its numbers, which are written to metrics.json in the evaluation's
own Hydra directory (outputs/evaluate/<date>/<time>-<task>/) beside its figures, its arrays and
provenance.jsonl.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import pyro
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vae.config import ConfigError, check_evaluation, use_threads
from vae.data import DataNotFoundError
from vae.provenance import record_provenance
from vae.runs import RunError, load_run
from vae.sweeps import SweepNotRun, sweep_jobs

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """Load the run `cfg.run`, run `cfg.task` on it, write and return its metrics."""
    if cfg.run is None:
        raise RunError("no run given: add run=<a training run directory>, e.g. run=outputs/2026-11-21/17-30-00")
    check_evaluation(cfg)
    use_threads(cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = load_run(cfg.run, cfg.device, cfg.data_root)
    record_provenance(out_dir, run.device, run=str(run.run_dir), task=cfg.task._target_)
    trained = {"epochs_trained": run.state.epochs_done()}  # epochs behind the weights, fractional mid-epoch
    if run.state.batches is not None:  # saved by a signal inside an epoch
        trained.update(epoch=run.state.epoch, batch=run.state.next_batch)
        log.warning(f"{run.run_dir}: its checkpoint was saved inside epoch {run.state.epoch}, after batch "
                    f"{run.state.next_batch} of {len(run.state.batches)}: these weights have trained "
                    f"{run.state.epochs_done():.2f} epochs")
    pyro.set_rng_seed(cfg.seed)
    task = instantiate(cfg.task)  # the task function with its options bound
    metrics = {"run": str(run.run_dir), **trained, **task(run, out_dir)}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log.info(f"wrote {out_dir / 'metrics.json'}")
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        evaluate(cfg, HydraConfig.get().runtime.output_dir)
    except (RunError, DataNotFoundError, ConfigError) as error:
        sys.exit(f"error: {error}")


def jobs_of(sweep: str) -> str:
    """`${sweep_jobs:<training sweep dir>}` in an evaluation recipe: its jobs (vae/sweeps.py), or one line."""
    try:
        return sweep_jobs(sweep)
    except SweepNotRun as error:
        sys.exit(f"error: {error}")  # a SystemExit passes through OmegaConf and Hydra as it is


if __name__ == "__main__":
    OmegaConf.register_new_resolver("sweep_jobs", jobs_of)  # an evaluation recipe's runs: a training sweep's jobs
    main()
