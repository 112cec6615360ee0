"""Image datasets held in memory as tensors and batched by index.

A dataset is built from its config node (`_target_` + keyword arguments), so torchvision's
`MNIST` and `FashionMNIST`, a folder of your own pictures (vae/image_folder.py), CelebA
(vae/celeba.py) and the file-free `SyntheticImages` below are interchangeable: each takes
`(root, train, download)` and exposes `.data` (N, H, W) or (N, H, W, C) uint8 and `.targets` (N,),
UNLABELLED for images without classes.

Pixels become observations by the likelihood's rule, its `observe` (model.py, vae/likelihoods.py):
dynamic binarization for the Bernoulli, uniform dequantization for the Gaussians (each a fresh draw
every epoch), the 8-bit levels as they are for the discretized logistic. The test set is observed
once with a fixed seed, so test numbers are comparable across runs.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor

from model import Likelihood, check_image_shape
from vae.config import ConfigError

PROJECT_DIR = Path(__file__).resolve().parents[1]
TEST_SET_SEED = 0  # fixes the test set's binarization / dequantization noise
UNLABELLED = -1  # the label of every image of a dataset without classes
NO_LABELS = ("the images have no labels (a folder of images is labelled by its class subfolders, two or more; "
             "CelebA by data.dataset.attribute)")


class DataNotFoundError(RuntimeError):
    """The dataset's files are absent and could not be downloaded."""


def data_root(root: str | Path) -> Path:
    """`data.root` as an absolute path; a relative one is taken under the project."""
    root = Path(root).expanduser()
    return root if root.is_absolute() else PROJECT_DIR / root


def labelled(labels: Tensor) -> bool:
    """Whether every image has a class label (a dataset without classes gives each one UNLABELLED)."""
    return bool((labels != UNLABELLED).all())


def load_split(data_cfg: DictConfig, train: bool) -> tuple[Tensor, Tensor]:
    """One split as (images (N, C, H, W) float in [0, 1], labels (N,) int64).

    The training split leaves out the labels in `data_cfg.exclude_classes` (before `subset`
    takes its first N), so a model can be trained without a class that the test split keeps.
    """
    root = data_root(data_cfg.root)
    name = data_cfg.dataset._target_.rsplit(".", 1)[-1]
    files = root / data_cfg.get("files", f"{name}/raw")  # where torchvision keeps this dataset's files
    created = [folder for folder in (files, *files.parents) if folder.is_relative_to(root) and not folder.exists()]
    try:
        dataset = instantiate(data_cfg.dataset, root=str(root), train=train)
    except InstantiationException as wrapped:
        error = wrapped.__cause__
        if isinstance(error, ConfigError):  # the dataset refused one of its own keys
            raise error from None
        if not isinstance(error, (RuntimeError, OSError, AssertionError, ValueError)):
            raise
        if files.is_dir() and any(files.iterdir()):  # the files are there: they cannot be read
            raise DataNotFoundError(f"{name}'s files in {files} are corrupt or truncated ({type(error).__name__}: "
                                    f"{error}); replace them with intact copies") from wrapped
        for folder in created:  # leave no empty folders behind in a data root that may be shared
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise DataNotFoundError(
            f"{name} is not under {root} and could not be downloaded ({error}). Put the files "
            f"in {files} (torchvision's layout), or set VAE_DATA_ROOT (or data.root=...) "
            f"to the folder that holds {files.relative_to(root)}"
        ) from wrapped
    images = torch.as_tensor(dataset.data)
    if images.dtype != torch.uint8:
        raise ConfigError(f"data.dataset._target_={data_cfg.dataset._target_}: its images are {images.dtype}; "
                          "every likelihood here reads 8-bit images (uint8, levels 0..255)")
    if images.dim() == 3:  # (N, H, W) grayscale
        images = images.unsqueeze(1)
    else:  # (N, H, W, C) colour
        images = images.permute(0, 3, 1, 2)
    labels = torch.as_tensor(dataset.targets, dtype=torch.long)
    if train and data_cfg.get("exclude_classes"):  # held-out classes: the test split keeps them
        if not labelled(labels):
            raise ConfigError(f"data.exclude_classes={list(data_cfg.exclude_classes)}: {NO_LABELS}; set it to []")
        excluded = torch.as_tensor(list(data_cfg.exclude_classes), dtype=torch.long)
        absent = sorted(set(excluded.tolist()) - set(labels.unique().tolist()))
        if absent:
            raise ConfigError(f"data.exclude_classes={list(data_cfg.exclude_classes)}: no training image has label "
                              f"{absent[0]} (the labels are {labels.min().item()}..{labels.max().item()})")
        kept = ~torch.isin(labels, excluded)
        if not kept.any():
            raise ConfigError(f"data.exclude_classes={list(data_cfg.exclude_classes)}: leaves no training image")
        images, labels = images[kept], labels[kept]
    if train and data_cfg.subset is not None:
        if data_cfg.subset > len(images):
            raise ConfigError(f"data.subset={data_cfg.subset}: the training split has only {len(images)} images")
        images, labels = images[: data_cfg.subset], labels[: data_cfg.subset]
    return images.float().div_(255), labels


def load_training_data(cfg: DictConfig, device: torch.device) -> tuple[Tensor, Tensor]:
    """The training images (N, C, H, W) in [0, 1] in memory on `device`, and the test images, on the
    CPU for `observe_test_set`."""
    train_images, _ = load_split(cfg.data, train=True)
    test_images, _ = load_split(cfg.data, train=False)
    if cfg.data.batch_size > len(train_images):
        raise ConfigError(f"data.batch_size={cfg.data.batch_size}: larger than the {len(train_images)} training images")
    try:
        check_image_shape(tuple(train_images.shape[1:]), cfg.model.channels)
    except ValueError as error:
        raise ConfigError(f"model.channels={list(cfg.model.channels)}: {error}") from error
    return train_images.to(device), test_images


def observe_test_set(images: Tensor, likelihood: Likelihood) -> Tensor:
    """The test observations of `images` (on the CPU) by the likelihood's rule, drawn once with a fixed seed."""
    return likelihood.observe(images, torch.Generator().manual_seed(TEST_SET_SEED))


def epoch_batches(num_data: int, batch_size: int, drop_last: bool) -> list[Tensor]:
    """A fresh random order of the dataset, split into minibatches of indices."""
    order = torch.randperm(num_data)
    batches = list(order.split(batch_size))
    if drop_last and len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def bits_per_dim(nats_per_image: float, image_shape: tuple[int, ...], log_bin_width: float) -> float:
    """-log2 P per dimension, from log p(x) in nats per image (or per pixel, image_shape (1,)), with
    the likelihood's `log_bin_width` per pixel: log P(levels) >= log p(x) + D log_bin_width.

    A density of dequantized x = (level + u) / 256 in [0, 1) (the Gaussians) has log_bin_width =
    -log 256: its value on a level's bin of width 1/256 bounds that level's log-probability from
    below (Theis et al. 2016). The discretized logistic's log p is already a log-probability (0).
    """
    num_dims = math.prod(image_shape)
    return -(nats_per_image + num_dims * log_bin_width) / (num_dims * math.log(2))


class SyntheticImages:
    """A small procedurally generated image set that needs no files (tests, offline runs).

    Each image is one bright disk whose centre and radius vary continuously; the label is the
    sector of the image the centre falls in. Images with structure a VAE learns in seconds.
    """

    def __init__(
        self,
        root: str | None = None,
        train: bool = True,
        download: bool = False,
        size: int = 16,
        num_classes: int = 10,
        num_train: int = 2048,
        num_test: int = 512,
        seed: int = 0,
    ) -> None:
        del root, download  # the same signature as torchvision's datasets; no files involved
        for key, value in (("size", size), ("num_classes", num_classes), ("num_train", num_train), ("num_test", num_test)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"data.dataset.{key}={value!r}: must be a positive integer")
        generator = torch.Generator().manual_seed(seed + (0 if train else 1))
        num_images = num_train if train else num_test
        margin = size / 4
        centre = margin + (size - 2 * margin) * torch.rand(num_images, 2, generator=generator)  # (N, 2)
        radius = size / 8 + size / 8 * torch.rand(num_images, generator=generator)  # (N,)
        grid = torch.arange(size, dtype=torch.float32) + 0.5
        dist2 = (grid[None, :, None] - centre[:, 0, None, None]) ** 2 + (
            grid[None, None, :] - centre[:, 1, None, None]
        ) ** 2  # (N, H, W)
        intensity = torch.sigmoid(4 * (radius[:, None, None] - dist2.sqrt()))  # soft-edged disk
        self.data = (intensity * 255).round().to(torch.uint8)  # (N, H, W)
        angle = torch.atan2(centre[:, 0] - size / 2, centre[:, 1] - size / 2)  # (N,)
        self.targets = ((angle + math.pi) / (2 * math.pi) * num_classes).long().clamp(max=num_classes - 1)
