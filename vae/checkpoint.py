"""Checkpoints that let a run stop anywhere and continue exactly where it stopped.

A checkpoint holds the Pyro param store (every network weight), the optimizer's state, every
random number generator's state, the config, and the `RunState`: where in which epoch the run
stands. It is written atomically (a temporary file, then a rename), so a crash mid-write never
leaves a broken file. Checkpoints are pickles: load only those you made yourself.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from omegaconf import DictConfig, OmegaConf
from pyro.optim import PyroOptim
from torch import Tensor, nn

CHECKPOINT_NAME = "checkpoint.pt"
# Config keys that must match to continue a run; anything else may change on resume.
# data.root and data.dataset.download say where the files are, not what they are.
MUST_MATCH = ("model", "data")
MAY_DIFFER = ("data.root", "data.dataset.download")
# Keys added after checkpoints were first written, with the value an older checkpoint implies.
ADDED_KEYS = {"data.exclude_classes": []}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or that belongs to a different model or data."""


@dataclass
class RunState:
    """Where a run stands: the training loop's state, saved in every checkpoint."""

    epoch: int = 1  # the epoch in progress, or the next one to start
    batches: list[Tensor] | None = None  # this epoch's minibatches of indices; None between epochs
    next_batch: int = 0  # the first of `batches` not trained on yet
    loss_sum: float = 0.0  # the sum of this epoch's step losses so far
    epoch_seconds: float = 0.0  # seconds spent in this epoch's steps before the last stop
    wall_time: float = 0.0  # seconds of training and testing, over every resume

    def start_epoch(self, batches: list[Tensor]) -> None:
        self.batches, self.next_batch, self.loss_sum, self.epoch_seconds = batches, 0, 0.0, 0.0

    def end_epoch(self) -> None:
        self.epoch, self.batches = self.epoch + 1, None

    def position(self, epochs: int) -> str:
        """Where a resumed run continues, for the log: inside an epoch, at an epoch's start, or done."""
        if self.batches is not None:
            return f"at epoch {self.epoch}, batch {self.next_batch + 1} of {len(self.batches)}"
        if self.epoch > epochs:
            return f"after epoch {self.epoch - 1}: trainer.epochs={epochs} are done, nothing to train"
        return f"at the start of epoch {self.epoch}"

    def epochs_done(self) -> float:
        """Epochs of training behind this state (fractional inside an epoch)."""
        partial = self.next_batch / len(self.batches) if self.batches is not None else 0.0
        return self.epoch - 1 + partial


STATE_KEYS = tuple(field.name for field in fields(RunState))
REQUIRED_KEYS = ("param_store", "optimizer", "rng", "config", *STATE_KEYS)


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


def to_resume(cfg: DictConfig, out_dir: Path) -> Path | None:
    """`resume=...` when given; else this run directory's own checkpoint, left by a
    preempted or requeued job; else none (a fresh start)."""
    if cfg.resume is not None:
        return checkpoint_path(cfg.resume)
    own = out_dir / CHECKPOINT_NAME
    return own if own.is_file() else None


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


def save(path: Path, state: RunState, optimizer: PyroOptim, cfg: DictConfig, keep_copy: bool = False) -> None:
    """Write the run as it stands to `path` atomically; with `keep_copy`, at an epoch's end, also
    to checkpoint_epoch_NNN.pt beside it."""
    contents = {
        "param_store": pyro.get_param_store().get_state(),
        "optimizer": optimizer.get_state(),
        "rng": rng_state(),
        "config": OmegaConf.to_container(cfg, resolve=True),
        **{key: getattr(state, key) for key in STATE_KEYS},
    }
    copies = [path]
    if keep_copy and state.batches is None:  # an epoch's end: keep a copy
        copies.append(epoch_checkpoint_path(path.parent, state.epoch - 1))
    for target in copies:
        temporary = target.with_name(target.name + ".tmp")
        torch.save(contents, temporary)
        os.replace(temporary, target)


def read(path: Path) -> dict[str, Any]:
    """The contents of a checkpoint file, read once; refused in one line when it is not one of ours."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: give resume=<run dir> or resume=<checkpoint.pt>")
    try:
        contents = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated zip, wrong format, garbage bytes: all unreadable
        raise CheckpointError(f"checkpoint {path} is corrupt or not a checkpoint ({error}); it was left untouched") from error
    if not isinstance(contents, dict) or any(key not in contents for key in REQUIRED_KEYS):
        raise CheckpointError(f"{path} is not a checkpoint of this project (expected keys {REQUIRED_KEYS}); it was left untouched")
    return contents


def load(path: Path, cfg: DictConfig) -> dict[str, Any]:
    """Read a checkpoint and check that it was made with this model and data config."""
    contents = read(path)
    check_matches(contents, cfg, path)
    return contents


def check_matches(contents: dict[str, Any], cfg: DictConfig, path: Path) -> None:
    """Refuse, listing the keys, a checkpoint whose model or data config differs from `cfg`."""
    differences = config_differences(OmegaConf.create(contents["config"]), cfg)
    if differences:
        raise CheckpointError(
            f"checkpoint {path} was made with a different config: {'; '.join(differences)}. "
            "Resume with the same model and data settings, or start a new run"
        )


def restore(contents: dict[str, Any], optimizer: PyroOptim, device: torch.device,
            **networks: nn.Module) -> RunState:
    """Put a checkpoint's weights, optimizer state and RNG states back; return its RunState."""
    restore_params(contents["param_store"], device, **networks)
    optimizer.set_state(contents["optimizer"])
    set_rng_state(contents["rng"])
    return RunState(**{key: contents[key] for key in STATE_KEYS})


def restore_params(param_store_state: dict, device: torch.device, **networks: nn.Module) -> None:
    """Load saved weights into the param store (on `device`) and into the networks, by their
    `pyro.module` names (encoder=..., decoder=...)."""
    params = {name: torch.nn.Parameter(value.detach().to(device)) for name, value in param_store_state["params"].items()}
    pyro.get_param_store().set_state({"params": params, "constraints": param_store_state["constraints"]})
    for name, network in networks.items():
        pyro.module(name, network, update_module_params=True)


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
