"""What a training run writes as it goes: metrics.jsonl, TensorBoard, image grids and the log.

    metrics.jsonl                one JSON object per epoch (epoch 0 is the untrained model)
    tensorboard/                 the same numbers as scalars, and the image grids as images
    images/reconstructions_NNN   fixed test images x (top rows) and E[x|t], t ~ q(t|x) (bottom rows)
    images/samples_NNN           E[x|t] for fixed prior samples t ~ p(t)
    failed.json                  why the run stopped with an error (removed when it is run again)
"""
from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from torch import Tensor
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid, save_image

log = logging.getLogger(__name__)
METRICS_NAME = "metrics.jsonl"
FAILED_NAME = "failed.json"


class Logbook:
    """Writes one run's records into `out_dir`; TensorBoard drops anything it had logged from
    `first_epoch` on (a resumed run rewrites the epoch it was stopped in)."""

    def __init__(self, out_dir: Path, first_epoch: int) -> None:
        self.out_dir = Path(out_dir)
        self.writer = SummaryWriter(self.out_dir / "tensorboard", purge_step=first_epoch)

    def __enter__(self) -> Logbook:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.writer.close()

    def record(self, metrics: dict[str, Any]) -> None:
        """One epoch's metrics: a line of metrics.jsonl, TensorBoard scalars, and the log."""
        with open(self.out_dir / METRICS_NAME, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        for key, value in metrics.items():
            if key != "epoch" and value is not None:
                self.writer.add_scalar(key, value, metrics["epoch"])
        log.info(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))

    def images(self, epoch: int, **grids: tuple[Tensor, int]) -> None:
        """Each name=(images (N, C, H, W) in [0, 1], images per row) as images/<name>_NNN.png
        and as a TensorBoard image at step `epoch`."""
        images_dir = self.out_dir / "images"
        images_dir.mkdir(exist_ok=True)
        for name, (images, nrow) in grids.items():
            grid = make_grid(images, nrow=nrow)  # (3, H', W')
            save_image(grid, images_dir / f"{name}_{epoch:03d}.png")
            self.writer.add_image(name, grid, epoch)


def last_metrics(run_dir: Path) -> dict[str, Any]:
    """The last line of a run's metrics.jsonl (what a finished run returns when resumed)."""
    metrics_file = Path(run_dir) / METRICS_NAME
    lines = metrics_file.read_text().splitlines() if metrics_file.is_file() else []
    return json.loads(lines[-1]) if lines else {}


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
