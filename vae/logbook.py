"""What a training run writes as it goes: metrics.jsonl, TensorBoard, image grids and the log.

    metrics.jsonl                one JSON object per epoch (epoch 0 is the untrained model)
    tensorboard/                 the same numbers as scalars, and the image grids as images
    images/reconstructions_NNN   fixed test images x (top rows) and E[x|t], t ~ q(t|x) (bottom rows)
    images/samples_NNN           E[x|t] for fixed prior samples t ~ p(t)
    provenance.jsonl             commit, date, versions and machine of every process that trained here
    failed.json                  why the run stopped with an error (removed when it is run again)
    train.lock                   held while a process trains here (a second one is refused)

metrics.jsonl always agrees with the checkpoint: the line of an epoch is written before the
checkpoint that ends it, and a resumed run first drops every line from the epoch it resumes at on
(a line written just before a crash, or a truncated last line), so each epoch appears once.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid, save_image

from vae.provenance import record_provenance

log = logging.getLogger(__name__)
METRICS_NAME = "metrics.jsonl"
FAILED_NAME = "failed.json"
LOCK_NAME = "train.lock"


class RunDirectoryBusy(RuntimeError):
    """Another process is training in the same run directory."""


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every epoch's metrics of a run, in order; a last line cut short by a crash is left out."""
    metrics_file = Path(run_dir) / METRICS_NAME
    metrics = []
    for line in metrics_file.read_text().splitlines() if metrics_file.is_file() else []:
        try:
            metrics.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning(f"{metrics_file}: a line cut short ({line[:40]}...) is left out")
    return metrics


def last_metrics(run_dir: Path) -> dict[str, Any]:
    """The last epoch's metrics of a run (what a finished run returns when resumed)."""
    metrics = read_metrics(run_dir)
    return metrics[-1] if metrics else {}


class Logbook:
    """One run directory, opened for training: holds its lock from `with` to the end, and writes its
    records. `start` is called once the epoch to begin with is known. With `writes=False` (the
    ranks > 0 of a data-parallel run) it reads the kept metrics and writes nothing."""

    def __init__(self, out_dir: Path, writes: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.writes = writes
        self.writer: SummaryWriter | None = None
        self.lock_file = None
        self.untrained_elbo: float | None = None  # epoch 0's test ELBO, to tell a finite divergence

    def __enter__(self) -> Logbook:
        if not self.writes:
            return self
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.lock_file = open(self.out_dir / LOCK_NAME, "a+")
        try:
            fcntl.flock(self.lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when this process ends
        except BlockingIOError:
            self.lock_file.seek(0)
            holder = self.lock_file.read().strip() or "unknown"
            self.lock_file.close()
            raise RunDirectoryBusy(f"{self.out_dir} is in use by another training (process {holder}, {LOCK_NAME}); "
                                   "wait for it to end or stop it, or give another run directory") from None
        self.lock_file.truncate(0)
        self.lock_file.write(f"{os.getpid()}\n")
        self.lock_file.flush()
        clear_failure(self.out_dir)  # it is being run again
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.lock_file is not None:
            self.lock_file.close()  # releases the lock

    def start(self, keep_before: int, device: torch.device, source: Path | None = None, **provenance: Any) -> dict[str, Any]:
        """Begin writing at epoch `keep_before`: keep the metrics of the epochs before it (from
        `source`, the run a checkpoint came from, when that is another directory) and drop any later
        line, open TensorBoard (dropping its records from that epoch on), and add this process to
        provenance.jsonl. Returns the last kept epoch's metrics."""
        kept = [m for m in read_metrics(source or self.out_dir) if m["epoch"] < keep_before]
        if not self.writes:
            return kept[-1] if kept else {}
        metrics_file = self.out_dir / METRICS_NAME
        if kept or metrics_file.exists():
            temporary = metrics_file.with_name(METRICS_NAME + ".tmp")
            temporary.write_text("".join(json.dumps(m) + "\n" for m in kept))
            os.replace(temporary, metrics_file)
        self.untrained_elbo = next((m["test_elbo"] for m in kept if m["epoch"] == 0), None)
        self.writer = SummaryWriter(self.out_dir / "tensorboard", purge_step=keep_before)
        record_provenance(self.out_dir, device, **provenance)
        return kept[-1] if kept else {}

    def record(self, metrics: dict[str, Any]) -> None:
        """One epoch's metrics: a line of metrics.jsonl, TensorBoard scalars, and the log."""
        if not self.writes:
            return
        with open(self.out_dir / METRICS_NAME, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        for key, value in metrics.items():
            if key != "epoch" and value is not None:
                self.writer.add_scalar(key, value, metrics["epoch"])
        log.info(" ".join(f"{k}={readable(v)}" for k, v in metrics.items()))
        elbo = metrics.get("test_elbo")
        if metrics["epoch"] == 0:
            self.untrained_elbo = elbo
        elif elbo is not None and self.untrained_elbo is not None and elbo < self.untrained_elbo - 10 * abs(self.untrained_elbo):
            log.warning(f"test ELBO {readable(elbo)} is far below the untrained model's {readable(self.untrained_elbo)} "
                        f"(KL {readable(metrics.get('test_kl'))}): training is diverging; try a lower learning rate, "
                        "optim=clipped_adam, or a variance-reduced estimator")
        at_floor = metrics.get("test_scale_at_floor")
        if at_floor:  # the likelihood's scale has reached likelihood.min_scale somewhere
            log.warning(f"{at_floor:.2%} of the test pixels have their scale at the floor likelihood.min_scale: "
                        "the likelihood rewards a precision those pixels may not have")

    def images(self, epoch: int, **grids: tuple[Tensor, int]) -> None:
        """Each name=(images (N, C, H, W) in [0, 1], images per row) as images/<name>_NNN.png
        and as a TensorBoard image at step `epoch`."""
        images_dir = self.out_dir / "images"
        images_dir.mkdir(exist_ok=True)
        for name, (images, nrow) in grids.items():
            grid = make_grid(images, nrow=nrow)  # (3, H', W')
            save_image(grid, images_dir / f"{name}_{epoch:03d}.png")
            self.writer.add_image(name, grid, epoch)


def readable(value: Any) -> str:
    """A number for the log: two decimals, or four significant digits for a diverged run's -1.9e+34
    and for a learning rate's 0.001."""
    if isinstance(value, float):
        return f"{value:.2f}" if 0.01 <= abs(value) < 1e5 or value == 0 else f"{value:.4g}"
    return str(value)


def record_failure(run_dir: Path, error: BaseException) -> None:
    """Write why the run stopped into run_dir/failed.json (a sweep's report lists it)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    failure = {"error": type(error).__name__, "message": str(error),
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    (run_dir / FAILED_NAME).write_text(json.dumps(failure, indent=2) + "\n")


def clear_failure(run_dir: Path) -> None:
    """Forget an earlier failure of this run directory: it is being run again."""
    (Path(run_dir) / FAILED_NAME).unlink(missing_ok=True)


class OptunaLogThroughHydra(Callback):
    """A Hydra callback for the Optuna sweeper: Optuna logs through its own coloured handler, so its
    lines carry escape codes into files and ignore Hydra's format; send them through Hydra's log."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        import optuna

        optuna.logging.disable_default_handler()
        optuna.logging.enable_propagation()
