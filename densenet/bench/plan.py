"""What a recipe costs on a cluster: the schedule train_dist.py would run, and its GPU-hours.

    python -m densenet.bench plan --arch densenet121 --gpus 64 --recipe fast
    python -m densenet.bench plan --arch densenet169 --gpus 64 --recipe large-batch --batch-size 64 --throughput 1450
    python -m densenet.bench plan --arch densenet121 --gpus 8 --throughput-json gpu.json   # the GPU check's rows
    python -m densenet.bench plan --table --gpus 64 --throughput 1000   # four archs x three recipes, for the docs

Everything about the schedule is worked out by the trainer's own code (the config with its recipe,
the lr scaling rule, the crop of each epoch): global batch, peak lr, warmup, steps, epochs, images
and image-pixels seen. Any other train_dist.py flag may follow (``--epochs 60``, ``--aug-repeats 3``).

The cost needs a training throughput per GPU at 224 px, in images/s: ``--throughput`` as measured
anywhere, or ``--throughput-json`` (``python -m densenet.bench gpu --json``: the fastest row of our
model for the arch). It is a projection: a crop of S px is taken to cost (S/224)^2 of a 224 px one
(the compute of a convolutional network grows with the pixels), evaluation and data stalls are left
out, and the GPUs are assumed to scale perfectly. Figures measured on a GPU belong in
docs/benchmarks.md; this tool only multiplies them out.
"""
from __future__ import annotations

import argparse
import itertools
import json
from typing import Any, Dict, List, Optional, Sequence

from .common import print_table

IMAGENET_TRAIN = 1_281_167
REFERENCE_SIZE = 224
TABLE_ARCHS = ("densenet121", "densenet169", "densenet201", "densenet161")
TABLE_RECIPES = ("paper", "fast", "large-batch")


def plan(train_args: Sequence[str], gpus: int, train_images: int = IMAGENET_TRAIN,
         throughput: Optional[float] = None) -> Dict[str, Any]:
    """The schedule (and, with ``throughput`` at 224 px per GPU, the cost) of ``train_dist.py
    train_args`` on ``gpus`` processes."""
    from ..training.config import eval_crop_size, parse_config, train_sizes_of
    from ..training.optim import lr_scaling_rule, peak_lr
    from ..training.resolution import image_pixels

    cfg = parse_config(["--data", "plan", *train_args])
    global_batch = cfg.batch_size * gpus * cfg.accum_steps
    # An epoch as the samplers deal it: every image once, or DeiT's length with repeated augmentation.
    images_per_epoch = train_images if cfg.aug_repeats == 1 else (train_images // 256) * 256
    steps_per_epoch = images_per_epoch // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"a global batch of {global_batch} is more than the {images_per_epoch} images of an epoch")
    sizes = train_sizes_of(cfg)[:cfg.epochs]
    steps = steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    seen = steps * global_batch
    pixels = image_pixels(sizes, steps_per_epoch * global_batch)
    row: Dict[str, Any] = {
        "arch": cfg.arch, "recipe": cfg.recipe, "optimizer": cfg.optimizer, "gpus": gpus, "global_batch": global_batch,
        "peak_lr": peak_lr(cfg, global_batch), "lr_rule": "as given" if cfg.lr is not None else lr_scaling_rule(cfg),
        "warmup_epochs": cfg.warmup_epochs, "schedule": cfg.lr_schedule, "epochs": cfg.epochs,
        "steps_per_epoch": steps_per_epoch, "steps": steps, "images_seen": seen,
        "train_sizes": _describe_sizes(sizes), "eval_size": eval_crop_size(cfg),
        # the paper's 90 epochs at 224 px are the yardstick of the pixel column
        "image_pixels": pixels, "pixels_vs_paper": pixels / (90 * REFERENCE_SIZE ** 2 * steps_per_epoch * global_batch),
    }
    if throughput:
        # seconds per epoch at each size: images / (throughput at 224 px x (224 / S)^2 x GPUs)
        seconds = sum(steps_per_epoch * global_batch / (throughput * (REFERENCE_SIZE / s) ** 2 * gpus) for s in sizes)
        seconds *= steps / (steps_per_epoch * cfg.epochs)
        row.update(throughput_224=throughput, wall_hours=seconds / 3600, gpu_hours=seconds * gpus / 3600)
    return row


def _describe_sizes(sizes: Sequence[int]) -> str:
    """"160 px x 31, 192 px x 3, 224 px x 6": the epochs spent at each training crop, in order."""
    return ", ".join(f"{size} px x {len(list(run))}" for size, run in itertools.groupby(sizes))


def throughput_from_json(path: str, arch: str) -> float:
    """The fastest training-step row of our model for ``arch`` in a GPU-check JSON, images/s per GPU."""
    with open(path) as f:
        data = json.load(f)
    size = data.get("meta", {}).get("image_size", REFERENCE_SIZE)
    rows = [r for r in data.get("rows", []) if r.get("part") == "model" and r.get("impl") == "ours"
            and r.get("arch") == arch and r.get("images_per_s")]
    if not rows:
        raise SystemExit(f"error: {path} has no training-step row of ours for {arch}; run "
                         f"python -m densenet.bench gpu --json {path} on a GPU, or pass --throughput")
    best = max(r["images_per_s"] for r in rows)
    return best * (size / REFERENCE_SIZE) ** 2  # as if measured at 224 px


def _print(rows: List[Dict[str, Any]]) -> None:
    header = ["arch", "recipe", "optimizer", "GPUs", "global batch", "peak lr", "epochs", "steps", "images seen",
              "pixels vs paper", "training crops", "eval"]
    costed = any("gpu_hours" in r for r in rows)
    if costed:
        header += ["GPU-hours", "wall-clock h"]
    table = []
    for r in rows:
        line = [r["arch"], r["recipe"], r["optimizer"], r["gpus"], f"{r['global_batch']:,}",
                f"{r['peak_lr']:.4g} ({r['lr_rule']})", r["epochs"], f"{r['steps']:,}", f"{r['images_seen'] / 1e6:.1f}M",
                f"{r['pixels_vs_paper']:.2f}", r["train_sizes"], f"{r['eval_size']} px"]
        if costed:
            line += [f"{r['gpu_hours']:,.1f}", f"{r['wall_hours']:.2f}"]
        table.append(line)
    print_table(header, table)
    if costed:
        print(f"\nprojected from {rows[0]['throughput_224']:.0f} images/s per GPU at 224 px (a crop of S px costing "
              "(S/224)^2 of it; no evaluation, no data stalls, perfect scaling)")


def run(args: argparse.Namespace) -> List[Dict[str, Any]]:
    extra = [a for a in args.train_args if a != "--"]
    if args.batch_size:
        extra += ["--batch-size", str(args.batch_size)]
    rows = []
    archs = TABLE_ARCHS if args.table else (args.arch,)
    recipes = TABLE_RECIPES if args.table else (args.recipe,)
    for arch in archs:
        throughput = args.throughput
        if args.throughput_json:
            throughput = throughput_from_json(args.throughput_json, arch)
        for recipe in recipes:
            rows.append(plan(["--arch", arch, "--recipe", recipe, *extra], args.gpus, args.train_images, throughput))
    _print(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
        print(f"\nwrote {args.json}")
    return rows


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("plan", help="a recipe's schedule on N GPUs and, from a throughput, its GPU-hours",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="densenet121")
    p.add_argument("--recipe", default="paper", help="paper, modern, fast or large-batch")
    p.add_argument("--gpus", type=int, required=True, help="training processes (one per GPU)")
    p.add_argument("--batch-size", type=int, help="images per GPU per step (default: the recipe's, 32)")
    p.add_argument("--train-images", type=int, default=IMAGENET_TRAIN, help="images in the training split")
    p.add_argument("--throughput", type=float, help="training images/s per GPU at 224 px")
    p.add_argument("--throughput-json", help="read it from a GPU-check JSON (python -m densenet.bench gpu --json)")
    p.add_argument("--table", action="store_true", help="the four ImageNet archs x paper, fast, large-batch")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="more train_dist.py flags, after --")
    p.set_defaults(run=run)

