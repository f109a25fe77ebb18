"""The data index at ImageNet's size: time to the first training batch, and loader workers' memory.

    python -m densenet.bench index --make-tree 1281 --root /tmp/imagenet-links   # 1000 x 1281 + 50,000 val
    python -m densenet.bench index --root /datasets/imagenet                      # a tree you have

``--make-tree N`` first builds an ImageNet-shaped tree of hard links to a few JPEGs (no extra disk
beyond the folder entries): ``train/<wnid>/`` with N files for each of ``--classes`` wnids, and
``val/`` with ``--val-images`` raw ``ILSVRC2012_val_XXXXXXXX.JPEG`` files labelled by a Kaggle
``LOC_val_solution.csv``.

1. Time to the first training batch, with 1 and 2 processes (gloo, on this machine), as a job's
   first start and as its second start (a requeue): ours goes the way train_dist.py goes (data root
   on every rank, both splits indexed by rank 0 or read from the run folder's copy, broadcast, the
   loaders, the first batch); torchvision's reference way is an ``ImageFolder`` per rank, a
   ``DistributedSampler`` and a ``DataLoader`` (its val split needs class folders, so only the
   train split is indexed: that favours it).
2. Memory of the loader workers over a whole epoch with a decode that does nothing (the index is
   all the work): each worker's private memory (``Private_*`` of /proc/PID/smaps_rollup) after its
   first batch and after the last, ours (``TrainFolderDataset`` over the numpy ``SampleTable``)
   against ``ImageFolder``, whose list of Python tuples is copied page by page into every worker as
   reference counts are touched.
"""

from __future__ import annotations

import argparse
import csv
import errno
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

from .common import free_port, print_table, write_json

IMAGE_SIZE = 64


# --- the tree ------------------------------------------------------------------------------------

class _Linker:
    """os.link, with a fresh copy of the source once it has as many links as a file system allows
    (ext4: 65,000), kept in ``spare``."""

    def __init__(self, spare: Path) -> None:
        self.spare = spare
        self.current: Dict[Path, Path] = {}

    def __call__(self, src: Path, dst: Path) -> None:
        target = self.current.get(src, src)
        try:
            os.link(target, dst)
        except OSError as e:
            if e.errno != errno.EMLINK:
                raise
            self.spare.mkdir(exist_ok=True)
            target = self.spare / f"{len(list(self.spare.iterdir()))}-{src.name}"
            shutil.copyfile(src, target)
            self.current[src] = target
            os.link(target, dst)


def make_tree(root: Path, per_class: int, classes: int, val_images: int, samples: List[Path]) -> Path:
    """ImageNet's shape in hard links to ``samples`` (copies where links are not allowed)."""
    from data.classes import imagenet_wnids

    if root.exists() and any(root.iterdir()):
        raise SystemExit(f"error: {root} exists and is not empty; give a new folder to --root with --make-tree")
    wnids = imagenet_wnids()[:classes]
    link = _Linker(root / ".link-sources")
    for c, wnid in enumerate(wnids):
        folder = root / "train" / wnid
        folder.mkdir(parents=True)
        for i in range(per_class):
            link(samples[(c + i) % len(samples)], folder / f"{wnid}_{i}.JPEG")
    val = root / "val"
    val.mkdir()
    with open(root / "LOC_val_solution.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageId", "PredictionString"])
        for i in range(1, val_images + 1):
            name = f"ILSVRC2012_val_{i:08d}"
            link(samples[i % len(samples)], val / f"{name}.JPEG")
            writer.writerow([name, f"{wnids[i % len(wnids)]} 0 0 10 10"])
    return root


# --- 1. time to the first training batch -----------------------------------------------------------

def _run_ranks(payload: Dict[str, Any], processes: int, timeout: float) -> List[Dict[str, Any]]:
    """One child per rank, started together as torchrun would start them; their results by rank."""
    import json

    port = free_port()
    children = []
    for rank in range(processes):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(processes), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(processes), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1")
        children.append(subprocess.Popen(
            [sys.executable, "-m", "densenet.bench", "_child", "index", json.dumps(payload)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    results = []
    for child in children:
        out, err = child.communicate(timeout=timeout)
        if child.returncode != 0:
            raise RuntimeError(f"benchmark child failed:\n{err[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def _first_batch_ours(payload: Dict[str, Any], info: Any) -> Dict[str, Any]:
    from data.index import IndexCache

    from ..training.config import config_from_dict
    from ..training.loaders import build_loaders, index_data
    from ..training.settings import resolve_settings

    run_dir = Path(payload["run_dir"])
    cfg = config_from_dict({"data": payload["root"], "arch": "densenet_tiny", "image_size": IMAGE_SIZE,
                            "batch_size": payload["batch"], "workers": payload["workers"], "output_dir": str(run_dir),
                            "wandb": "disabled", "device": "cpu"}, "index benchmark")
    started = time.perf_counter()
    indexes = index_data(cfg, info, ("train", "val"), IndexCache.of_run(run_dir))
    indexed = time.perf_counter()
    if info.is_main:  # what train_dist.py does once the run folder exists
        run_dir.mkdir(parents=True, exist_ok=True)
        for index in indexes.values():
            IndexCache.of_run(run_dir).keep(index)
    train_loader, _ = build_loaders(cfg, info, resolve_settings(cfg, info), indexes)
    train_loader.set_epoch(0)
    next(iter(train_loader))
    return {"index_s": indexed - started, "first_batch_s": time.perf_counter() - started,
            "cached": all(i.cached for i in indexes.values()), "train_images": train_loader.num_samples}


def _first_batch_torchvision(payload: Dict[str, Any], info: Any) -> Dict[str, Any]:
    import torch
    from torchvision import datasets, transforms

    started = time.perf_counter()
    dataset = datasets.ImageFolder(os.path.join(payload["root"], "train"), transforms.Compose([
        transforms.RandomResizedCrop(IMAGE_SIZE), transforms.RandomHorizontalFlip(), transforms.PILToTensor()]))
    indexed = time.perf_counter()
    sampler = torch.utils.data.DistributedSampler(dataset, info.world_size, info.rank, seed=0)
    loader = torch.utils.data.DataLoader(dataset, payload["batch"], sampler=sampler, num_workers=payload["workers"])
    next(iter(loader))
    return {"index_s": indexed - started, "first_batch_s": time.perf_counter() - started, "cached": False,
            "train_images": len(dataset)}


def first_batch_child(payload: Dict[str, Any]) -> Dict[str, Any]:
    import torch

    from ..training.distributed import barrier, init_distributed, shutdown

    torch.set_num_threads(1)
    info = init_distributed("cpu")
    barrier(info)  # every rank starts the clock together
    measure = _first_batch_ours if payload["side"] == "ours" else _first_batch_torchvision
    result = measure(payload, info)
    barrier(info)
    shutdown(info)
    return {"rank": info.rank, **result}


# --- 2. workers' memory over an epoch ---------------------------------------------------------------

def private_bytes(pid: int) -> int:
    """Memory only this process holds (its own pages and the copy-on-write copies it made)."""
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1]) * 1024
    return total


class NoDecode:
    """A transform that reads nothing: what is left of a worker's work is the index."""

    def __call__(self, *args: Any) -> Any:
        import numpy as np
        return np.zeros((3, 1, 1), np.uint8)

    def at_epoch(self, epoch: int) -> "NoDecode":
        return self


def no_decode_loader(path: str) -> Any:
    return 0


def memory_child(payload: Dict[str, Any]) -> Dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader

    workers, batch = payload["workers"], payload["batch"]
    started = time.perf_counter()
    if payload["side"] == "ours":
        from data.datasets import TrainFolderDataset
        from data.layouts import load_split
        from data.loader import collate
        from data.samplers import TrainBatchSampler

        table = load_split(payload["root"], "train")
        sampler = TrainBatchSampler(len(table), batch, 0, 1, seed=0)
        loader = DataLoader(TrainFolderDataset(table, NoDecode(), seed=0), batch_sampler=sampler,
                            num_workers=workers, collate_fn=collate)
        index_bytes = table.paths.nbytes + table.targets.nbytes
    else:
        from torchvision import datasets

        dataset = datasets.ImageFolder(os.path.join(payload["root"], "train"), loader=no_decode_loader)
        loader = DataLoader(dataset, batch, shuffle=True, num_workers=workers,
                            generator=torch.Generator().manual_seed(0))
        index_bytes = sys.getsizeof(dataset.samples) + sum(sys.getsizeof(s) + sys.getsizeof(s[0])
                                                           for s in dataset.samples)
    batches = iter(loader)
    next(batches)
    pids = [w.pid for w in batches._workers]
    first = last = [private_bytes(p) for p in pids]
    # Taken while every worker still has a batch to hand over, so all of them are alive.
    sample_at = max(1, len(loader) - workers)
    count = 1
    for count, _ in enumerate(batches, start=2):
        if count == sample_at:
            last = [private_bytes(p) for p in pids]
    return {"index_mib": index_bytes / 2**20, "first_mib": [b / 2**20 for b in first],
            "last_mib": [b / 2**20 for b in last], "batches": count, "seconds": time.perf_counter() - started}


def child(payload: Dict[str, Any]) -> Dict[str, Any]:
    return memory_child(payload) if payload["kind"] == "memory" else first_batch_child(payload)


# --- the benchmark ---------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> None:
    from . import jpeg_tree
    from .common import run_child

    work = Path(tempfile.mkdtemp(prefix="index-bench-"))
    try:
        root = Path(args.root) if args.root else work / "tree"
        if args.make_tree:
            samples = (jpeg_tree.sample_files(Path(args.samples)) if args.samples else
                       jpeg_tree.sample_files(jpeg_tree.write_synthetic_samples(work / "samples", count=100)))
            t0 = time.perf_counter()
            make_tree(root, args.make_tree, args.classes, args.val_images, samples)
            print(f"made {root}: {args.classes} x {args.make_tree} train, {args.val_images} val files "
                  f"in {time.perf_counter() - t0:.0f}s")
        elif not args.root:
            raise SystemExit("error: give --root TREE, or --make-tree N to build one")
        if args.warm:
            jpeg_tree.read_all(root)
        rows = []
        for processes in args.processes:
            for side in ("ours", "torchvision"):
                run_dir = work / f"run-{side}-{processes}"
                for start in ("first", "second"):
                    payload = {"kind": "first_batch", "side": side, "root": str(root), "run_dir": str(run_dir),
                               "workers": args.workers, "batch": args.batch}
                    ranks = _run_ranks(payload, processes, args.timeout)
                    rows.append({"measure": "first batch", "side": side, "processes": processes, "start": start,
                                 "index_s": max(r["index_s"] for r in ranks),
                                 "first_batch_s": max(r["first_batch_s"] for r in ranks),
                                 "cached": ranks[0]["cached"], "train_images": ranks[0]["train_images"]})
                shutil.rmtree(run_dir, ignore_errors=True)
        print_table(["side", "processes", "start", "index s", "first batch s", "index copy read"],
                    [[r["side"], r["processes"], r["start"], f"{r['index_s']:.2f}", f"{r['first_batch_s']:.2f}",
                      "yes" if r["cached"] else "no"] for r in rows])
        if not args.skip_memory:
            memory = []
            for side in ("ours", "torchvision"):
                result = run_child("index", {"kind": "memory", "side": side, "root": str(root),
                                             "workers": args.workers, "batch": args.epoch_batch},
                                   timeout=args.timeout)
                memory.append({"measure": "worker memory", "side": side, **result})
            print()
            print_table(["side", "index MiB", "worker private MiB, first batch", "after the epoch", "growth",
                         "batches", "s"],
                        [[m["side"], f"{m['index_mib']:.1f}", " ".join(f"{v:.0f}" for v in m["first_mib"]),
                          " ".join(f"{v:.0f}" for v in m["last_mib"]),
                          " ".join(f"{b - a:+.0f}" for a, b in zip(m["first_mib"], m["last_mib"])),
                          m["batches"], f"{m['seconds']:.0f}"] for m in memory])
            rows += memory
        write_json(args.json, rows, {"root": str(root), "workers": args.workers})
    finally:
        shutil.rmtree(work, ignore_errors=True)  # with it a tree made without --root


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("index", help="the data index at ImageNet's size: first batch, worker memory",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", help="the tree to measure (with --make-tree: where to build it and keep it; "
                   "default a temporary folder, removed at the end)")
    p.add_argument("--make-tree", type=int, metavar="N", help="build the tree first, N train files per class")
    p.add_argument("--classes", type=int, default=1000, help="class folders of a made tree")
    p.add_argument("--val-images", type=int, default=50000, help="raw val files of a made tree")
    p.add_argument("--samples", help="JPEGs to link to (default: a few synthetic ImageNet-sized ones)")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="processes of the first-batch runs")
    p.add_argument("--workers", type=int, default=2, help="loader workers per process")
    p.add_argument("--batch", type=int, default=32, help="batch size per process of the first-batch runs")
    p.add_argument("--epoch-batch", type=int, default=256, help="batch size of the memory epoch")
    p.add_argument("--skip-memory", action="store_true", help="only the first-batch measurements")
    p.add_argument("--warm", action="store_true", help="read every file once first (page cache)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds one child may take")
    p.add_argument("--json", help="write the rows here")
    p.set_defaults(run=run)
