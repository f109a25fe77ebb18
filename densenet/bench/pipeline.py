"""Decode + augmentation throughput of one loader worker, against torchvision and the decode floor.

    python -m densenet.bench pipeline --root ../shared/imagenet-sample
    python -m densenet.bench pipeline --root /datasets/imagenet/train --limit 2000 --image-size 224

Three pipelines run in one process with one torch thread (what a DataLoader worker gets), over the
same files (already in the page cache after a warm-up pass), in alternating rounds so that a noisy
machine affects them alike. The median round is reported as images per second per worker, from the
process's CPU time (what a worker with a core of its own achieves; unlike wall time, it does not
count time the process spent waiting for a core on a busy machine) and from wall time:

* ours:        data.transforms.TrainTransform (crop chosen from the header, draft decode when the
               crop allows it, crop-only resize, CHW uint8 out);
* torchvision: its reference train preset on a full decode: pil_loader + RandomResizedCrop(224,
               bilinear, antialias) + RandomHorizontalFlip + PILToTensor + ConvertImageDtype(float)
               + Normalize;
* floor:       the full decode alone (Image.open + load, convert to RGB only when needed).

Files that cannot be decoded (empty, truncated, not an image) are found by one full decode of each
file before the warm-up, left out of every pipeline and counted in the output, as the loaders count them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import PIL
import torch
from PIL import Image

from data.decode import UnreadableImage, decode_rgb
from data.layouts import is_image_file
from data.rng import key_generator
from data.transforms import IMAGENET_MEAN, IMAGENET_STD, TrainTransform, choose_backend, pillow_simd_installed


def find_images(root: Path, limit: int) -> list[str]:
    files = sorted(str(p) for p in root.rglob("*") if p.is_file() and is_image_file(p.name))
    if not files:
        raise SystemExit(f"error: no *.JPEG/*.jpg/*.png files under {root}")
    step = max(1, len(files) // limit)
    return files[::step][:limit]


def readable_images(files: list[str]) -> tuple[list[str], list[UnreadableImage]]:
    """The files that decode, and why each of the others does not."""
    readable, unreadable = [], []
    for path in files:
        try:
            decode_rgb(path)
            readable.append(path)
        except UnreadableImage as err:
            unreadable.append(err)
    return readable, unreadable


def decode_floor(path: str) -> None:
    with Image.open(path) as image:
        image.load()
        if image.mode != "RGB":
            image.convert("RGB")


def reference_train_preset(size: int) -> Callable:
    """torchvision's reference training preset (references/classification/presets.py, no
    auto-augment): PIL image -> normalised float tensor."""
    from torchvision import transforms as T

    return T.Compose([
        T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
        T.RandomHorizontalFlip(0.5),
        T.PILToTensor(),
        T.ConvertImageDtype(torch.float),
        T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ])


def torchvision_preset(size: int) -> Callable[[str], torch.Tensor]:
    from torchvision.datasets.folder import pil_loader

    preset = reference_train_preset(size)
    return lambda path: preset(pil_loader(path))


def ours(size: int, backend: str) -> Callable[[str], np.ndarray]:
    transform = TrainTransform(size, backend=backend)
    counter = iter(range(2**62))

    return lambda path: transform(path, path, key_generator(0, next(counter)))


def time_pass(fn: Callable[[str], object], files: list[str]) -> tuple[float, float]:
    """Images per CPU second and per wall second."""
    cpu, wall = time.process_time(), time.perf_counter()
    for path in files:
        fn(path)
    return len(files) / (time.process_time() - cpu), len(files) / (time.perf_counter() - wall)


def add_parser(sub) -> None:
    parser = sub.add_parser("pipeline", help="one loader worker's decode + augmentation: ours vs torchvision's "
                            "preset vs the decode floor", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, type=Path, help="folder searched recursively for images")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--limit", type=int, default=1000, help="at most this many files (spread evenly)")
    parser.add_argument("--rounds", type=int, default=5, help="timed passes per pipeline (median reported)")
    parser.add_argument("--resize-backend", default="auto", choices=["auto", "torch", "pil"])
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    files, unreadable = readable_images(find_images(args.root, args.limit))
    skipped = f" ({len(unreadable)} unreadable, skipped: e.g. {unreadable[0]})" if unreadable else ""
    if not files:
        raise SystemExit(f"error: no readable images under {args.root}{skipped}")
    pipelines = {
        "ours": ours(args.image_size, args.resize_backend),
        "torchvision": torchvision_preset(args.image_size),
        "floor": decode_floor,
    }
    for fn in pipelines.values():  # warm-up: page cache, lazy imports, allocator
        for path in files[: min(len(files), 50)]:
            fn(path)
    rounds: dict[str, list[tuple[float, float]]] = {name: [] for name in pipelines}
    for _ in range(args.rounds):
        for name, fn in pipelines.items():
            rounds[name].append(time_pass(fn, files))
    median = {name: statistics.median(cpu for cpu, _ in values) for name, values in rounds.items()}
    median_wall = {name: statistics.median(wall for _, wall in values) for name, values in rounds.items()}

    simd = pillow_simd_installed()
    print(f"{len(files)} images from {args.root}{skipped}, output {args.image_size}px, 1 process, 1 torch thread, "
          f"median of {args.rounds} rounds")
    print(f"PIL {PIL.__version__} ({'pillow-simd' if simd else 'pillow'}), torch {torch.__version__}, "
          f"train resize backend: {choose_backend(args.resize_backend)}")
    print(f"{'pipeline':<14}{'img/s (cpu)':>12}{'ms/img':>9}{'img/s (wall)':>14}")
    for name, rate in median.items():
        print(f"{name:<14}{rate:>12.1f}{1000 / rate:>9.2f}{median_wall[name]:>14.1f}")
    speedup = median["ours"] / median["torchvision"]
    floor_ratio = median["floor"] / median["ours"]
    print(f"ours vs torchvision: {speedup:.2f}x faster; decode floor vs ours: {floor_ratio:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({
            "images": len(files), "unreadable": len(unreadable), "image_size": args.image_size, "rounds": args.rounds,
            "pil": PIL.__version__, "pillow_simd": simd, "torch": torch.__version__,
            "resize_backend": choose_backend(args.resize_backend),
            "images_per_cpu_second": median, "images_per_wall_second": median_wall,
            "rounds_cpu_wall": rounds,
            "ours_vs_torchvision": speedup, "floor_vs_ours": floor_ratio,
        }, indent=1))
    return 0
