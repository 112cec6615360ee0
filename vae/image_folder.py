"""A folder of your own pictures as a dataset (`data=image_folder data.root=<folder>`).

Every image file under the folder, recursively (each extension Pillow opens: png, jpg, bmp, gif,
webp, tif, ...; hidden files and folders are passed over), is converted to `channels` (1: Pillow's
mode L, 3: RGB), resized so that its shorter side is `image_size` and centre-cropped to a square,
as torchvision's Resize and CenterCrop do, and kept as 8-bit levels:

    labels   folder/<class>/.../image.png, with two or more class folders: the class's index among
             their sorted names (torchvision's ImageFolder); images at the top level, or a single
             subfolder: no labels (UNLABELLED), and the uses that need them refuse
    split    folder/train/ and folder/test/: those (each with its class folders, if any); else a
             seeded random `test_fraction` of the images is the test split
    corrupt  a file that does not decode is left out, with one warning naming how many and the first

The folder is only read. The decoded images are cached once in a tensor file under `cache_dir`
(outputs/cache/ of the project), named by a hash of the resolved folder, every image file's path,
size and modification time, the mode and the transform; a later run loads that file instead of
decoding again, and any change to the files makes a new one. Before decoding, the images' size in
memory is compared with the memory available. vae/celeba.py decodes and caches CelebA the same way.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torchvision import transforms

from vae.config import ConfigError
from vae.data import PROJECT_DIR, UNLABELLED
from vae.rules import is_finite, is_int

log = logging.getLogger(__name__)
CACHE_VERSION = 1  # part of every cache file's hash: a change to the decoding makes new files
UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)  # what Pillow raises
MODES = {1: "L", 3: "RGB"}  # channels -> Pillow's mode
WARNED: set[str] = set()  # the cache keys whose unreadable files this process has warned of (once, not per split)


def image_extensions() -> set[str]:
    """The file extensions (".png", ...) of every format Pillow can open."""
    Image.init()
    return {extension for extension, format_name in Image.registered_extensions().items() if format_name in Image.OPEN}


def listed_files(folder: Path) -> tuple[list[Path], int]:
    """(the image files under `folder`, as paths relative to it, sorted; the number of files in all)."""
    extensions, found, total = image_extensions(), [], 0

    def refuse(error: OSError) -> None:
        raise ConfigError(f"data.root={folder}: {error.filename} cannot be read ({error.strerror})")

    for directory, subfolders, names in os.walk(folder, onerror=refuse):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        for name in names:
            if name.startswith("."):
                continue
            total += 1
            if Path(name).suffix.lower() in extensions:
                found.append((Path(directory) / name).relative_to(folder))
    return sorted(found, key=lambda path: path.parts), total


def available_memory() -> int:
    """Bytes of memory available now: MemAvailable of /proc/meminfo (Linux), else the free pages."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def size_text(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.1f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"


def check_memory(folder: Path, num_images: int, shape: tuple[int, ...]) -> None:
    """Refuse, naming the size, when `num_images` uint8 images of `shape` exceed the memory available."""
    needed, available = num_images * math.prod(shape), available_memory()
    if needed > available:
        raise ConfigError(f"data.root={folder}: its {num_images} images of {shape} need {size_text(needed)} of memory, "
                          f"more than the {size_text(available)} available; use a smaller data.dataset.image_size "
                          "or fewer images")


def decode(files: list[Path], mode: str, transform: Callable,
           shape: tuple[int, ...]) -> tuple[Tensor, Tensor, list[str]]:
    """(the images uint8 (N, *shape) of the files that decode, the indices of those files, a line per
    file that does not): each converted to `mode` (turned upright by its EXIF orientation first)
    and transformed."""
    images = torch.empty((len(files), *shape), dtype=torch.uint8)
    kept, failures = [], []
    for index, path in enumerate(files):
        try:
            with Image.open(path) as image:
                image = ImageOps.exif_transpose(image).convert(mode)  # decodes the whole file: a truncated one fails
        except UNREADABLE as error:
            failures.append(f"{path} ({type(error).__name__}: {error})")
            continue
        images[len(kept)] = torch.from_numpy(np.array(transform(image), dtype=np.uint8).reshape(shape))
        kept.append(index)
    return images[: len(kept)].clone() if failures else images, torch.tensor(kept, dtype=torch.long), failures


def cached_decode(folder: Path, files: list[Path], mode: str, transform: Callable, shape: tuple[int, ...],
                  cache_dir: str | None) -> tuple[Tensor, Tensor]:
    """`decode` of `files` (relative to `folder`), from the cache file of these files and settings
    when there is one, else decoded and saved there (cache_dir null: decoded every time); a warning
    when some files do not decode. Returns (images, the indices of the files they are)."""
    check_memory(folder, len(files), shape)
    stats = []
    for name in files:
        stat = (folder / name).stat()
        stats.append((str(name), stat.st_size, stat.st_mtime_ns))
    key = json.dumps([CACHE_VERSION, str(folder.resolve()), stats, mode, repr(transform), shape])
    cache = None
    if cache_dir is not None:
        cache_dir = Path(cache_dir).expanduser()
        cache = (cache_dir if cache_dir.is_absolute() else PROJECT_DIR / cache_dir) / (
            f"{folder.name}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt")
    contents = None
    if cache is not None and cache.is_file():
        try:
            contents = torch.load(cache, weights_only=True)
        except (OSError, RuntimeError, EOFError) as error:
            log.warning(f"{cache} cannot be read ({error}); decoding the images again")
    if contents is None:
        log.info(f"decoding {len(files)} images under {folder}" + (f" once, into {cache}" if cache else ""))
        images, kept, failures = decode([folder / name for name in files], mode, transform, shape)
        contents = {"images": images, "kept": kept, "failures": failures}
        if cache is not None:
            partial = cache.with_suffix(f".{os.getpid()}.partial")
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                torch.save(contents, partial)
                os.replace(partial, cache)  # whole or absent: a run stopped while saving leaves no half file
            except OSError as error:
                partial.unlink(missing_ok=True)
                log.warning(f"the decoded images cannot be cached in {cache.parent} ({error}); they are decoded anew "
                            "next time")
    failures = contents["failures"]
    if failures and key not in WARNED:
        WARNED.add(key)
        log.warning(f"{len(failures)} of the {len(files)} image files under {folder} cannot be read and are left out; "
                    f"the first: {failures[0]}")
    return contents["images"], contents["kept"]


class ImageFolderImages:
    """The images of a folder, one split of them: `.data` uint8 (N, S, S) for channels=1 or (N, S, S, 3),
    `.targets` (N,) the class indices (UNLABELLED without class folders), `.classes` the class folders'
    names, `.files` each image's path relative to the folder."""

    def __init__(self, root: str, train: bool = True, download: bool = False, channels: int = 1,
                 image_size: int = 32, test_fraction: float = 0.2, split_seed: int = 0,
                 cache_dir: str | None = "outputs/cache") -> None:
        del download  # your own files: nothing to fetch
        if channels not in MODES or not is_int(channels):
            raise ConfigError(f"data.dataset.channels={channels!r}: must be 1 (gray, L) or 3 (colour, RGB)")
        if not is_int(image_size) or image_size <= 0:
            raise ConfigError(f"data.dataset.image_size={image_size!r}: must be a positive integer")
        if not (is_finite(test_fraction) and 0 < test_fraction < 1):
            raise ConfigError(f"data.dataset.test_fraction={test_fraction!r}: must be a number in (0, 1)")
        folder = Path(root).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"data.root={folder}: " + ("not a folder" if folder.exists() else "no such folder")
                              + "; give data.root=<the folder of your images>")
        files, total = listed_files(folder)
        split_folders = (folder / "train").is_dir() and (folder / "test").is_dir()
        if split_folders:  # folder/train/..., folder/test/...: anything beside them is not part of either
            files = [name for name in files if name.parts[0] in ("train", "test")]
        if total == 0:
            raise ConfigError(f"data.root={folder}: the folder holds no files; put your images in it")
        if not files:
            raise ConfigError(f"data.root={folder}: none of its {total} files is an image"
                              + (" under train/ or test/" if split_folders else "")
                              + " (by its extension: .png, .jpg, .bmp, .gif, .webp, ... the formats Pillow opens)")

        shape = (image_size, image_size) if channels == 1 else (image_size, image_size, channels)
        resize = transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size)])
        images, kept = cached_decode(folder, files, MODES[channels], resize, shape, cache_dir)
        if len(kept) == 0:
            raise ConfigError(f"data.root={folder}: none of its {len(files)} image files can be read (see the warning "
                              "above for the first); replace them with intact copies")

        # Labels: the class folder under the folder (or under train/ and test/), when there are two or more.
        within = [name.parts[1:] if split_folders else name.parts for name in files]
        self.classes = sorted({parts[0] for parts in within}) if all(len(parts) > 1 for parts in within) else []
        if len(self.classes) < 2:
            self.classes = []
        index = {name: i for i, name in enumerate(self.classes)}
        labels = torch.tensor([index[parts[0]] if self.classes else UNLABELLED for parts in within])[kept]

        # The split: the train/ and test/ folders, else a seeded share of the images.
        if split_folders:
            in_split = torch.tensor([name.parts[0] == ("train" if train else "test") for name in files])[kept]
            if not in_split.any():
                raise ConfigError(f"data.root={folder}: no image under its {'train' if train else 'test'}/ folder "
                                  "can be read")
        else:
            num_test = round(len(kept) * test_fraction)
            if not 0 < num_test < len(kept):
                raise ConfigError(f"data.dataset.test_fraction={test_fraction}: of the {len(kept)} images under "
                                  f"{folder} it holds out {num_test}, which leaves an empty split")
            order = torch.randperm(len(kept), generator=torch.Generator().manual_seed(split_seed))
            in_split = torch.zeros(len(kept), dtype=torch.bool)
            in_split[order[:num_test]] = True
            if train:
                in_split = ~in_split
        self.data = images[in_split]  # the folder's order within the split
        self.targets = labels[in_split]
        self.files = [files[i] for i in kept[in_split].tolist()]
