"""The built-in demo dataset: a small ImageNet-layout tree of real JPEG files that a small DenseNet
learns within minutes on a laptop CPU.

    python -m data.demo OUT            # writes OUT/train/<class>/*.JPEG and OUT/val/<class>/*.JPEG
    python train_dist.py --data demo   # builds it under ./.cache/demo-data on first use

Ten classes of procedurally drawn patterns (discs, squares, triangles, rings, crosses, three kinds
of stripes, checkerboards, waves), each image with random colours, scale, position and noise, 64-96
px on a side. Every class covers the whole image with its pattern, so a random crop of any size
still shows it and the classes stay learnable under RandomResizedCrop. Images are a pure function
of (class, split, number), so every build is identical.

Writing is atomic (a temporary folder renamed into place), so several ranks may build it at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

DEMO_VERSION = 1
MARKER = "demo.json"
DEFAULT_CACHE_DIR = Path(".cache", "demo-data")
TRAIN_PER_CLASS = 50
VAL_PER_CLASS = 10
SPLIT_IDS = {"train": 0, "val": 1}

Painter = Callable[[ImageDraw.ImageDraw, np.random.Generator, int, int, tuple], None]


def _colours(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Background and foreground colours that differ clearly in brightness, so that shape, not
    colour, is what tells the classes apart."""
    while True:
        bg, fg = rng.integers(0, 256, size=(2, 3))
        if abs(int(bg.mean()) - int(fg.mean())) > 60:
            return tuple(int(v) for v in bg), tuple(int(v) for v in fg)


def _scattered(shape: Callable) -> Painter:
    def paint(draw, rng, w, h, fg):
        radius = rng.uniform(0.08, 0.16) * min(w, h)
        step = radius * 2.6
        for cy in np.arange(-radius, h + radius, step):
            for cx in np.arange(-radius, w + radius, step):
                jx, jy = rng.uniform(-0.3, 0.3, size=2) * radius
                shape(draw, cx + jx, cy + jy, radius, fg, rng)
    return paint


def _disc(draw, x, y, r, fg, rng):
    draw.ellipse([x - r, y - r, x + r, y + r], fill=fg)


def _square(draw, x, y, r, fg, rng):
    r *= 0.85
    draw.rectangle([x - r, y - r, x + r, y + r], fill=fg)


def _triangle(draw, x, y, r, fg, rng):
    turn = rng.uniform(-0.3, 0.3)
    draw.polygon([(x + r * math.sin(turn + k * 2 * math.pi / 3), y - r * math.cos(turn + k * 2 * math.pi / 3))
                  for k in range(3)], fill=fg)


def _ring(draw, x, y, r, fg, rng):
    draw.ellipse([x - r, y - r, x + r, y + r], outline=fg, width=max(2, int(r * 0.35)))


def _cross(draw, x, y, r, fg, rng):
    t = max(2.0, r * 0.3)
    draw.rectangle([x - r, y - t, x + r, y + t], fill=fg)
    draw.rectangle([x - t, y - r, x + t, y + r], fill=fg)


def _stripes(angle: float | None) -> Painter:
    def paint(draw, rng, w, h, fg):
        theta = rng.choice([-1, 1]) * math.pi / 4 if angle is None else angle
        period = rng.uniform(0.12, 0.25) * min(w, h)
        dx, dy = math.cos(theta), math.sin(theta)
        reach = w + h
        phase = rng.uniform(0, period)
        for offset in np.arange(-reach + phase, reach, period):
            # a band of half the period, perpendicular to (dx, dy), through offset * (dx, dy)
            cx, cy = w / 2 + offset * dx, h / 2 + offset * dy
            half = period / 4
            corners = [(cx + s * half * dx + t * reach * -dy, cy + s * half * dy + t * reach * dx)
                       for s, t in ((-1, -1), (-1, 1), (1, 1), (1, -1))]
            draw.polygon(corners, fill=fg)
    return paint


def _checkerboard(draw, rng, w, h, fg):
    cell = rng.uniform(0.12, 0.22) * min(w, h)
    x0, y0 = rng.uniform(0, cell, size=2)
    for i, y in enumerate(np.arange(-y0, h, cell)):
        for j, x in enumerate(np.arange(-x0, w, cell)):
            if (i + j) % 2 == 0:
                draw.rectangle([x, y, x + cell, y + cell], fill=fg)


def _waves(draw, rng, w, h, fg):
    period = rng.uniform(0.18, 0.3) * min(w, h)
    wavelength = rng.uniform(0.3, 0.6) * w
    amplitude = period * 0.3
    xs = np.linspace(0, w, 48)
    for y in np.arange(rng.uniform(0, period) - period, h + period, period):
        points = [(float(x), float(y + amplitude * math.sin(2 * math.pi * x / wavelength))) for x in xs]
        draw.line(points, fill=fg, width=max(2, int(period * 0.3)))


PAINTERS: dict[str, Painter] = {
    "checkerboard": _checkerboard,
    "crosses": _scattered(_cross),
    "diagonal_stripes": _stripes(None),
    "discs": _scattered(_disc),
    "horizontal_stripes": _stripes(math.pi / 2),
    "rings": _scattered(_ring),
    "squares": _scattered(_square),
    "triangles": _scattered(_triangle),
    "vertical_stripes": _stripes(0.0),
    "waves": _waves,
}
CLASSES = tuple(sorted(PAINTERS))


def make_image(class_name: str, split: str, number: int) -> Image.Image:
    """One demo image, a pure function of its arguments."""
    rng = np.random.default_rng([DEMO_VERSION, CLASSES.index(class_name), SPLIT_IDS[split], number])
    w, h = (int(v) for v in rng.integers(64, 97, size=2))
    bg, fg = _colours(rng)
    image = Image.new("RGB", (w, h), bg)
    PAINTERS[class_name](ImageDraw.Draw(image), rng, w, h, fg)
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels + rng.normal(0, rng.uniform(4, 16), size=pixels.shape)  # sensor-like noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def is_demo_tree(root: Path) -> bool:
    try:
        return json.loads((root / MARKER).read_text()).get("version") == DEMO_VERSION
    except (OSError, ValueError):
        return False


def write_demo(out: str | os.PathLike, *, train_per_class: int = TRAIN_PER_CLASS,
               val_per_class: int = VAL_PER_CLASS) -> Path:
    """Write the tree to ``out`` unless a complete one is already there. Safe to call from several
    processes at once: each writes a private temporary folder and the first rename wins."""
    out = Path(out)
    if is_demo_tree(out):
        return out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not a demo dataset (no {MARKER} of version "
                              f"{DEMO_VERSION}); choose an empty or new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        for split, count in (("train", train_per_class), ("val", val_per_class)):
            for name in CLASSES:
                folder = tmp / split / name
                folder.mkdir(parents=True)
                for number in range(count):
                    make_image(name, split, number).save(folder / f"{name}_{number:04d}.JPEG", quality=90)
        (tmp / MARKER).write_text(json.dumps({"version": DEMO_VERSION, "classes": list(CLASSES),
                                              "train_per_class": train_per_class,
                                              "val_per_class": val_per_class}, indent=1))
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        try:
            os.rename(tmp, out)
        except OSError:
            if not is_demo_tree(out):  # lost the race to something that is not a demo tree
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def build_demo(cache_dir: str | os.PathLike | None = None) -> Path:
    """The demo tree under ``cache_dir`` (default ./.cache/demo-data), written on first use."""
    root = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR) / f"imagenet-demo-v{DEMO_VERSION}"
    if not is_demo_tree(root):
        log.info("writing the demo dataset to %s", root)
        write_demo(root)
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the demo ImageNet-layout dataset.")
    parser.add_argument("out", type=Path, help="folder to create (OUT/train, OUT/val)")
    parser.add_argument("--train-per-class", type=int, default=TRAIN_PER_CLASS)
    parser.add_argument("--val-per-class", type=int, default=VAL_PER_CLASS)
    args = parser.parse_args(argv)
    try:
        root = write_demo(args.out, train_per_class=args.train_per_class, val_per_class=args.val_per_class)
    except FileExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    meta = json.loads((root / MARKER).read_text())
    print(f"demo dataset in {root}: {len(CLASSES)} classes, {meta['train_per_class']} train and "
          f"{meta['val_per_class']} val images per class")
    return 0


if __name__ == "__main__":
    sys.exit(main())
