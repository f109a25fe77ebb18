"""ImageNet's odd files decode, and broken files never stop a run: each is logged once with its
path, replaced by another sample, and flagged ``bad``. All files are real ones written here."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from _data_util import (build_imagefolder, small_jpeg, sample_files, write_cmyk, write_greyscale,
                        write_not_an_image, write_png_named_jpeg, write_truncated, write_zero_byte)

from data import build_eval_loader, build_train_loader
from data.decode import UnreadableImage, decode_rgb
from data.rng import key_generator
from data.transforms import EvalTransform, TrainTransform

BROKEN = {"truncated": write_truncated, "zero-byte": write_zero_byte, "not-an-image": write_not_an_image}


def test_greyscale_cmyk_and_png_named_jpeg_become_rgb(tmp_path):
    grey = write_greyscale(tmp_path / "grey.JPEG")
    cmyk = write_cmyk(tmp_path / "cmyk.JPEG")
    png = write_png_named_jpeg(tmp_path / "n02105855_2933.JPEG")
    assert Image.open(grey).mode == "L" and Image.open(cmyk).mode == "CMYK" and Image.open(png).format == "PNG"
    for path in (grey, cmyk, png):
        pixels = decode_rgb(path)
        assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
        assert EvalTransform(32, 36)(str(path), "x").shape == (3, 32, 32)
        assert TrainTransform(32)(str(path), "x", key_generator(0)).shape == (3, 32, 32)
    grey_pixels = decode_rgb(grey)
    assert np.array_equal(grey_pixels[..., 0], grey_pixels[..., 2])
    # the CMYK file holds the same picture as its RGB source, up to JPEG loss
    original = decode_rgb(small_jpeg(sample_files()[2], tmp_path / "rgb.JPEG")).astype(np.float32)
    assert np.abs(decode_rgb(cmyk).astype(np.float32) - original).mean() < 6


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_files_raise_unreadable_image_naming_the_file(tmp_path, kind):
    path = BROKEN[kind](tmp_path / f"{kind}.JPEG")
    for read in (lambda: decode_rgb(path), lambda: EvalTransform(32, 36)(str(path), str(path)),
                 lambda: TrainTransform(32)(str(path), str(path), key_generator(0))):
        with pytest.raises(UnreadableImage) as info:
            read()
        assert info.value.path == str(path)


@pytest.fixture
def tree_with_broken_files(tmp_path):
    wnids = build_imagefolder(tmp_path, num_classes=3, per_class=5, val_per_class=4, short_side=40)
    broken = []
    for split in ("train", "val"):
        for i, (kind, write) in enumerate(sorted(BROKEN.items())):
            broken.append(write(tmp_path / split / wnids[i] / f"broken_{kind}.JPEG"))
        write_cmyk(tmp_path / split / wnids[0] / "cmyk.JPEG")
        write_greyscale(tmp_path / split / wnids[1] / "grey.JPEG")
        write_png_named_jpeg(tmp_path / split / wnids[2] / "png.JPEG")
    return tmp_path, broken


@pytest.mark.parametrize("workers", [0, 2])
def test_training_replaces_logs_once_and_flags_broken_files(tree_with_broken_files, caplog, workers):
    root, broken = tree_with_broken_files
    train_broken = {str(p) for p in broken if "/train/" in str(p)}
    loader = build_train_loader(root, TrainTransform(32), batch_size=21, workers=workers, seed=0)
    assert loader.num_samples == 21 and len(loader) == 1  # 15 good + 3 odd + 3 broken: one full batch
    caplog.set_level(logging.WARNING, logger="data")
    flagged = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        for images, targets, bad in loader:
            assert images.shape == (21, 3, 32, 32) and images.dtype == torch.uint8
            assert targets.min() >= 0 and targets.max() < 3
            flagged.append(int(bad.sum()))
    assert flagged == [3, 3]  # every broken file is in every epoch, each replaced and flagged
    logged = [r.getMessage() for r in caplog.records if "unreadable image" in r.getMessage()]
    assert sorted(m.split(": ", 1)[1].split(" (")[0] for m in logged) == sorted(train_broken)


def test_replacement_is_deterministic(tree_with_broken_files):
    root, _ = tree_with_broken_files
    runs = []
    for workers in (0, 2):
        loader = build_train_loader(root, TrainTransform(32), batch_size=21, workers=workers, seed=3)
        loader.set_epoch(5)
        runs.append(list(loader))
    for (xa, ya, ba), (xb, yb, bb) in zip(*runs):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ba, bb)


def test_eval_keeps_going_and_counts_broken_files(tree_with_broken_files, caplog):
    root, broken = tree_with_broken_files
    caplog.set_level(logging.WARNING, logger="data")
    flagged = seen = 0
    for rank in range(2):
        loader = build_eval_loader(root, EvalTransform(32, 36), batch_size=4, workers=rank * 2,
                                   rank=rank, world_size=2)
        for _, targets, bad in loader:
            seen += len(targets)
            flagged += int(bad.sum())
    assert seen == loader.num_samples == 12 + 3 + 3
    assert flagged == 3
    assert sum("unreadable image" in r.getMessage() for r in caplog.records) == 3
