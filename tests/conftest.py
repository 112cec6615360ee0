"""Shared fixtures: configs composed the way Hydra composes them, and a clean Pyro state."""
from __future__ import annotations

import os
from pathlib import Path

import pyro
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

PROJECT_DIR = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT_DIR / "conf"
# Small, fast settings shared by the training tests: synthetic data, a tiny network.
FAST = ["data=synthetic", "data.subset=512", "model.channels=[8,16]", "model.hidden_dim=64",
        "model.latent_dim=4", "trainer.epochs=2", "trainer.check_every_step=true", "device=cpu"]


def compose_config(*overrides: str, config_name: str = "config") -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


@pytest.fixture
def config():
    """`config(*overrides)` composes conf/config.yaml with the overrides."""
    return compose_config


@pytest.fixture
def fast_config():
    """`fast_config(*overrides)`: the FAST settings plus the overrides."""
    return lambda *overrides: compose_config(*FAST, *overrides)


def trained_run(out_dir: Path, *overrides: str) -> Path:
    """`out_dir`, holding a run of train.py on the FAST settings plus the overrides, from seed 0."""
    from train import train  # imported here: the config fixtures above need no training code

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    train(compose_config(*FAST, *overrides), out_dir)
    return out_dir


@pytest.fixture(autouse=True)
def fresh_pyro_state():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


def mnist_root() -> Path | None:
    """The folder holding MNIST/raw from VAE_DATA_ROOT, or None when it is absent."""
    root = os.environ.get("VAE_DATA_ROOT")
    if root and (Path(root) / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        return Path(root)
    return None
