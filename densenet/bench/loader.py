"""Input pipeline: our training loader against torchvision's reference loader, same files and settings.

    # no --root: 100 synthetic ImageNet-sized JPEGs, written and linked into a temporary tree
    python -m densenet.bench loader --workers 2 --batch-size 64 --image-size 224
    # a flat folder of sample JPEGs named <class>_*.JPEG (such as the 100-image ImageNet sample)
    python -m densenet.bench loader --root SAMPLES --workers 2 --batch-size 64 --image-size 224
    # keep the tree for later runs, then point --root at it (or at a real ImageNet root)
    python -m densenet.bench loader --root SAMPLES --make-tree /tmp/loader-tree --workers 2
    python -m densenet.bench loader --root /datasets/imagenet --workers 16 --batch-size 256 --json loader.json
    # the device-decode mode on the CPU device (on a CUDA machine it is measured by default)
    python -m densenet.bench loader --decode cpu,device

Rows, each in a fresh process per repeat, interleaved so that a noisy machine's drift hits them
alike:

* torchvision (the reference of the ratio column): ``torchvision.datasets.ImageFolder`` over
  ROOT/train with the reference training preset (RandomResizedCrop, RandomHorizontalFlip,
  PILToTensor, ConvertImageDtype, Normalize on fully decoded images), in a DataLoader as the
  reference trainer builds it: shuffled, the same workers and batch size, pin_memory on CUDA;
* ours, decode cpu: ``data.build_train_loader`` (uint8 batches; crop drawn from the JPEG header,
  draft decode where it helps, crop-only resize);
* ours, decode device: ``build_train_loader(decode_on=device)``: the workers read bytes and draw crops,
  the device decodes and resizes the batch (measured by default when CUDA is present).

Each run takes ``--warmup`` batches (worker start-up, page cache) and then times ``--batches``
batches as a training loop would take them: each moved to the device without blocking (a no-op for
device-decoded batches), with the device synchronised at both ends of the window. It reports images
per second of wall time and the CPU time per image of the main process (the training process, whose
CPU a training step needs) and of the whole process tree (main and workers). The table gives the
median over repeats with the min-max spread, and the machine's load average before and after.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

from . import jpeg_tree
from .common import print_table, run_child, spread, write_json

DECODES = ("cpu", "device")


@dataclass(frozen=True)
class LoaderConfig:
    impl: str  # "torchvision" | "ours"
    decode: str  # "cpu" | "device"; torchvision decodes on the CPU
    root: str
    workers: int
    batch_size: int
    image_size: int
    warmup: int  # batches before the timed window
    batches: int  # batches timed
    device: str  # where the batches go, as the trainer would move them

    def label(self) -> str:
        return "torchvision" if self.impl == "torchvision" else f"ours ({self.decode} decode)"


# --- the measured process ----------------------------------------------------------------------------------

def _tree_cpu_seconds() -> float:
    """CPU seconds of this process, its live children (the loader workers, read from /proc) and its
    reaped children. Live children are found by their parent pid; outside Linux only this process
    and reaped children count."""
    times = os.times()
    total = times.user + times.system + times.children_user + times.children_system
    me, tick = os.getpid(), os.sysconf("SC_CLK_TCK")
    try:
        entries = os.listdir("/proc")
    except OSError:
        return total
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == me:  # fields[1] is the parent pid; [11] and [12] are user and system ticks
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _reference_batches(cfg: LoaderConfig, pin: bool) -> Iterator[Tuple[Any, Any]]:
    import torch
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from .pipeline import reference_train_preset

    dataset = ImageFolder(os.path.join(cfg.root, "train"), transform=reference_train_preset(cfg.image_size))
    generator = torch.Generator().manual_seed(0)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.workers,
                        pin_memory=pin, drop_last=True, generator=generator)
    while True:  # a new pass (and new workers) per epoch, as the reference trainer does
        yield from loader


def _our_batches(cfg: LoaderConfig, pin: bool, stats: Dict[str, Any]) -> Iterator[Tuple[Any, Any]]:
    from data import TrainTransform, build_train_loader

    loader = build_train_loader(cfg.root, TrainTransform(cfg.image_size), batch_size=cfg.batch_size,
                                workers=cfg.workers, seed=0, pin_memory=pin,
                                decode_on=cfg.device if cfg.decode == "device" else None)
    if loader.decoder is not None:
        stats["decoded"] = loader.decoder.counts
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        for images, targets, _ in loader:
            yield images, targets
        epoch += 1


def child(payload: Dict[str, Any]) -> Dict[str, Any]:
    """One loader in this process: warm-up batches, then the timed window."""
    import torch

    cfg = LoaderConfig(**payload)
    device = torch.device(cfg.device)
    pin = device.type == "cuda"
    stats: Dict[str, Any] = {}
    batches = _reference_batches(cfg, pin) if cfg.impl == "torchvision" else _our_batches(cfg, pin, stats)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(cfg.warmup):
        next(batches)
    sync()
    wall, main_cpu, tree_cpu = time.perf_counter(), time.process_time(), _tree_cpu_seconds()
    images = 0
    for _ in range(cfg.batches):
        x, y = next(batches)
        x.to(device, non_blocking=True)
        y.to(device, non_blocking=True)
        images += x.shape[0]
    sync()
    wall = time.perf_counter() - wall
    main_cpu = time.process_time() - main_cpu
    tree_cpu = _tree_cpu_seconds() - tree_cpu
    result = {"images": images, "seconds": wall, "images_per_s": images / wall,
              "main_cpu_ms_per_image": 1000 * main_cpu / images, "total_cpu_ms_per_image": 1000 * tree_cpu / images}
    if "decoded" in stats:
        result["decoded"] = dict(stats["decoded"])
    return result


# --- the command -----------------------------------------------------------------------------------------------

def _decodes(text: str) -> List[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or any(v not in DECODES for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give a comma-separated list of {', '.join(DECODES)}")
    return values


def add_parser(sub) -> None:
    p = sub.add_parser("loader", help="input pipeline: our train loader vs ImageFolder + torchvision's preset",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=None, help="ImageNet-layout folder (ROOT/train/<class>/*.JPEG), or a flat "
                   "folder of sample JPEGs named <class>_*.JPEG, linked into a temporary tree "
                   "(default: 100 synthetic JPEGs of ImageNet's typical size, written for the run)")
    p.add_argument("--make-tree", metavar="DIR", default=None,
                   help="link the sample JPEGs (--root, or the synthetic ones) into an ImageNet layout at DIR, "
                        "keep it, and measure on it")
    p.add_argument("--copies", type=int, default=None,
                   help="links of each sample in a built tree (default: enough for one epoch to hold every "
                        "batch of a run)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="loader workers on every row")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--decode", type=_decodes, default=None,
                   help="our rows: cpu, device or both (default: cpu, plus device when CUDA is present)")
    p.add_argument("--device", default=None, help="cpu or cuda: where batches go and device decode runs "
                   "(default: cuda when available)")
    p.add_argument("--warmup", type=int, default=4, help="batches before the timed window")
    p.add_argument("--batches", type=int, default=30, help="batches timed per run")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per row")
    p.add_argument("--json", default=None, help="also write the rows as JSON to this file")
    p.set_defaults(run=run)


def _is_tree(root: Path) -> bool:
    return (root / "train").is_dir()


def _prepare_root(args: argparse.Namespace, workdir: Path) -> Tuple[Path, str]:
    """The ImageNet-layout root to measure on, and a note of where it came from."""
    if args.root:
        source = Path(args.root)
        if not source.is_dir():
            raise SystemExit(f"error: {args.root} is not a folder; pass --root with an ImageNet-layout folder or "
                             "a folder of sample JPEGs")
    else:
        source = jpeg_tree.write_synthetic_samples(workdir / "samples")
    if _is_tree(source) and not args.make_tree:
        return source, "given"
    if _is_tree(source):
        raise SystemExit(f"error: {source} is already an ImageNet layout; --make-tree wants a flat folder of samples")
    samples = jpeg_tree.sample_files(source)
    needed = (args.warmup + args.batches) * args.batch_size
    copies = args.copies or math.ceil(needed / len(samples)) + 1
    dest = Path(args.make_tree) if args.make_tree else workdir / "tree"
    root = jpeg_tree.make_tree(source, dest, copies)
    what = f"{source}" if args.root else "synthetic JPEGs"
    return root, f"{len(samples)} samples from {what} x {copies} links" + (" (kept)" if args.make_tree else "")


def run(args: argparse.Namespace) -> List[Dict[str, Any]]:
    import torch

    for name in ("workers", "batch_size", "image_size", "batches", "repeats"):
        if getattr(args, name) < (0 if name == "workers" else 1):
            raise SystemExit(f"error: --{name.replace('_', '-')} must be positive")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    decodes = args.decode or (["cpu", "device"] if device.startswith("cuda") else ["cpu"])
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        root, origin = _prepare_root(args, Path(tmp))
        return _measure(args, root, origin, device, decodes)


def _measure(args: argparse.Namespace, root: Path, origin: str, device: str, decodes: List[str]):
    train_images = jpeg_tree.count_images(root)
    per_epoch = train_images // args.batch_size
    common = dict(root=str(root), workers=args.workers, batch_size=args.batch_size, image_size=args.image_size,
                  warmup=args.warmup, batches=args.batches, device=device)
    configs = [LoaderConfig("torchvision", "cpu", **common)] + [LoaderConfig("ours", d, **common) for d in decodes]
    print(f"data {root} ({origin}): {train_images} train images, {per_epoch} batches an epoch; "
          f"{jpeg_tree.read_all(root) / 2**20:.0f} MiB read to warm the page cache", flush=True)
    if per_epoch < args.warmup + args.batches:
        print(f"  note: a run spans epochs ({args.warmup + args.batches} batches); the reference restarts its "
              "workers each epoch, as torchvision's trainer does", flush=True)
    load_before = os.getloadavg()
    results: Dict[LoaderConfig, List[Dict[str, Any]]] = {c: [] for c in configs}
    for r in range(args.repeats):
        for cfg in configs:
            res = run_child("loader", asdict(cfg))
            results[cfg].append(res)
            print(f"  repeat {r + 1}/{args.repeats}  {cfg.label():<22} {res['images_per_s']:8.1f} img/s  "
                  f"main cpu {res['main_cpu_ms_per_image']:.2f} ms/img  "
                  f"all cpu {res['total_cpu_ms_per_image']:.2f} ms/img", flush=True)
    load_after = os.getloadavg()

    ref = statistics.median(r["images_per_s"] for r in results[configs[0]])
    rows, table = [], []
    for cfg in configs:
        runs = results[cfg]
        med, lo, hi = spread([r["images_per_s"] for r in runs])
        main_cpu = statistics.median(r["main_cpu_ms_per_image"] for r in runs)
        total_cpu = statistics.median(r["total_cpu_ms_per_image"] for r in runs)
        decoded = runs[-1].get("decoded")
        row = {**asdict(cfg), "label": cfg.label(), "images_per_s": med, "images_per_s_min": lo,
               "images_per_s_max": hi, "speed_ratio": med / ref, "main_cpu_ms_per_image": main_cpu,
               "total_cpu_ms_per_image": total_cpu, "repeats": args.repeats, "decoded_last_run": decoded}
        rows.append(row)
        on_device = f"{decoded['device'] / max(1, sum(decoded.values())):.0%}" if decoded else "-"
        table.append([cfg.label(), f"{med:.1f}", f"{lo:.1f}-{hi:.1f}", f"{med / ref:.2f}",
                      f"{main_cpu:.2f}", f"{total_cpu:.2f}", on_device])
    print(f"\n{args.batch_size} x {args.image_size} px batches, {args.workers} workers, batches to {device}; "
          f"{args.warmup} warm-up + {args.batches} timed batches per run, {args.repeats} fresh processes per "
          f"row (median, min-max); load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print_table(["loader", "img/s", "spread", "vs torchvision", "main cpu ms/img", "all cpu ms/img",
                 "on device"], table)
    write_json(args.json, rows, {"data": str(root), "data_origin": origin, "train_images": train_images,
                                 "loadavg_before": load_before, "loadavg_after": load_after})
    return rows
