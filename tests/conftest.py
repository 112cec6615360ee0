"""Shared fixtures: configs composed the way Hydra composes them, and a clean Pyro state."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image
from torchvision.utils import make_grid

from vae.config import register_resolvers

PROJECT_DIR = Path(__file__).resolve().parents[1]
register_resolvers()  # as the entry points do before composing: a recipe's trainer.bf16 may follow the processor
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


def process_starts(run_dir: Path) -> list[tuple[int, int]]:
    """(epoch, batch) at which each process that trained in `run_dir` began, oldest first, from its
    provenance.jsonl: (1, 0) for a fresh start; a resume begins where its checkpoint stopped.

    Resume tests assert these, not only the final weights and epoch list: training is determined
    by the seed and a fresh start rewrites metrics.jsonl, so a resume that ignored its checkpoint
    and trained again from epoch 1 would end with the same weights and epochs, but start at (1, 0)."""
    from vae.provenance import read_provenance

    return [(entry["epoch"], entry["batch"]) for entry in read_provenance(run_dir)]


def trained_run(out_dir: Path, *overrides: str) -> Path:
    """`out_dir`, holding a run of train.py on the FAST settings plus the overrides, from seed 0."""
    from train import train  # imported here: the config fixtures above need no training code

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    train(compose_config(*FAST, *overrides), out_dir)
    return out_dir


def resumed_run(out_dir: Path, *overrides: str, stop_after: int, epochs: int) -> Path:
    """`out_dir`, holding a run trained to epoch `stop_after`, then resumed from its checkpoint to `epochs`."""
    from train import train

    trained_run(out_dir, *overrides, f"trainer.epochs={stop_after}")
    pyro.clear_param_store()
    train(compose_config(*FAST, *overrides, f"trainer.epochs={epochs}", f"resume={out_dir}"), out_dir)
    return out_dir


def run_numbers(run: Path) -> list[dict]:
    """Every line of a run's metrics.jsonl without its times (seconds, wall time): equal for two runs that
    computed the same, e.g. an uninterrupted run and a resumed one."""
    return [{k: v for k, v in json.loads(line).items() if "second" not in k and "time" not in k}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(autouse=True)
def fresh_pyro_state():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


# torch's own thread count here (one per core), read before the fixtures below set it: what `python train.py` runs on.
MACHINE_THREADS = torch.get_num_threads()


@pytest.fixture(scope="session", autouse=True)
def one_thread_in_this_process():
    """The tests and their fixtures compute on one torch thread (subprocesses, given `threads=1` where they
    train, too): their networks are tiny, so a second thread gains little, and on a machine whose cores are
    busy the threads of each operation wait for one another, a step taking ten to forty times longer. Every
    test compares runs made under the same setting. `machine_threads` gives a test torch's own count."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(MACHINE_THREADS)


@pytest.fixture(autouse=True)
def back_to_one_thread():
    """One thread again after a test that set another count (e.g. a run with `threads=2`), for the next
    test and the module fixtures set up with it."""
    yield
    torch.set_num_threads(1)


@pytest.fixture
def machine_threads():
    """This test on torch's own thread count, as `python train.py` has it (a README number measured so)."""
    torch.set_num_threads(MACHINE_THREADS)
    yield MACHINE_THREADS


def mnist_root() -> Path | None:
    """The folder holding MNIST/raw from VAE_DATA_ROOT, or None when it is absent."""
    root = os.environ.get("VAE_DATA_ROOT")
    if root and (Path(root) / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        return Path(root)
    return None


def assert_png_shows(path, images: torch.Tensor, nrow: int, rows: list[int] | None = None) -> None:
    """The PNG at `path`, read back, is torchvision's grid of `images` (N, C, H, W) in [0, 1] with `nrow`
    to a row (make_grid: 2-pixel padding, grey as RGB), within 8-bit rounding; only the grid rows
    `rows` when given (the others, e.g. random draws, are not compared)."""
    images = images.detach().float().cpu()
    expected = make_grid(images, nrow=nrow) * 255  # (3, H', W'), the levels save_image rounds
    saved = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float()  # (3, H', W')
    assert saved.shape == expected.shape, (path.name, saved.shape, expected.shape)
    band = images.shape[-2] + 2  # one grid row of tiles and its padding
    for row in rows if rows is not None else range(math.ceil(len(images) / nrow)):
        difference = (saved - expected)[:, row * band: (row + 1) * band + 2].abs().max().item()
        assert difference <= 0.51, (path.name, row, difference)  # 0.5: save_image's rounding
