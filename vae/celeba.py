"""CelebA's aligned faces as 64x64 colour images (`data=celeba`), through torchvision's CelebA.

torchvision reads the files under `root`/celeba/ (img_align_celeba/*.jpg and the five list_*.txt /
identity_CelebA.txt files, checked against their MD5 sums) and downloads them when `download` is
true and they are absent (from Google Drive, with the `gdown` package). Its official partition
gives the splits: train (162,770 faces) and test (19,962); the validation faces are not used.

Each 178x218 face is centre-cropped to 148x148 and resized to `image_size` (64), the preprocessing
of common VAE codebases, then kept as 8-bit RGB levels (N, 64, 64, 3), decoded once and cached
as vae/image_folder.py does (outputs/cache/).

Labels: CelebA has no classes, so by default none (UNLABELLED: the tasks that need labels refuse);
`attribute=<one of its 40 binary attributes>` (e.g. Smiling, Male, Eyeglasses) makes that
attribute the label, 0 or 1, for the linear probe of task=represent and the classifier of
task=generate.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torchvision import transforms
from torchvision.datasets import CelebA

from vae.config import ConfigError
from vae.data import UNLABELLED
from vae.image_folder import cached_decode

CROP = 148  # the centre square of the 178x218 aligned faces kept before resizing


class CelebAImages:
    """One split of CelebA: `.data` uint8 (N, S, S, 3), `.targets` (N,) (UNLABELLED, or `attribute` 0/1)."""

    def __init__(self, root: str, train: bool = True, download: bool = False, image_size: int = 64,
                 attribute: str | None = None, cache_dir: str | None = "outputs/cache") -> None:
        celeba = CelebA(root, split="train" if train else "test", target_type="attr", download=download)
        names = [name for name in celeba.attr_names if name]  # the header line may end with a space
        if attribute is not None and attribute not in names:
            raise ConfigError(f"data.dataset.attribute={attribute!r}: not an attribute of CelebA; give null (no "
                              f"labels) or one of {', '.join(names)}")
        folder = Path(root) / celeba.base_folder / "img_align_celeba"
        crop_resize = transforms.Compose([transforms.CenterCrop(CROP), transforms.Resize(image_size)])
        self.data, kept = cached_decode(folder, [Path(name) for name in celeba.filename], "RGB", crop_resize,
                                        (image_size, image_size, 3), cache_dir)
        if len(kept) == 0:
            raise ConfigError(f"data.root={root}: none of CelebA's {len(celeba.filename)} "
                              f"{'training' if train else 'test'} images in {folder} can be read")
        if attribute is None:
            self.targets = torch.full((len(kept),), UNLABELLED, dtype=torch.long)
        else:
            self.targets = celeba.attr[kept, names.index(attribute)].long()
