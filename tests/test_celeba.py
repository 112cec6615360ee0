"""data=celeba (vae/celeba.py) on a stand-in of torchvision's CelebA layout: root/celeba/ with
img_align_celeba/*.jpg and the five list files. Each 178x218 face is centre-cropped to 148 and
resized to 64; the official partition is the split; the labels are none, or one attribute; the
decoded faces are cached outside the data root. torchvision checks the real list files' MD5 sums,
which a stand-in cannot have, so that check is skipped."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.datasets.celeba
from conftest import compose_config
from PIL import Image

import vae.image_folder as image_folder
from train import train
from vae.build import build_networks
from vae.celeba import CelebAImages
from vae.config import ConfigError, check_config
from vae.data import UNLABELLED, load_split

ATTRIBUTES = ["5_o_Clock_Shadow", "Arched_Eyebrows", "Smiling", "Male"] + [f"Attribute_{i}" for i in range(36)]
PARTITION = [0, 0, 0, 1, 2, 0, 0, 2, 1, 0, 0, 2]  # train, valid, test of each face, as list_eval_partition.txt


def celeba_standin(root, monkeypatch) -> tuple[np.ndarray, np.ndarray]:
    """Faces of 178x218 in root/celeba/, each a red frame around the centre 148x148 square, which is one colour
    of its own; returns (those colours (N, 3), the attributes (N, 40) in {0, 1})."""
    folder = root / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 200, (len(PARTITION), 3), dtype=np.uint8)
    attributes = rng.integers(0, 2, (len(PARTITION), len(ATTRIBUTES)))
    names = [f"{i + 1:06d}.jpg" for i in range(len(PARTITION))]
    for name, colour in zip(names, colours):
        face = np.zeros((218, 178, 3), np.uint8)
        face[..., 0] = 255
        face[35:183, 15:163] = colour  # the centre 148x148 square: rows (218 - 148) / 2.., columns (178 - 148) / 2..
        Image.fromarray(face).save(folder / "img_align_celeba" / name, quality=95)
    rows = [f"{name} {part}" for name, part in zip(names, PARTITION)]
    (folder / "list_eval_partition.txt").write_text("\n".join(rows) + "\n")
    (folder / "identity_CelebA.txt").write_text("\n".join(f"{name} {i % 3 + 1}" for i, name in enumerate(names)) + "\n")
    attr_rows = [f"{name} " + " ".join(f"{2 * a - 1:2d}" for a in row) for name, row in zip(names, attributes)]
    (folder / "list_attr_celeba.txt").write_text(f"{len(names)}\n" + " ".join(ATTRIBUTES) + " \n"  # a space at its end
                                                 + "\n".join(attr_rows) + "\n")
    (folder / "list_bbox_celeba.txt").write_text(f"{len(names)}\nimage_id x_1 y_1 width height\n"
                                                 + "\n".join(f"{name} 95 71 226 313" for name in names) + "\n")
    (folder / "list_landmarks_align_celeba.txt").write_text(
        f"{len(names)}\nlefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y rightmouth_x "
        "rightmouth_y\n" + "\n".join(f"{name} 69 109 106 113 77 142 73 152 108 154" for name in names) + "\n")
    monkeypatch.setattr(torchvision.datasets.celeba, "check_integrity", lambda *args, **kwargs: True)
    return colours, attributes


def listing(folder) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


def test_the_partition_is_the_split_and_each_face_is_its_centre_at_64(tmp_path, monkeypatch):
    colours, _ = celeba_standin(tmp_path / "data", monkeypatch)
    before = listing(tmp_path / "data")
    cfg = compose_config("data=celeba", f"data.root={tmp_path / 'data'}",
                         f"data.dataset.cache_dir={tmp_path / 'cache'}",
                         "data.dataset.download=false", "likelihood=discretized_logistic")
    check_config(cfg)
    for train_split, part in ((True, 0), (False, 2)):
        faces = CelebAImages(str(tmp_path / "data"), train=train_split, cache_dir=str(tmp_path / "cache"))
        chosen = [i for i, p in enumerate(PARTITION) if p == part]  # the files' order; the valid faces in neither
        assert faces.data.shape == (len(chosen), 64, 64, 3) and faces.data.dtype == torch.uint8
        assert (faces.targets == UNLABELLED).all()
        # the centre square alone, resized: its colour everywhere but at the edges (where JPEG's chroma bleeds
        # from the red frame), no red frame
        error = (faces.data.float() - torch.from_numpy(colours[chosen]).float()[:, None, None]).abs()
        assert error.mean() < 4 and error[:, 3:-3, 3:-3].max() < 12, (error.mean(), error[:, 3:-3, 3:-3].max())
        images, labels = load_split(cfg.data, train=train_split)
        assert torch.equal(images, faces.data.permute(0, 3, 1, 2).float() / 255) and torch.equal(labels, faces.targets)
    assert listing(tmp_path / "data") == before  # the data root is only read
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2  # one per split

    monkeypatch.setattr(image_folder, "decode", lambda *args, **kwargs: pytest.fail("decoded again"))
    again = CelebAImages(str(tmp_path / "data"), train=True, cache_dir=str(tmp_path / "cache"))
    assert len(again.data) == PARTITION.count(0)


def test_an_attribute_is_the_label_and_an_unknown_one_is_refused(tmp_path, monkeypatch):
    _, attributes = celeba_standin(tmp_path / "data", monkeypatch)
    faces = CelebAImages(str(tmp_path / "data"), train=True, attribute="Smiling", cache_dir=None)
    chosen = [i for i, p in enumerate(PARTITION) if p == 0]
    assert faces.targets.tolist() == attributes[chosen, ATTRIBUTES.index("Smiling")].tolist()
    with pytest.raises(ConfigError) as error:
        CelebAImages(str(tmp_path / "data"), train=True, attribute="Smiles", cache_dir=None)
    assert str(error.value).startswith("data.dataset.attribute='Smiles': not an attribute of CelebA; give null (no "
                                       "labels) or one of 5_o_Clock_Shadow, Arched_Eyebrows, Smiling, Male, ")
    assert "\n" not in str(error.value)


def test_a_model_trains_on_the_faces(tmp_path, monkeypatch):
    celeba_standin(tmp_path / "data", monkeypatch)
    cfg = compose_config("data=celeba", f"data.root={tmp_path / 'data'}",
                         f"data.dataset.cache_dir={tmp_path / 'cache'}",
                         "data.dataset.download=false", "likelihood=discretized_logistic", "model.channels=[8,16]",
                         "model.hidden_dim=32", "model.latent_dim=4", "data.batch_size=4", "trainer.epochs=1",
                         "device=cpu")
    metrics = train(cfg, tmp_path / "run")
    assert metrics["epoch"] == 1 and math.isfinite(metrics["test_elbo"])


def test_the_64px_networks_take_the_faces_down_to_4x4(tmp_path, monkeypatch):
    """model=conv_64px, the networks for 64x64 images: four stride-2 layers (64 -> 4), trained a step on the faces."""
    celeba_standin(tmp_path / "data", monkeypatch)
    cfg = compose_config("data=celeba", f"data.root={tmp_path / 'data'}", f"data.dataset.cache_dir={tmp_path / 'cache'}",
                         "data.dataset.download=false", "likelihood=discretized_logistic", "model=conv_64px",
                         "data.batch_size=4", "trainer.epochs=1", "device=cpu")
    check_config(cfg)
    encoder, decoder = build_networks(cfg, (3, 64, 64), torch.device("cpu"))
    assert encoder.features[6].out_channels == 256 and encoder.features[9].in_features == 256 * 4 * 4
    assert decoder.lift[-1].unflattened_size == (256, 4, 4)
    metrics = train(cfg, tmp_path / "run")
    assert metrics["epoch"] == 1 and math.isfinite(metrics["test_elbo"])
    with pytest.raises(ConfigError, match=r"^data.dataset.image_size=40 with model.channels=\[32, 64, 128, 256\]"):
        check_config(compose_config("data=celeba", "model=conv_64px", "data.dataset.image_size=40"))


def test_missing_files_are_named_in_one_line(tmp_path):
    cfg = compose_config("data=celeba", f"data.root={tmp_path}", "data.dataset.download=false")
    with pytest.raises(Exception) as error:
        load_split(cfg.data, train=True)
    message = str(error.value)
    assert message.startswith(f"CelebAImages is not under {tmp_path} and could not be downloaded")
    assert "\n" not in message
    assert f"Put the files in {tmp_path / 'celeba'}" in message and list(tmp_path.iterdir()) == []
