"""ImageNet-layout trees of JPEG files for the benchmarks that read images from disk.

A tree is ``ROOT/train/<class>/*.JPEG`` and ``ROOT/val/<class>/*.JPEG`` made from a folder of sample
JPEGs named ``<class>_<anything>.JPEG`` (the ImageNet sample: ``n01440764_tench.JPEG``). Each sample
is linked ``copies`` times into its class's train folder, so an epoch is long enough to measure
steady state while the decode work stays that of real images. Where no sample images exist (a fresh
GPU machine), ``write_synthetic_samples`` makes JPEGs of ImageNet's typical size and file size.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path
from typing import List

# The 100-image ImageNet sample (one JPEG for every tenth class) where this project's machines keep it.
JPEG_SUFFIXES = (".jpeg", ".jpg")


def sample_files(samples: Path) -> List[Path]:
    files = sorted(p for p in Path(samples).iterdir() if p.suffix.lower() in JPEG_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"no *.JPEG files in {samples}; pass a folder of sample JPEGs named "
                                "<class>_<anything>.JPEG")
    return files


def make_tree(samples: Path, dest: Path, copies: int, val_classes: int = 16) -> Path:
    """Write the tree under ``dest`` (which must not exist yet, or be empty) and return ``dest``.

    Files are hard links where the file system allows it (no extra disk, the page cache holds each
    image once, as it would hold a real data set that fits in memory) and copies otherwise. The val
    split has one image for each of the first ``val_classes`` classes: the trainer evaluates once at
    its stop, and that evaluation is not what is measured.
    """
    if copies < 1:
        raise ValueError(f"copies must be positive, got {copies}")
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} exists and is not empty; give a new folder")
    for index, src in enumerate(sample_files(samples)):
        label = src.name.split("_")[0]
        train_dir = dest / "train" / label
        train_dir.mkdir(parents=True, exist_ok=True)
        for k in range(copies):
            _link_or_copy(src, train_dir / f"{src.stem}_{k:04d}.JPEG")
        if index < val_classes:
            (dest / "val" / label).mkdir(parents=True, exist_ok=True)
            _link_or_copy(src, dest / "val" / label / f"{src.stem}_val.JPEG")
    return dest


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(src, dst)


def count_images(root: Path, split: str = "train") -> int:
    return sum(1 for p in (Path(root) / split).rglob("*") if p.suffix.lower() in JPEG_SUFFIXES)


def read_all(root: Path) -> int:
    """Read every file once (each hard-linked file once), so that every measurement starts with the
    same warm page cache; returns the bytes read."""
    total, seen = 0, set()
    for p in Path(root).rglob("*"):
        if p.is_file():
            st = p.stat()
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += len(p.read_bytes())
    return total


def write_synthetic_samples(dest: Path, count: int = 100, seed: int = 0, size: tuple = (500, 375)) -> Path:
    """``count`` JPEGs of ImageNet's median size (500x375) and a similar file size (~80-100 KB at
    quality 92): smooth colour fields at four scales plus fine grain, which costs the decoder about
    what a photograph does (pure noise would cost more, flat colour much less)."""
    import numpy as np
    from PIL import Image

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(count):
        pixels = np.full((h, w, 3), 128.0, np.float32)
        for cells, amplitude in ((4, 90.0), (16, 60.0), (64, 40.0), (w // 3, 30.0)):
            coarse = rng.normal(0.0, 1.0, (max(2, cells * h // w), cells, 3))
            coarse = ((coarse - coarse.min()) / (np.ptp(coarse) + 1e-6) * 255).astype(np.uint8)
            smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.float32) / 255 - 0.5
            pixels += amplitude * smooth
        pixels += rng.normal(0.0, 12.0, (h, w, 1))
        buf = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=92)
        # Class names in the ImageNet style, so the files sort into 100 classes like the real sample.
        (dest / f"s{i:08d}_synthetic.JPEG").write_bytes(buf.getvalue())
    return dest

