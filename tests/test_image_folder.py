"""data=image_folder (vae/image_folder.py): a folder of pictures read as a dataset. Its labels and
splits, the conversion of mixed sizes and modes, the decode-once cache outside the folder, a
refusal in one line for each bad input, MNIST written out as PNG files and read back byte for
byte, and every evaluation task on models trained on generated folders, gray and colour."""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys

import numpy as np
import pyro
import pytest
import torch
from conftest import PROJECT_DIR, compose_config, mnist_root
from PIL import Image
from torchvision import transforms
from torchvision.datasets import MNIST

import evaluate as evaluate_module
import vae.image_folder as image_folder
from tools import mnist_as_png
from train import train
from vae.config import ConfigError, check_config
from vae.data import UNLABELLED, load_split
from vae.image_folder import ImageFolderImages

SMALL = ["model.channels=[8,16]", "model.hidden_dim=32", "model.latent_dim=4", "data.batch_size=16", "device=cpu"]


def write_classes(folder, rng, per_class: int = 32, size: tuple[int, int] = (16, 16), mode: str = "L") -> None:
    """`per_class` images in each of the class folders a/ and b/: a bright square on the left (a) or the
    right (b) over dim noise, so the classes can be told apart."""
    for label, name in enumerate("ab"):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            height, width = size
            pixels = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
            left = width // 8 + label * width // 2
            pixels[height // 4: 3 * height // 4, left: left + width // 4] = rng.integers(150, 256, 3, dtype=np.uint8)
            Image.fromarray(pixels).convert(mode).save(folder / name / f"{i:03d}.png")


def listing(folder) -> list[tuple[str, int, int]]:
    """Every entry under `folder` with its size and modification time: what a run must leave as it is."""
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


def folder_config(root, cache, *overrides: str):
    return compose_config("data=image_folder", f"data.root={root}", f"data.dataset.cache_dir={cache}", *overrides)


def refusal(data_cfg, train: bool = True) -> str:
    """The one-line ConfigError with which load_split refuses the data."""
    with pytest.raises(ConfigError) as error:
        load_split(data_cfg, train=train)
    message = str(error.value)
    assert "\n" not in message, message
    return message


def test_class_folders_are_labels_and_a_seeded_share_is_the_test_split(tmp_path):
    folder = tmp_path / "pictures"
    write_classes(folder, np.random.default_rng(0), per_class=10)
    cfg = folder_config(folder, tmp_path / "cache", "data.dataset.image_size=16")
    check_config(cfg)
    train_images, train_labels = load_split(cfg.data, train=True)
    test_images, test_labels = load_split(cfg.data, train=False)
    assert train_images.shape == (16, 1, 16, 16) and test_images.shape == (4, 1, 16, 16)  # 20 images, 0.2 held out
    assert torch.equal(train_images * 255, (train_images * 255).round())  # 8-bit levels
    data = ImageFolderImages(str(folder), train=True, image_size=16, cache_dir=str(tmp_path / "cache"))
    test = ImageFolderImages(str(folder), train=False, image_size=16, cache_dir=str(tmp_path / "cache"))
    assert data.classes == ["a", "b"] and data.data.dtype == torch.uint8
    every_file = sorted(str(path.relative_to(folder)) for path in folder.rglob("*.png"))
    assert sorted(map(str, data.files + test.files)) == every_file
    assert data.targets.tolist() == [0 if str(name).startswith("a/") else 1 for name in data.files]
    assert torch.equal(train_labels, data.targets) and torch.equal(test_labels, test.targets)
    pixels = np.array(Image.open(folder / data.files[0]))  # 16x16 gray: taken as it is
    assert np.array_equal(data.data[0].numpy(), pixels)
    other_seed = ImageFolderImages(str(folder), train=False, image_size=16, split_seed=1,
                                   cache_dir=str(tmp_path / "cache"))
    assert other_seed.files != test.files and len(other_seed.files) == 4


def test_train_and_test_folders_are_the_split(tmp_path):
    rng = np.random.default_rng(1)
    write_classes(tmp_path / "pictures" / "train", rng, per_class=6)
    write_classes(tmp_path / "pictures" / "test", rng, per_class=2)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "pictures" / "beside.png")  # in neither split
    cfg = folder_config(tmp_path / "pictures", tmp_path / "cache", "data.dataset.image_size=16")
    images, labels = load_split(cfg.data, train=True)
    assert images.shape == (12, 1, 16, 16) and labels.tolist() == [0] * 6 + [1] * 6
    images, labels = load_split(cfg.data, train=False)
    assert images.shape == (4, 1, 16, 16) and labels.tolist() == [0, 0, 1, 1]


def test_images_at_the_top_level_have_no_labels_and_the_uses_of_labels_refuse(tmp_path):
    rng = np.random.default_rng(2)
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "more").mkdir()  # one subfolder is no classes either
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(tmp_path / "more" / "x.png")
    cfg = folder_config(tmp_path, tmp_path.parent / f"{tmp_path.name}-cache", "data.dataset.image_size=16")
    images, labels = load_split(cfg.data, train=True)
    assert len(images) == 9 and (labels == UNLABELLED).all()
    cfg.data.exclude_classes = [1]
    assert refusal(cfg.data).startswith("data.exclude_classes=[1]: the images have no labels (a folder of images is "
                                        "labelled by its class subfolders, two or more;")


def test_mixed_sizes_modes_and_formats_are_converted(tmp_path):
    """Gray, palette, RGBA, 1-bit and 16-bit images of every size and aspect, as png, jpg, bmp, gif, webp and
    tiff: each converted to the mode (L or RGB), its shorter side resized to image_size and centre-cropped."""
    rng = np.random.default_rng(3)
    colour = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    images = {"wide.png": Image.fromarray(colour),
              "tall.jpg": Image.fromarray(colour).transpose(Image.Transpose.ROTATE_90),
              "small.bmp": Image.fromarray(colour[:8, :8]), "palette.gif": Image.fromarray(colour).convert("P"),
              "alpha.webp": Image.fromarray(colour).convert("RGBA"), "bits.tiff": Image.fromarray(colour).convert("1"),
              "gray.png": Image.fromarray(colour).convert("L")}
    (tmp_path / "pictures").mkdir()
    for name, image in images.items():
        image.save(tmp_path / "pictures" / name)
    resize = transforms.Compose([transforms.Resize(16), transforms.CenterCrop(16)])
    for channels, mode in ((1, "L"), (3, "RGB")):
        data = ImageFolderImages(str(tmp_path / "pictures"), train=True, channels=channels, image_size=16,
                                 test_fraction=0.1, cache_dir=None)
        test = ImageFolderImages(str(tmp_path / "pictures"), train=False, channels=channels, image_size=16,
                                 test_fraction=0.1, cache_dir=None)
        assert data.data.shape == ((6, 16, 16) if channels == 1 else (6, 16, 16, 3)) and len(test.data) == 1
        for name, pixels in zip(data.files + test.files, torch.cat([data.data, test.data])):
            with Image.open(tmp_path / "pictures" / name) as image:  # read back: jpg and webp are lossy
                expected = np.array(resize(image.convert(mode)))
            assert np.array_equal(pixels.numpy(), expected), name


def test_the_decoded_images_are_cached_outside_the_folder_and_read_back(tmp_path, monkeypatch):
    folder, cache = tmp_path / "pictures", tmp_path / "cache"
    write_classes(folder, np.random.default_rng(4), per_class=5)
    before = listing(folder)
    first = ImageFolderImages(str(folder), image_size=16, cache_dir=str(cache))
    assert len(list(cache.glob("*.pt"))) == 1 and listing(folder) == before

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    with monkeypatch.context() as patched:
        patched.setattr(image_folder, "decode", no_decoding)
        again = ImageFolderImages(str(folder), image_size=16, cache_dir=str(cache))
        assert torch.equal(first.data, again.data) and torch.equal(first.targets, again.targets)
        with pytest.raises(AssertionError, match="decoded again"):  # another size: another cache file
            ImageFolderImages(str(folder), image_size=8, cache_dir=str(cache))
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(folder / "a" / "000.png")  # a changed file: decoded anew
    changed = ImageFolderImages(str(folder), image_size=16, cache_dir=str(cache))
    assert len(list(cache.glob("*.pt"))) == 2 and not torch.equal(changed.data, first.data)


def test_a_read_only_folder_is_only_read(tmp_path):
    """Training and loading write nothing into the folder (its listing, sizes and times are unchanged), also
    when it cannot be written (as root, permissions do not stop a write: the listing is the proof)."""
    folder = tmp_path / "pictures"
    write_classes(folder, np.random.default_rng(5), per_class=16)
    before = listing(folder)
    for path in [*folder.rglob("*"), folder]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        cfg = folder_config(folder, tmp_path / "cache", "data.dataset.image_size=16", *SMALL, "trainer.epochs=1")
        metrics = train(cfg, tmp_path / "run")
        assert math.isfinite(metrics["test_elbo"])
        assert listing(folder) == before
    finally:
        for path in [folder, *folder.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)


def test_each_bad_folder_is_refused_in_one_line(tmp_path, caplog):
    def message(folder, *overrides):
        return refusal(folder_config(folder, tmp_path / "cache", *overrides).data)

    assert message(tmp_path / "nowhere") == f"data.root={tmp_path / 'nowhere'}: no such folder; give data.root=<the " \
                                            "folder of your images>"
    (tmp_path / "file.png").write_bytes(b"")
    assert message(tmp_path / "file.png").startswith(f"data.root={tmp_path / 'file.png'}: not a folder")
    (tmp_path / "empty").mkdir()
    assert message(tmp_path / "empty") == (f"data.root={tmp_path / 'empty'}: the folder holds no files; put your "
                                           "images in it")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no pictures here")
    assert message(tmp_path / "notes").startswith(f"data.root={tmp_path / 'notes'}: none of its 1 files is an image")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"not a png")
    (tmp_path / "broken" / "b.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    assert message(tmp_path / "broken").startswith(f"data.root={tmp_path / 'broken'}: none of its 2 image files can "
                                                   "be read")
    write_classes(tmp_path / "few", np.random.default_rng(6), per_class=1)
    assert message(tmp_path / "few", "data.dataset.test_fraction=0.1") == (
        f"data.dataset.test_fraction=0.1: of the 2 images under {tmp_path / 'few'} it holds out 0, which leaves an "
        "empty split")


def test_a_corrupt_file_among_good_ones_is_left_out_with_a_warning(tmp_path, caplog):
    folder = tmp_path / "pictures"
    write_classes(folder, np.random.default_rng(7), per_class=5)
    (folder / "a" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    good = (folder / "a" / "000.png").read_bytes()
    (folder / "b" / "cut.png").write_bytes(good[: len(good) // 2])  # a truncated PNG: opens, then fails to decode
    with caplog.at_level(logging.WARNING, logger="vae.image_folder"):
        data = ImageFolderImages(str(folder), image_size=16, test_fraction=0.1, cache_dir=str(tmp_path / "cache"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(
        f"2 of the 12 image files under {folder} cannot be read and are left out; the first: "
        f"{folder / 'a' / 'bad.png'}")
    assert len(data.data) == 9 and "a/bad.png" not in map(str, data.files)
    caplog.clear()
    image_folder.WARNED.clear()  # once per process and folder: as in a new run
    with caplog.at_level(logging.WARNING, logger="vae.image_folder"):  # from the cache: the same warning
        ImageFolderImages(str(folder), image_size=16, test_fraction=0.1, cache_dir=str(tmp_path / "cache"))
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == warnings


def test_images_larger_than_the_memory_are_refused_before_decoding(tmp_path, monkeypatch):
    write_classes(tmp_path / "pictures", np.random.default_rng(8), per_class=4)
    monkeypatch.setattr(image_folder, "available_memory", lambda: 5000)
    monkeypatch.setattr(image_folder, "decode", lambda *args, **kwargs: pytest.fail("decoded"))
    message = refusal(folder_config(tmp_path / "pictures", tmp_path / "cache", "data.dataset.channels=3",
                                    "data.dataset.image_size=64").data)
    assert message == (f"data.root={tmp_path / 'pictures'}: its 8 images of (64, 64, 3) need 0.1 MiB of memory, more "
                       "than the 0.0 MiB available; use a smaller data.dataset.image_size or fewer images")


def test_an_image_size_the_networks_cannot_take_is_refused_in_one_line_before_any_directory(tmp_path):
    with pytest.raises(ConfigError) as error:
        check_config(compose_config("data=image_folder", "data.dataset.image_size=30", "model.channels=[32,64]"))
    assert str(error.value) == ("data.dataset.image_size=30 with model.channels=[32, 64]: each of the 2 stride-2 "
                                "layers halves the image, so its side must be divisible by 4, e.g. "
                                "data.dataset.image_size=32")
    write_classes(tmp_path / "pictures", np.random.default_rng(9), per_class=4)
    (tmp_path / "work").mkdir()
    result = subprocess.run([sys.executable, str(PROJECT_DIR / "train.py"), "data=image_folder",
                             f"data.root={tmp_path / 'pictures'}", "data.dataset.image_size=18",
                             "model.channels=[8,16,32]"],
                            cwd=tmp_path / "work", capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr == (
        "error: data.dataset.image_size=18 with model.channels=[8, 16, 32]: each of the 3 stride-2 layers halves the "
        "image, so its side must be divisible by 8, e.g. data.dataset.image_size=16\n"), result.stderr
    assert list((tmp_path / "work").iterdir()) == []


def test_colour_images_refuse_the_bernoulli_likelihood_before_any_work():
    with pytest.raises(ConfigError, match="^likelihood=bernoulli with 3-channel images: binarizing colour"):
        check_config(compose_config("data=image_folder", "data.dataset.channels=3"))
    check_config(compose_config("data=image_folder", "data.dataset.channels=3", "likelihood=discretized_logistic"))


@pytest.mark.skipif(mnist_root() is None, reason="needs MNIST under VAE_DATA_ROOT")
def test_mnist_written_as_png_files_reads_back_byte_for_byte(tmp_path):
    """The first 256 training and 256 test digits of MNIST, written as PNG files in train/<digit>/ and
    test/<digit>/, read back through data=image_folder: the same bytes as data=mnist's images (in the
    folder's order: by class, then by file name) and the same labels."""
    count, folder = 256, tmp_path / "mnist_png"
    for split in ("train", "test"):
        mnist = MNIST(str(mnist_root()), train=split == "train")
        for index, (pixels, label) in enumerate(zip(mnist.data[:count], mnist.targets[:count])):
            (folder / split / str(int(label))).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.numpy()).save(folder / split / str(int(label)) / f"{index:05d}.png")
    cfg = folder_config(folder, tmp_path / "cache", "data.dataset.image_size=28")
    for train_split in (True, False):
        mnist = MNIST(str(mnist_root()), train=train_split)
        order = torch.argsort(mnist.targets[:count], stable=True)  # by class, then by index: the folder's order
        data = ImageFolderImages(str(folder), train=train_split, image_size=28, cache_dir=str(tmp_path / "cache"))
        assert data.data.dtype == torch.uint8 and torch.equal(data.data, mnist.data[:count][order])
        assert torch.equal(data.targets, mnist.targets[:count][order])
        images, labels = load_split(cfg.data, train=train_split)
        expected_images, expected_labels = load_split(compose_config("data=mnist").data, train=train_split)
        assert torch.equal(images, expected_images[:count][order])
        assert torch.equal(labels, expected_labels[:count][order])


@pytest.mark.skipif(mnist_root() is None, reason="needs MNIST under VAE_DATA_ROOT")
def test_mnist_written_as_png_files_reproduces_the_test_elbo_of_data_mnist(tmp_path):
    """The first 512 training digits and all 10,000 test digits of MNIST, written as PNG files named by
    their zero-padded index in train/ and test/ (no class folders: unlabelled, in MNIST's order), and
    trained on through data=image_folder from seed 0: every number of metrics.jsonl (train and test
    ELBO, recon, KL, each epoch; all but the timings) equals that of `data=mnist data.subset=512`. The files are
    written by tools/mnist_as_png.py, as for experiment=image_folder/mnist_png."""
    count, folder = 512, tmp_path / "mnist_png"
    mnist_as_png.write(folder, mnist_root(), count)  # `python -m tools.mnist_as_png <folder> 512`
    options = [*SMALL, "data.batch_size=64", "trainer.epochs=1"]  # 8 steps
    runs = {"mnist": ["data=mnist", f"data.subset={count}"],
            "image_folder": ["data=image_folder", f"data.root={folder}", "data.dataset.channels=1",
                             "data.dataset.image_size=28", f"data.dataset.cache_dir={tmp_path / 'cache'}"]}
    for train_split in (True, False):  # the same pixels, in the same order (the folder's images are unlabelled)
        images, labels = load_split(compose_config(*runs["image_folder"]).data, train=train_split)
        assert torch.equal(images, load_split(compose_config(*runs["mnist"]).data, train=train_split)[0])
        assert len(images) == (count if train_split else 10_000) and (labels == UNLABELLED).all()
    metrics = {}
    for name, data in runs.items():
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        train(compose_config(*data, *options), tmp_path / name)
        lines = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        timings = ("seconds", "test_seconds", "wall_time")
        metrics[name] = [{key: value for key, value in line.items() if key not in timings} for line in lines]
    assert [line["epoch"] for line in metrics["mnist"]] == [0, 1]
    assert all(math.isfinite(line[key]) for line in metrics["mnist"] for key in ("test_elbo", "test_recon", "test_kl"))
    assert metrics["image_folder"] == metrics["mnist"]  # exactly: the same numbers, not close ones


# --- every evaluation task on models trained by train.py on generated folders ---------------------------------------

TASK_OPTIONS = {  # small settings of each task: seconds each
    "likelihood": ["task.num_particles=10", "task.max_images=16"],
    "generate": ["task.num_samples=16", "task.num_images=8", "task.num_pairs=2", "task.steps=4",
                 "task.classifier_epochs=1", "task.scored_samples=32"],
    "represent": ["task.max_iter=50"],
    "anomaly": ["task.num_particles=10", "task.max_images=16"],
    "impute": ["task.max_images=8", "task.steps=4", "task.burn_in=1", "task.num_particles=10", "task.fit_steps=5",
               "task.batch_size=8", "task.masks=[top_half]"],
    "pixels": ["task.max_images=16"],
}
FOLDERS = {  # a generated folder: gray with a seeded split, colour of other sizes with train/ and test/ (the gray
    # run's likelihood is a Gaussian, not the Bernoulli: task=pixels counts bits of gray levels, which binarized
    # pixels have not; the Bernoulli trains on a folder in the tests above)
    "gray": ([], "likelihood=gaussian"),
    "colour": (["data.dataset.channels=3"], "likelihood=discretized_logistic"),
}


@pytest.fixture(scope="module", params=list(FOLDERS))
def folder_run(request, tmp_path_factory):
    """(the run directory, the folder): `python train.py data=image_folder data.root=<folder> trainer=smoke ...`
    on 64 generated images of two classes."""
    tmp = tmp_path_factory.mktemp(request.param)
    rng = np.random.default_rng(10)
    if request.param == "gray":
        write_classes(tmp / "pictures", rng, per_class=32)
    else:
        write_classes(tmp / "pictures" / "train", rng, per_class=24, size=(20, 24), mode="RGB")
        write_classes(tmp / "pictures" / "test", rng, per_class=8, size=(24, 20), mode="RGB")
    before = listing(tmp / "pictures")
    overrides, likelihood = FOLDERS[request.param]
    command = [sys.executable, str(PROJECT_DIR / "train.py"), "data=image_folder", f"data.root={tmp / 'pictures'}",
               "trainer=smoke", "data.dataset.image_size=16", f"data.dataset.cache_dir={tmp / 'cache'}", likelihood,
               *overrides, *SMALL, "threads=1", f"hydra.run.dir={tmp / 'run'}"]
    result = subprocess.run(command, cwd=tmp, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert listing(tmp / "pictures") == before
    return tmp / "run", tmp / "pictures"


@pytest.mark.parametrize("task", list(TASK_OPTIONS))
def test_every_task_runs_on_a_model_trained_on_a_folder(folder_run, task, tmp_path):
    run_dir, folder = folder_run
    before = listing(folder)
    cfg = compose_config(f"run={run_dir}", f"task={task}", "device=cpu", *TASK_OPTIONS[task], config_name="evaluate")
    metrics = evaluate_module.evaluate(cfg, tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text())["run"] == str(run_dir)
    assert listing(folder) == before
    if task == "likelihood":
        assert math.isfinite(metrics["nll"])
    if task == "represent":
        assert 0 <= metrics["linear_probe_accuracy"] <= 1
    if task == "generate":
        assert (tmp_path / "samples.png").is_file() and 0 <= metrics["classifier_test_accuracy"] <= 1


def test_python_evaluate_runs_on_a_folder_run(folder_run, tmp_path):
    """The command line: `python evaluate.py run=<run> task=...` (with VAE_DATA_ROOT set elsewhere, the run's
    folder is still its data)."""
    run_dir, _ = folder_run
    result = subprocess.run([sys.executable, str(PROJECT_DIR / "evaluate.py"), f"run={run_dir}", "task=likelihood",
                             *TASK_OPTIONS["likelihood"], "device=cpu", "threads=1",
                             f"hydra.run.dir={tmp_path / 'eval'}"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "VAE_DATA_ROOT": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert math.isfinite(json.loads((tmp_path / "eval" / "metrics.json").read_text())["nll"])


def test_the_tasks_that_need_labels_refuse_a_run_without_them(tmp_path):
    rng = np.random.default_rng(11)
    (tmp_path / "pictures").mkdir()
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(tmp_path / "pictures" / f"{i:02d}.png")
    train(folder_config(tmp_path / "pictures", tmp_path / "cache", "data.dataset.image_size=16", *SMALL,
                        "trainer.epochs=1"), tmp_path / "run")

    def evaluate(task, *options):
        cfg = compose_config(f"run={tmp_path / 'run'}", f"task={task}", "device=cpu", *options, config_name="evaluate")
        return evaluate_module.evaluate(cfg, tmp_path / task)

    for task, says in (("represent", "task=represent: the linear probe and the scatter read labels, and the images "
                                     "have no labels"),
                       ("generate", "task.classifier_epochs=1: the sample-quality classifier learns labels, and the "
                                    "images have no labels")):
        with pytest.raises(ConfigError) as error:
            evaluate(task, *TASK_OPTIONS[task])
        assert str(error.value).startswith(says) and "\n" not in str(error.value), str(error.value)
    metrics = evaluate("generate", *TASK_OPTIONS["generate"], "task.classifier_epochs=0")
    assert "classifier_test_accuracy" not in metrics and (tmp_path / "generate" / "samples.png").is_file()
    metrics = evaluate("anomaly", *TASK_OPTIONS["anomaly"])  # no held-out class: the outlier sets only
    assert {row["anomalies"] for row in metrics["detection"]} == {"noise", "inverted"}
