"""A trained run, loaded for evaluation: its config, its networks with their weights, its data.

The networks are rebuilt from the run's own config (`.hydra/config.yaml`, or the copy inside
`checkpoint.pt` for a run made by `train.train(cfg, out_dir)` outside Hydra) with
`hydra.utils.instantiate`, so any architecture the config can express loads, and the weights
come from the checkpoint's Pyro param store exactly as `train.py` restores them on resume.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyro
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

import checkpoint
from data import load_split, observe_test_set
from train import resolve_device, restore_params


class RunError(RuntimeError):
    """A run directory that cannot be evaluated."""


@dataclass
class TrainedRun:
    """The networks of q(t|x) and p(x|t) with trained weights, and the config that made them."""

    cfg: DictConfig  # the run's config; cfg.data.root may be redirected by load_run
    encoder: nn.Module  # x (B, C, H, W) -> t_loc, t_scale (B, latent_dim)
    decoder: nn.Module  # t (B, latent_dim) -> parameters of p(x|t)
    image_shape: tuple[int, int, int]
    device: torch.device
    run_dir: Path

    def split(self, train: bool, data_cfg: DictConfig | None = None) -> tuple[Tensor, Tensor]:
        """Observations x (N, C, H, W) on the device, drawn once with the fixed test-set seed
        (binarized or dequantized as the likelihood needs), and labels (N,)."""
        images, labels = load_split(data_cfg if data_cfg is not None else self.cfg.data, train=train)
        return observe_test_set(images, self.cfg.model.likelihood).to(self.device), labels


def run_config(path: Path) -> DictConfig:
    """The config a checkpoint was trained with (keys added to the project since then filled in)."""
    hydra_config = path.parent / ".hydra" / "config.yaml"
    if hydra_config.is_file():
        return checkpoint.with_added_keys(OmegaConf.load(hydra_config))
    try:  # a run made by train.train(cfg, out_dir) without Hydra keeps only the checkpoint's copy
        return checkpoint.with_added_keys(OmegaConf.create(torch.load(path, map_location="cpu", weights_only=False)["config"]))
    except Exception as error:
        raise RunError(f"{path} is corrupt or not a checkpoint of this project ({error})") from error


def load_run(run: str | Path, device: str = "auto", data_root: str | None = None) -> TrainedRun:
    """Rebuild the encoder and decoder of the run in `run` (its directory or checkpoint.pt)."""
    path = checkpoint.checkpoint_path(run)
    if not path.is_file():
        raise RunError(f"no checkpoint at {path}: give run=<a training run directory> (one holding checkpoint.pt)")
    cfg = run_config(path)
    try:
        state = checkpoint.load(path, cfg)  # also checks that config and checkpoint belong together
    except checkpoint.CheckpointError as error:
        raise RunError(str(error)) from error
    if data_root is not None:  # the files may live elsewhere than where the run was trained
        cfg.data.root = data_root
    cfg.data.dataset.download = False  # evaluation never downloads
    test_images, _ = load_split(cfg.data, train=False)
    image_shape = tuple(test_images.shape[1:])
    target = resolve_device(device)
    encoder = instantiate(cfg.model.encoder, image_shape=image_shape).to(target).eval()
    decoder = instantiate(cfg.model.decoder, image_shape=image_shape).to(target).eval()
    pyro.clear_param_store()
    restore_params(state["param_store"], target, ("encoder", encoder), ("decoder", decoder))
    return TrainedRun(cfg, encoder, decoder, image_shape, target, path.parent)
