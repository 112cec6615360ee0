"""Checkpoints that let a run stop anywhere and continue exactly where it stopped.

A checkpoint holds the Pyro param store (every network weight), the optimizer's state, every
random number generator's state, the config, and the `RunState`: where in which epoch the run
stands. It is written atomically (a temporary file, then a rename), so a crash mid-write never
leaves a broken file. Checkpoints are pickles: load only those you made yourself.

Resuming continues a run with its own saved config. Only the keys of MAY_CHANGE may be changed
on resume (how long to train, the optimizer and its learning rate, the objective that trains a
reparameterized guide, `estimator.elbo` (say, the IW bound for the last minutes of a run: the
weights and q(t|x) stay what they are, `estimator.reparameterized` may not change), where and how
fast to run); each change is logged, and any other difference is refused with the list. `resume=<run dir>`
(or its checkpoint.pt) continues the run in its directory; an older copy
(checkpoint_epoch_NNN.pt) starts a new run directory from it, never overwriting the newer one.
"""
from __future__ import annotations

import errno
import logging
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

from vae import distributed
from vae.config import CHECKPOINT_NAME
from vae.distributed import ALONE, Ranks
from vae.old_runs import ADDED_KEYS, todays_config, todays_param
from vae.provenance import PROJECT_DIR, read_provenance

log = logging.getLogger(__name__)
CONF_DIR = PROJECT_DIR / "conf"
# The config keys (and everything under them) that may change when a run is resumed; every other
# key is the run's identity. data.root and data.dataset.download say where the files are, not what
# they are; the speed options change how the networks run, not what they compute.
MAY_CHANGE = ("trainer.epochs", "trainer.max_minutes", "trainer.test_every", "trainer.num_grid_images",
              "trainer.keep_checkpoints", "trainer.check_every_step", "trainer.channels_last", "trainer.bf16",
              "trainer.compile", "optim", "estimator.elbo", "device", "threads", "resume", "data.root",
              "data.dataset.download")
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
    run_id: str | None = None  # drawn when the run starts, kept by every checkpoint and provenance line
    switch_epoch: int | None = None  # the first epoch on trainer.switch_elbo, once the run has switched (vae/runner.py)
    last_epoch_seconds: float = 0.0  # the last whole epoch's training seconds: how long the next is taken to last

    def start_epoch(self, batches: list[Tensor]) -> None:
        self.batches, self.next_batch, self.loss_sum, self.epoch_seconds = batches, 0, 0.0, 0.0

    def end_epoch(self) -> None:
        self.epoch, self.batches = self.epoch + 1, None

    @property
    def batch_in_epoch(self) -> int:
        """The batch of `epoch` the run continues at: 0 between epochs (`next_batch` then still counts the
        epoch before's batches, which `restore` seeds a new rank from, so it is left as saved)."""
        return self.next_batch if self.batches is not None else 0

    def position(self, epochs: int) -> str:
        """Where a resumed run continues, for the log: inside an epoch, at an epoch's start, or done."""
        if self.epoch > epochs:  # done, or stopped inside an epoch beyond a since-lowered trainer.epochs
            return f"after epoch {self.epoch - 1}: trainer.epochs={epochs} are done, nothing to train"
        if self.batches is not None:
            return f"at epoch {self.epoch}, batch {self.next_batch + 1} of {len(self.batches)}"
        return f"at the start of epoch {self.epoch}"

    def epochs_done(self) -> float:
        """Epochs of training behind this state (fractional inside an epoch)."""
        partial = self.next_batch / len(self.batches) if self.batches is not None else 0.0
        return self.epoch - 1 + partial


STATE_KEYS = tuple(field.name for field in fields(RunState))
OPTIONAL_STATE_KEYS = ("run_id", "switch_epoch", "last_epoch_seconds")  # older checkpoints lack these
REQUIRED_KEYS = ("param_store", "optimizer", "rng", "config",
                 *(key for key in STATE_KEYS if key not in OPTIONAL_STATE_KEYS))


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


def run_directory(resume_from: Path | None, out_dir: Path) -> Path:
    """Where a run writes: the directory of the run it continues (resume_from is that run's
    checkpoint.pt), else `out_dir`, a new run, also when it starts from an older per-epoch copy."""
    if resume_from is None:
        return out_dir
    if resume_from.name == CHECKPOINT_NAME:
        return resume_from.parent
    if resume_from.parent.resolve() == out_dir.resolve():
        raise CheckpointError(f"resume={resume_from} would go on in {out_dir}, over its newer {CHECKPOINT_NAME}; "
                              "an older checkpoint starts a new run: give another output directory")
    return out_dir


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


def save(path: Path, state: RunState, optimizer: PyroOptim, cfg: DictConfig, keep_copy: bool = False,
         ranks: Ranks = ALONE) -> None:
    """Write the run as it stands to `path` atomically; with `keep_copy`, at an epoch's end, also
    to checkpoint_epoch_NNN.pt beside it. Data-parallel, every rank calls it (its RNG state goes
    into `rank_rngs`) and rank 0 writes."""
    rank_rngs = distributed.gather(rng_state(), ranks)
    if not ranks.writer:
        return
    contents = {
        "param_store": pyro.get_param_store().get_state(),
        "optimizer": optimizer.get_state(),
        "rng": rank_rngs[0],  # this process's (rank 0's)
        "config": OmegaConf.to_container(cfg, resolve=True),
        **{key: getattr(state, key) for key in STATE_KEYS},
        **({"rank_rngs": rank_rngs} if ranks.parallel else {}),
    }
    copies = [path]
    if keep_copy and state.batches is None:  # an epoch's end: keep a copy
        copies.append(epoch_checkpoint_path(path.parent, state.epoch - 1))
    for target in copies:
        temporary = target.with_name(target.name + ".tmp")
        try:
            torch.save(contents, temporary)
        except (OSError, RuntimeError) as error:  # torch's zip writer says "unexpected pos" on a full disk
            temporary.unlink(missing_ok=True)
            full = (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "unexpected pos" in str(error)
            reason = f"no space left on {target.parent}" if full else str(error)
            raise CheckpointError(f"cannot write {target}: {reason}; the last good checkpoint is kept") from error
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
    for key in ("params", "constraints"):  # parameters renamed since (vae/old_runs.py), in the store and the optimizer
        contents["param_store"][key] = {todays_param(name): value for name, value in contents["param_store"][key].items()}
    contents["optimizer"] = {todays_param(name): value for name, value in contents["optimizer"].items()}
    return contents


def load(path: Path, cfg: DictConfig) -> dict[str, Any]:
    """Read a checkpoint and check that `cfg` differs from the config it was made with in the
    keys of MAY_CHANGE only; log each such change."""
    contents = read(path)
    check_run(path, contents)
    saved = saved_config(contents)
    refused, changed = config_differences(saved, cfg)
    if cfg.get("schedule") is not None:  # the scheduler owns the learning rate from epoch to epoch
        refused += [f"{change} (a run with a schedule keeps its optimizer)" for change in changed if change.startswith("optim.")]
    if not saved.estimator.reparameterized:  # README: only a reparameterized guide changes objective
        refused += [f"{change} (only a reparameterized guide may change its objective)" for change in changed
                    if change.startswith("estimator.elbo")]
    if refused:
        raise CheckpointError(
            f"checkpoint {path} was made with a different config: {'; '.join(refused)}. Resume continues a run "
            f"with its own config (only {', '.join(MAY_CHANGE)} may change), or start a new run"
        )
    for change in changed:
        log.info(f"resume changes {change}")
    return contents


def check_run(path: Path, contents: dict[str, Any]) -> None:
    """A checkpoint continues the run that trained in its directory: its run_id must be the one that
    directory's provenance.jsonl last recorded (a checkpoint copied in from another run is refused,
    before it could train there and mix its metrics with the run's). Runs from before run_id: no check."""
    recorded = [entry["run_id"] for entry in read_provenance(path.parent) if entry.get("run_id")]
    if recorded and contents.get("run_id") and contents["run_id"] != recorded[-1]:
        raise CheckpointError(f"{path} was written by another run (run_id {contents['run_id']}) than the one that "
                              f"trained in {path.parent} (run_id {recorded[-1]} in its provenance.jsonl); resume it "
                              "from the directory it was written in, or start a new run; nothing was changed")


def saved_state(contents: dict[str, Any]) -> RunState:
    """Where the run stood when the checkpoint was written (older checkpoints lack OPTIONAL_STATE_KEYS:
    their defaults; without last_epoch_seconds the budget is read as spent once the wall time reaches it)."""
    return RunState(**{key: contents[key] for key in STATE_KEYS if key in contents})


def saved_config(contents: dict[str, Any]) -> DictConfig:
    """The config a checkpoint was made with, in today's keys (vae/old_runs.py)."""
    return todays_config(OmegaConf.create(contents["config"]))


def resumed_config(cfg: DictConfig, overrides: list[str], out_dir: Path) -> DictConfig:
    """The config to go on with: `cfg` for a new run; for a run that continues (`cfg.resume`, or
    the checkpoint in `out_dir` of a requeued job or of a sweep's job run again), the run's saved
    config, changed only where the command line's `overrides` (key=value, group=option, and the keys
    of a recipe it names) set a key, to that key's value in the composed `cfg`. `load` then refuses
    what may not change."""
    resume_from = to_resume(cfg, out_dir)
    if resume_from is None:
        return cfg
    resumed, absent = saved_config(read(resume_from)), object()
    keys = [override.split("=", 1)[0].lstrip("+~") for override in overrides]
    keys += [key for override in overrides for key in recipe_keys(override)]
    for key in keys:
        value = OmegaConf.select(cfg, key, default=absent)
        if key.startswith("hydra.") or value is absent:
            continue  # Hydra's own settings; a recipe's name (experiment=...), which is no key
        OmegaConf.update(resumed, key, value, merge=False, force_add=True)
    return resumed


def recipe_keys(override: str) -> list[str]:
    """The keys that `experiment=NAME` on the command line sets (its conf/experiment/NAME.yaml,
    `# @package _global_`), as dotted paths to their values, with the groups its defaults choose
    (`override /estimator: iwae`: the whole `estimator` node) and the keys of the recipes it builds on;
    [] for any other override. A sweep continued with an edited recipe (say, fewer epochs) thus goes on
    with the recipe as it is now, and a recipe that forks a run (resume=...) gets its objective."""
    group, _, option = override.partition("=")
    path = CONF_DIR / "experiment" / f"{option}.yaml"
    if group.lstrip("+~") != "experiment" or not path.is_file():
        return []
    recipe = OmegaConf.to_container(OmegaConf.load(path))
    defaults = recipe.pop("defaults", None) or []
    recipe.pop("hydra", None)

    def leaves(node: Any, prefix: str) -> list[str]:
        if isinstance(node, dict) and node:
            return [key for name, child in node.items() for key in leaves(child, f"{prefix}{name}.")]
        return [prefix[:-1]]

    keys = []
    for entry in defaults:
        if isinstance(entry, str) and entry.startswith("/experiment/"):  # a recipe it builds on
            keys += recipe_keys(f"experiment={entry.removeprefix('/experiment/')}")
        elif isinstance(entry, dict):  # {"override /estimator": "iwae"}: that group's node
            keys += [name.removeprefix("override").strip().strip("/").replace("/", ".") for name in entry]
    return keys + leaves(recipe, "")


def restore(contents: dict[str, Any], optimizer: PyroOptim, cfg: DictConfig, device: torch.device,
            ranks: Ranks = ALONE, **networks: nn.Module) -> RunState:
    """Put a checkpoint's weights, optimizer state and RNG states back; return its RunState.

    The optimizer's moment estimates carry over with the hyperparameters of `cfg.optim` (a new
    learning rate takes effect); a different optimizer class starts with fresh moments. With a
    `schedule`, the schedulers and their optimizers get their saved states back unchanged. Each
    rank gets its own saved RNG state back (`rank_rngs`; rank 0's alone when one process saved it)."""
    restore_params(contents["param_store"], device, **networks)
    saved_target = saved_config(contents).optim._target_
    if cfg.get("schedule") is not None:  # the scheduler's and its optimizer's states, as saved (`load`)
        optimizer.set_state(contents["optimizer"])
    elif saved_target == cfg.optim._target_:
        hyperparameters = OmegaConf.to_container(cfg.optim.optim_args, resolve=True)
        optimizer.set_state({name: {**state, "param_groups": [{**group, **hyperparameters} for group in state["param_groups"]]}
                             for name, state in contents["optimizer"].items()})
    else:
        log.info(f"optim._target_ changed from {saved_target} to {cfg.optim._target_}: its moment estimates start afresh")
    state = saved_state(contents)
    rank_rngs = contents.get("rank_rngs") or [contents["rng"]]  # rank 0's is "rng" too
    if ranks.rank < len(rank_rngs):
        set_rng_state(rank_rngs[ranks.rank])
    else:  # more ranks than when it was saved: a seed of its own, from the run's seed, rank and position
        pyro.set_rng_seed(distributed.rank_seed(cfg.seed, ranks.rank, state.epoch, state.next_batch))
    return state


def restore_params(param_store_state: dict, device: torch.device, **networks: nn.Module) -> None:
    """Load saved weights into the param store (on `device`) and into the networks, by their
    `pyro.module` names (encoder=..., decoder=...)."""
    params = {name: torch.nn.Parameter(value.detach().to(device)) for name, value in param_store_state["params"].items()}
    pyro.get_param_store().set_state({"params": params, "constraints": param_store_state["constraints"]})
    for name, network in networks.items():
        pyro.module(name, network, update_module_params=True)


def config_differences(saved: DictConfig, current: DictConfig) -> tuple[list[str], list[str]]:
    """('key: saved -> current' for every key that differs and may not change on resume, the same
    for the keys that may); a key of ADDED_KEYS missing on either side counts as its old value."""
    saved_flat = {**ADDED_KEYS, **_flatten(OmegaConf.to_container(saved, resolve=True))}
    current_flat = {**ADDED_KEYS, **_flatten(OmegaConf.to_container(current, resolve=True))}
    refused, changed = [], []
    for key in sorted(set(saved_flat) | set(current_flat)):
        if saved_flat.get(key) != current_flat.get(key):
            may_change = any(key == prefix or key.startswith(prefix + ".") for prefix in MAY_CHANGE)
            (changed if may_change else refused).append(f"{key}: {saved_flat.get(key)!r} -> {current_flat.get(key)!r}")
    return refused, changed


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat
