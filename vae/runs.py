"""A training run's directory as others read it: its overrides, the command that continues it,
and its networks with their trained weights, for evaluation.

The networks are rebuilt from the config saved in the checkpoint (the one its weights were
trained with, also after a resume that changed it) by `vae.build.build_networks`, so any
architecture the config can express loads, and the weights come from the checkpoint's Pyro param
store exactly as training restores them on resume.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyro
import torch
import yaml
from omegaconf import DictConfig
from torch import Tensor

from guide import Encoder
from model import Decoder
from vae import checkpoint
from vae.build import build_networks
from vae.config import resolve_device
from vae.data import load_split, observe_test_set
from vae.logbook import read_metrics
from vae.old_runs import todays_overrides


class RunError(RuntimeError):
    """A run directory that cannot be evaluated."""


def run_overrides(run_dir: Path) -> list[str]:
    """The command-line overrides a run was made with (its .hydra/overrides.yaml; [] without one), in
    today's keys (vae/old_runs.py)."""
    overrides_file = Path(run_dir) / ".hydra" / "overrides.yaml"
    return todays_overrides(list(yaml.safe_load(overrides_file.read_text()) or []) if overrides_file.is_file() else [])


def resume_command(run_dir: Path) -> str:
    """The command line that continues the run in `run_dir`, with the run's own overrides."""
    kept = [o for o in run_overrides(run_dir) if not o.startswith("resume=")]
    return " ".join(["python train.py", *kept, f"resume={run_dir}"])


@dataclass
class TrainedRun:
    """The networks of q(t|x) and p(x|t) with trained weights, and the config that made them."""

    cfg: DictConfig  # the run's config; cfg.data.root may be redirected by load_run
    encoder: Encoder  # x (B, C, H, W) -> t_loc, t_scale (B, latent_dim), features h (B, hidden_dim)
    decoder: Decoder  # t (B, latent_dim) -> p(x|t)
    image_shape: tuple[int, int, int]
    device: torch.device
    run_dir: Path
    state: checkpoint.RunState  # where the checkpoint stood: epochs of training behind these weights

    def split(self, train: bool, data_cfg: DictConfig | None = None) -> tuple[Tensor, Tensor]:
        """Observations x (N, C, H, W) on the device, drawn once with the fixed test-set seed
        (binarized or dequantized as the likelihood needs), and labels (N,)."""
        images, labels = load_split(data_cfg if data_cfg is not None else self.cfg.data, train=train)
        return observe_test_set(images, self.decoder.likelihood).to(self.device), labels


def load_run(run: str | Path, device: str = "auto", data_root: str | None = None) -> TrainedRun:
    """Rebuild the encoder and decoder of the run in `run` (its directory or a checkpoint file)."""
    path = checkpoint.checkpoint_path(run)
    if not path.is_file():
        raise RunError(f"no checkpoint at {path}: give run=<a training run directory> (one holding checkpoint.pt)")
    try:
        contents = checkpoint.read(path)
    except checkpoint.CheckpointError as error:
        raise RunError(str(error)) from error
    cfg = checkpoint.saved_config(contents)  # keys added to the project since the run was made filled in
    if data_root is not None and cfg.data.get("files") != ".":  # the datasets may live elsewhere than where the
        cfg.data.root = data_root  # run was trained; an image folder (its files in data.root itself) stays the run's
    cfg.data.dataset.download = False  # evaluation never downloads
    test_images, _ = load_split(cfg.data, train=False)
    image_shape = tuple(test_images.shape[1:])
    target = resolve_device(device)
    encoder, decoder = build_networks(cfg, image_shape, target)  # no speed options: plain float32
    pyro.clear_param_store()
    checkpoint.restore_params(contents["param_store"], target, encoder=encoder, decoder=decoder)
    state = checkpoint.saved_state(contents)
    return TrainedRun(cfg, encoder.eval(), decoder.eval(), image_shape, target, path.parent, state)


def fork_point(source: str | Path, minutes: float, fork: str | Path) -> str:
    """The checkpoint a fork of the run in `source` goes on from: the fork's own checkpoint.pt once it has
    one (a stopped fork continues where it stopped), else the copy of `source`'s last epoch that ended
    within `minutes` of training and testing (trainer.keep_checkpoints=true keeps those copies), from
    which a new run starts in the fork's directory. A recipe forks a run with `resume: ${fork_point:...}`
    (train.py registers the resolver), e.g. to train its last minutes on another objective."""
    own = checkpoint.checkpoint_path(fork)
    if Path(fork).is_dir() and own.is_file():
        return str(own)
    lines = read_metrics(Path(source))
    if not lines:
        raise RunError(f"no run in {source} to fork: run its training recipe first (its command is in the recipe's header)")
    within = [line["epoch"] for line in lines if line["epoch"] > 0 and line["wall_time"] <= 60 * float(minutes)]
    copies = [checkpoint.epoch_checkpoint_path(Path(source), epoch) for epoch in within]
    copies = [copy for copy in copies if copy.is_file()]
    if not copies:
        raise RunError(f"{source} has no per-epoch checkpoint of an epoch that ended within {minutes} minutes (it needs "
                       "trainer.keep_checkpoints=true, and an epoch that ended in time); nothing to fork from")
    return str(copies[-1])
