"""MNIST as a folder of PNG files, for `data=image_folder`: the honest stand-in for a folder of your own
pictures on a machine that has none.

    python -m tools.mnist_as_png <folder> [<training images>]

writes <folder>/train/NNNNN.png and <folder>/test/NNNNN.png, each file named by its image's index in
torchvision's MNIST (read from VAE_DATA_ROOT, as `data=mnist` does), without class folders: sorted by
name, the folder's order is MNIST's, so `experiment=image_folder/mnist_png` trains on exactly the images
and in exactly the order of `data=mnist` (tests/test_image_folder.py checks every metrics.jsonl number).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from PIL import Image
from torchvision.datasets import MNIST


def write(folder: Path, data_root: Path, num_train: int | None = None) -> None:
    """The first `num_train` training digits (None: all 60,000) and all 10,000 test digits as PNG files."""
    for split, count in (("train", num_train), ("test", None)):
        (Path(folder) / split).mkdir(parents=True, exist_ok=True)
        for index, pixels in enumerate(MNIST(str(data_root), train=split == "train").data[:count].numpy()):
            Image.fromarray(pixels).save(Path(folder) / split / f"{index:05d}.png")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python -m tools.mnist_as_png <folder> [<training images>]")
    write(Path(sys.argv[1]), Path(os.environ.get("VAE_DATA_ROOT", "data")), int(sys.argv[2]) if len(sys.argv) == 3 else None)
