"""Checkpoints that let a run stop anywhere and continue exactly where it stopped.

A checkpoint holds the Pyro param store (every network weight), the optimizer's state, every
random number generator's state, the position in the epoch, and the config. It is written
atomically (a temporary file, then a rename), so a crash mid-write never leaves a broken file.
Checkpoints are pickles: load only those you made yourself.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

CHECKPOINT_NAME = "checkpoint.pt"
REQUIRED_KEYS = ("param_store", "optimizer", "rng", "config",
                 "epoch", "batches", "next_batch", "loss_sum", "epoch_seconds", "wall_time")
# Config keys that must match to continue a run; anything else may change on resume.
# data.root and data.dataset.download say where the files are, not what they are.
MUST_MATCH = ("model", "data")
MAY_DIFFER = ("data.root", "data.dataset.download")
# Keys added after checkpoints were first written, with the value an older checkpoint implies.
ADDED_KEYS = {"data.exclude_classes": []}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or that belongs to a different model or data."""


def checkpoint_path(run_or_checkpoint: str | Path) -> Path:
    """Accept a run directory or a checkpoint file."""
    path = Path(run_or_checkpoint).expanduser()
    return path / CHECKPOINT_NAME if path.is_dir() else path


def epoch_checkpoint_path(run_dir: Path, epoch: int) -> Path:
    """The copy kept after `epoch` with trainer.keep_checkpoints=true (epoch 0: untrained)."""
    return Path(run_dir) / f"checkpoint_epoch_{epoch:03d}.pt"


def epoch_checkpoints(run_dir: Path) -> list[Path]:
    """Every per-epoch copy in `run_dir`, in epoch order."""
    return sorted(Path(run_dir).glob("checkpoint_epoch_[0-9][0-9][0-9].pt"))


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: Path, state: dict[str, Any]) -> None:
    """Write `state` to `path` atomically."""
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def load(path: Path, cfg: DictConfig) -> dict[str, Any]:
    """Read a checkpoint and check that it was made with this model and data config."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: give resume=<run dir> or resume=<checkpoint.pt>")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated zip, wrong format, garbage bytes: all unreadable
        raise CheckpointError(f"checkpoint {path} is corrupt or not a checkpoint ({error}); it was left untouched") from error
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED_KEYS):
        raise CheckpointError(f"{path} is not a checkpoint of this project (expected keys {REQUIRED_KEYS}); it was left untouched")
    differences = config_differences(OmegaConf.create(state["config"]), cfg)
    if differences:
        raise CheckpointError(
            f"checkpoint {path} was made with a different config: {'; '.join(differences)}. "
            "Resume with the same model and data settings, or start a new run"
        )
    return state


def with_added_keys(cfg: DictConfig) -> DictConfig:
    """`cfg` with every key of ADDED_KEYS that it lacks set to the value an older run implies."""
    for key, value in ADDED_KEYS.items():
        if OmegaConf.select(cfg, key) is None:
            OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def config_differences(saved: DictConfig, current: DictConfig) -> list[str]:
    """'key: saved -> current' for every model/data key that differs (a key of ADDED_KEYS
    missing on either side counts as its old value)."""
    saved_flat = _flatten({key: OmegaConf.to_container(saved[key], resolve=True) for key in MUST_MATCH if key in saved})
    current_flat = _flatten({key: OmegaConf.to_container(current[key], resolve=True) for key in MUST_MATCH})
    saved_flat, current_flat = {**ADDED_KEYS, **saved_flat}, {**ADDED_KEYS, **current_flat}
    keys = sorted(set(saved_flat) | set(current_flat))
    return [
        f"{key}: {saved_flat.get(key)!r} -> {current_flat.get(key)!r}"
        for key in keys
        if key not in MAY_DIFFER and saved_flat.get(key) != current_flat.get(key)
    ]


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat
