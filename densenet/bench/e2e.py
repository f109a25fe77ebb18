"""End to end: our trainer's steady-state images/s against a plain reference-style loop, same JPEGs.

    # a tree of real ImageNet JPEGs (a folder of samples named <class>_*.JPEG, such as the 100-image
    # ImageNet sample, linked into an ImageNet layout), then both image sizes, 3 repeats each
    python -m densenet.bench e2e --samples SAMPLES --make-tree /tmp/e2e-tree
    python -m densenet.bench e2e --root /tmp/e2e-tree --json e2e.json
    # or a temporary tree of 100 synthetic ImageNet-sized JPEGs (no --root, no --samples), one size only
    python -m densenet.bench e2e --image-size 64 --repeats 5

Ours is the real ``train_dist.py`` in a process of its own, with its defaults for this device and
only the model, data, image size, batch size, workers and step count set; its images/s and data-wait
share come from the per-step lines of its ``metrics.jsonl``. The reference is the loop of
torchvision's reference trainer written out plainly: torchvision's DenseNet, ``ImageFolder`` with
the reference training preset (RandomResizedCrop, RandomHorizontalFlip, PILToTensor,
ConvertImageDtype, Normalize, on fully decoded images), a DataLoader with the same batch size and
workers and pin_memory, DDP on a world of one (gloo on the CPU, NCCL on CUDA), SGD with Nesterov
momentum, the loss read back and top-1/top-5 computed every step. Both count the same way: a step
lasts from the end of the previous one (so waiting for data is in it), the first ``--warmup`` steps
are left out, and images/s is images over the summed duration of the remaining steps.

Runs alternate (ours first in odd repeats, the reference first in even ones), each in a fresh
process, so a slow drift of a shared machine hits both sides alike; the table gives the median over
repeats, the min-max spread, and the ratio ours / reference of the medians plus the spread of the
per-repeat ratios. The machine's load average before and after is printed and kept in the JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence

from . import jpeg_tree
from .common import fmt_bytes, peak_memory_bytes, print_table, run_child, spread, write_json

IMPLS = ("ours", "reference")


@dataclass(frozen=True)
class E2EConfig:
    impl: str
    root: str
    arch: str
    image_size: int
    batch_size: int
    workers: int
    warmup: int
    steps: int
    device: str

    @property
    def images_needed(self) -> int:
        return (self.warmup + self.steps) * self.batch_size


def default_steps(image_size: int) -> tuple:
    """(warm-up, timed) steps: about 40 s of timed training per run on 2 CPU cores at either size.
    At 224 px a densenet121 step of 32 images takes ~5 s there, at 64 px ~0.5 s. The warm-up covers
    the loader's workers starting and the first steps on the CPU, which are slower than later ones
    while the process's heap grows to its working size (torchvision's loop takes about five steps
    to settle at 224 px)."""
    if image_size >= 160:
        return 5, 8
    return 10, 50


# --- ours: the real trainer ---------------------------------------------------------------------------

def trainer_script() -> str:
    spec = importlib.util.find_spec("train_dist")
    if spec is None or spec.origin is None:
        raise RuntimeError("train_dist.py is not importable; install the project (pip install -e .)")
    return spec.origin


def clean_env() -> Dict[str, str]:
    """This process's environment without launcher variables, so the trainer starts as one process."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_SILENT="true")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "TORCHELASTIC_RESTART_COUNT"):
        env.pop(key, None)
    return env


def run_ours(cfg: E2EConfig, workdir: Path) -> Dict[str, Any]:
    out = workdir / "run"
    shutil.rmtree(out, ignore_errors=True)
    args = [sys.executable, trainer_script(), "--arch", cfg.arch, "--data", cfg.root, "--image-size",
            str(cfg.image_size), "--batch-size", str(cfg.batch_size), "--workers", str(cfg.workers),
            "--max-steps", str(cfg.warmup + cfg.steps), "--log-every", "1", "--output-dir", str(out),
            "--no-resume", "--wandb", "disabled", "--ckpt-every", "0", "--keep-epochs", "0",
            "--device", cfg.device]
    proc = subprocess.run(args, capture_output=True, text=True, env=clean_env())
    if proc.returncode != 0:
        raise RuntimeError(f"train_dist.py failed (status {proc.returncode}):\n{' '.join(args)}\n"
                           f"{(proc.stdout + proc.stderr)[-3000:]}")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if r["kind"] == "train"]  # --log-every 1: one line per step
    timed = [r for r in steps if r["step"] > cfg.warmup]
    if len(timed) != cfg.steps:
        raise RuntimeError(f"expected {cfg.steps} timed steps in {out / 'metrics.jsonl'}, found {len(timed)}")
    seconds = sum(r["step_time"] for r in timed)
    waiting = sum(r["data_wait"] * r["step_time"] for r in timed)
    shutil.rmtree(out, ignore_errors=True)
    return {"images_per_s": cfg.batch_size * cfg.steps / seconds, "data_wait": waiting / seconds,
            "step_s": seconds / cfg.steps, "peak_rss_bytes": max(r["max_mem_gib"] for r in timed) * 2**30,
            "step_times": [round(r["step_time"], 4) for r in steps]}


# --- the reference-style loop (runs in a fresh child process) ------------------------------------------

def child(payload: Dict[str, Any]) -> Dict[str, Any]:
    import torch
    import torch.distributed as dist
    import torchvision
    from torch.nn.parallel import DistributedDataParallel
    from torchvision import transforms as T

    cfg = E2EConfig(**payload)
    device = torch.device(cfg.device)
    torch.manual_seed(0)
    preset = T.Compose([
        T.RandomResizedCrop(cfg.image_size, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
        T.RandomHorizontalFlip(0.5),
        T.PILToTensor(),
        T.ConvertImageDtype(torch.float),
        T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])
    dataset = torchvision.datasets.ImageFolder(os.path.join(cfg.root, "train"), preset)
    with tempfile.TemporaryDirectory() as rendezvous:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                init_method=f"file://{rendezvous}/store", rank=0, world_size=1)
        try:
            sampler = torch.utils.data.distributed.DistributedSampler(dataset, shuffle=True)
            loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler,
                                                 num_workers=cfg.workers, pin_memory=True)
            model = getattr(torchvision.models, cfg.arch)(num_classes=len(dataset.classes)).to(device)
            model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
            criterion = torch.nn.CrossEntropyLoss()
            lr = 0.1 * cfg.batch_size / 256  # what our trainer uses for one process
            optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4, nesterov=True)
            model.train()
            waits: List[float] = []
            durations: List[float] = []  # of every step, warm-up included
            batches = iter(loader)
            previous_end = time.perf_counter()
            for step in range(cfg.warmup + cfg.steps):
                t0 = time.perf_counter()
                image, target = next(batches)
                waited = time.perf_counter() - t0
                image, target = image.to(device, non_blocking=True), target.to(device, non_blocking=True)
                output = model(image)
                loss = criterion(output, target)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                top5 = output.topk(5, dim=1).indices.eq(target.unsqueeze(1))  # the reference's accuracy meter
                _ = (loss.item(), top5[:, 0].float().mean().item(), top5.any(dim=1).float().mean().item())
                end = time.perf_counter()
                waits.append(waited)
                durations.append(end - previous_end)
                previous_end = end
        finally:
            dist.destroy_process_group()
    seconds = sum(durations[cfg.warmup:])
    return {"images_per_s": cfg.batch_size * cfg.steps / seconds, "data_wait": sum(waits[cfg.warmup:]) / seconds,
            "step_s": seconds / cfg.steps, "peak_rss_bytes": peak_memory_bytes(device),
            "step_times": [round(d, 4) for d in durations]}


def measure(cfg: E2EConfig, workdir: Path) -> Dict[str, Any]:
    if cfg.impl == "ours":
        return run_ours(cfg, workdir)
    return run_child("e2e", asdict(cfg), env=clean_env())


# --- the command ----------------------------------------------------------------------------------------

def add_parser(sub) -> None:
    p = sub.add_parser("e2e", help="end to end: our trainer vs a reference-style loop on the same JPEGs",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=None, help="ImageNet-layout folder (train/<class>/*.JPEG and val/); "
                   "default: a temporary tree built from --samples")
    p.add_argument("--make-tree", metavar="DIR", default=None,
                   help="only write a tree from --samples into DIR (for later --root DIR) and exit")
    p.add_argument("--samples", default=None, help="folder of sample JPEGs named <class>_*.JPEG (default: 100 "
                   "synthetic JPEGs of ImageNet's typical size, written for the run)")
    p.add_argument("--copies", type=int, default=24, help="links of each sample in its train folder")
    p.add_argument("--arch", default="densenet121")
    p.add_argument("--image-size", type=int, nargs="+", default=[224, 64])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=None, help="loader workers on both sides "
                   "(default: the trainer's default for one process)")
    p.add_argument("--warmup", type=int, default=None, help="steps left out at the start of each run "
                   "(default: 5 at 160 px and more, else 10)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default: 8 at 160 px and "
                   "more, else 50)")
    p.add_argument("--repeats", type=int, default=3, help="runs per side and image size")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--json", default=None, help="also write the rows as JSON to this file")
    p.set_defaults(run=run)


def _samples(args: argparse.Namespace, workdir: Path) -> Path:
    """--samples, or synthetic ImageNet-sized JPEGs written under workdir."""
    if not args.samples:
        return jpeg_tree.write_synthetic_samples(workdir / "samples")
    samples = Path(args.samples)
    if not samples.is_dir():
        raise SystemExit(f"error: no sample JPEG folder at {args.samples}; pass --samples DIR or --root DIR")
    return samples


def _check_args(args: argparse.Namespace) -> None:
    for name in ("batch_size", "repeats", "copies", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be positive, got {value}")
    for name in ("warmup", "workers"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise SystemExit(f"error: --{name} must not be negative, got {value}")
    if any(size < 32 for size in args.image_size):
        raise SystemExit(f"error: --image-size must be at least 32, got {args.image_size}")


def run(args: argparse.Namespace) -> List[Dict[str, Any]]:
    import torch

    from ..training.distributed import default_workers

    _check_args(args)
    if args.make_tree:
        with tempfile.TemporaryDirectory(prefix="densenet-e2e-") as tmp:  # holds synthetic samples, if any
            root = jpeg_tree.make_tree(_samples(args, Path(tmp)), Path(args.make_tree), args.copies)
        print(f"wrote {jpeg_tree.count_images(root)} train / {jpeg_tree.count_images(root, 'val')} val images "
              f"to {root}")
        return []
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    workers = args.workers
    if workers is None:
        from ..training.distributed import DistInfo
        workers = default_workers(DistInfo(0, 1, 0, torch.device(device), None, "single"))
    with tempfile.TemporaryDirectory(prefix="densenet-e2e-") as tmp:
        workdir = Path(tmp)
        root = Path(args.root) if args.root else jpeg_tree.make_tree(_samples(args, workdir), workdir / "tree",
                                                                     args.copies)
        if not (root / "train").is_dir():
            raise SystemExit(f"error: {root} has no train/ folder; give an ImageNet-layout --root")
        return _measure_all(args, root, workdir, device, workers)


def _measure_all(args: argparse.Namespace, root: Path, workdir: Path, device: str,
                 workers: int) -> List[Dict[str, Any]]:
    train_images = jpeg_tree.count_images(root)
    load_before = os.getloadavg()
    print(f"data {root}: {train_images} train images; {jpeg_tree.read_all(root) / 2**20:.0f} MiB read to warm "
          f"the page cache; load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}", flush=True)
    results: Dict[E2EConfig, List[Dict[str, Any]]] = {}
    configs: List[List[E2EConfig]] = []
    for size in args.image_size:
        warmup, steps = default_steps(size)
        warmup = warmup if args.warmup is None else args.warmup
        steps = steps if args.steps is None else args.steps
        pair = [E2EConfig(impl, str(root), args.arch, size, args.batch_size, workers, warmup, steps, device)
                for impl in IMPLS]
        if pair[0].images_needed > train_images:
            raise SystemExit(f"error: {warmup} + {steps} steps of {args.batch_size} images need "
                             f"{pair[0].images_needed} training images in one epoch; {root} has {train_images} "
                             "(use more --copies, fewer --steps, or a smaller --batch-size)")
        configs.append(pair)
    for pair in configs:
        for r in range(args.repeats):
            for cfg in (pair if r % 2 == 0 else pair[::-1]):
                res = measure(cfg, workdir)
                results.setdefault(cfg, []).append(res)
                print(f"  {cfg.image_size} px  repeat {r + 1}/{args.repeats}  {cfg.impl:>9}  "
                      f"{res['images_per_s']:.2f} img/s  data wait {100 * res['data_wait']:.0f}%  "
                      f"step {res['step_s']:.3f}s", flush=True)
    load_after = os.getloadavg()
    rows = _rows(configs, results, args.repeats)
    _print(rows, configs, args, device, workers, load_before, load_after)
    write_json(args.json, rows, {"load_average_before": load_before, "load_average_after": load_after,
                                 "train_images": train_images})
    return rows


def _rows(configs: Sequence[Sequence[E2EConfig]], results: Dict[E2EConfig, List[Dict[str, Any]]],
          repeats: int) -> List[Dict[str, Any]]:
    rows = []
    for ours, ref in configs:
        ref_med = statistics.median(r["images_per_s"] for r in results[ref])
        paired = [o["images_per_s"] / f["images_per_s"] for o, f in zip(results[ours], results[ref])]
        for cfg in (ours, ref):
            runs = results[cfg]
            med, lo, hi = spread([r["images_per_s"] for r in runs])
            rows.append({**asdict(cfg), "images_per_s": med, "images_per_s_min": lo, "images_per_s_max": hi,
                         "data_wait": statistics.median(r["data_wait"] for r in runs),
                         "step_s": cfg.batch_size / med,
                         "peak_rss_bytes": statistics.median(r["peak_rss_bytes"] for r in runs),
                         "ratio_to_reference": med / ref_med,
                         "paired_ratio_min": min(paired) if cfg is ours else 1.0,
                         "paired_ratio_max": max(paired) if cfg is ours else 1.0,
                         "repeats": repeats, "runs": runs})
    return rows


def _print(rows: List[Dict[str, Any]], configs: Sequence[Sequence[E2EConfig]], args: argparse.Namespace,
           device: str, workers: int, load_before: Sequence[float], load_after: Sequence[float]) -> None:
    table = []
    for row in rows:
        paired = (f"{row['paired_ratio_min']:.3f}-{row['paired_ratio_max']:.3f}" if row["impl"] == "ours" else "")
        table.append([f"{row['image_size']}", row["impl"], f"{row['images_per_s']:.2f}",
                      f"{row['images_per_s_min']:.2f}-{row['images_per_s_max']:.2f}",
                      f"{100 * row['data_wait']:.1f}%", f"{row['step_s']:.3f}", fmt_bytes(row["peak_rss_bytes"]),
                      f"{row['ratio_to_reference']:.3f}", paired])
    steps = ", ".join(f"{p[0].image_size} px: {p[0].warmup} warm-up + {p[0].steps} timed steps" for p in configs)
    print(f"\n{args.arch}, batch {args.batch_size}, {workers} loader workers, {device}; {steps} per run; "
          f"{args.repeats} runs per row, fresh processes, alternating (median, min-max); "
          f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print_table(["px", "impl", "img/s", "spread", "data wait", "step s", "peak rss", "ours/ref",
                 "per-repeat ratios"], table)
