"""The recipes for many GPUs against the paper's, on a tree small enough to train here.

    python -m densenet.bench recipes                       # the built-in demo data at 64 px (~6 minutes a seed on 2 cores)
    python -m densenet.bench recipes --seeds 0 1 --lars-lr 0.075 1.0   # LARS at its lr for 64 images and at 1.0
    python -m densenet.bench recipes --root /data/imagenet-100 --arch densenet121 --image-size 160 --processes 8

Real train_dist.py runs from scratch, each to its end, on the same data:

1. ``--recipe paper``: the paper's 90 epochs, SGD, lr 0.1 per 256 images, /10 at epochs 30 and 60;
2. ``--recipe fast``: 40 epochs, the crop at 160/224 of --image-size rising to the full size near the
   end (progressive resizing), label smoothing, warmup + cosine;
3. ``--recipe fast`` at the full size throughout (``--train-size-start null``): the same schedule
   without progressive resizing, which tells what the smaller crops cost on this tree;
4. ``--optimizer lars`` at 8 x the global batch: the paper's schedule otherwise, lr scaled linearly
   (8 x), LARS's 5 warmup epochs, no weight decay on norms and biases.

It reports each run's final and best validation top-1, the image-pixels it trained on (the sum over
its steps of batch x crop^2, from the trainer's own schedule) and its wall-clock time, and the
differences to the paper's recipe: the claim is the fast recipe's top-1 within one point of the
paper's with fewer pixels, and LARS at 8 x the batch within one point too. With several ``--seeds``
every run is repeated per seed and the table gives each seed's final top-1 and their mean, since on a
small tree two seeds of one recipe can end many points apart. On the demo data (100 validation
images) one point is one image: read the figures with that in mind.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

from .common import print_table

REPO = Path(__file__).resolve().parents[2]


ONLY = ("fast", "fast-full", "lars")  # the runs' keys but the paper's, which always runs


def _runs(args: argparse.Namespace) -> List[Dict[str, Any]]:
    batch = args.batch_size
    return [
        {"name": "paper", "key": "paper", "flags": ["--recipe", "paper", "--batch-size", str(batch)]},
        {"name": "fast", "key": "fast", "flags": ["--recipe", "fast", "--batch-size", str(batch),
                                                  "--train-size-multiple", str(args.size_multiple)]},
        {"name": "fast full size", "key": "fast-full", "flags": ["--recipe", "fast", "--batch-size", str(batch),
                                                                 "--train-size-start", "null"]},
    ] + [
        {"name": "lars 8x batch" + (f", lr {lr:g}" if lr else ""), "key": "lars",
         "flags": ["--optimizer", "lars", "--batch-size", str(8 * batch), *(["--lr", str(lr)] if lr else [])]}
        for lr in (args.lars_lr or [None])
    ]


def _train(flags: Sequence[str], common: Sequence[str], out: Path, processes: int, timeout: float) -> Dict[str, Any]:
    if processes == 1:
        cmd = [sys.executable, str(REPO / "train_dist.py")]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(REPO / "train_dist.py")]
    cmd += [*common, *flags, "--output-dir", str(out)]
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed with status {proc.returncode}:\n{proc.stdout[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in records if r.get("kind") == "eval"]
    return {"final_top1": evals[-1]["top1"], "best_top1": max(e["top1"] for e in evals), "epochs": len(evals),
            "seconds": seconds, "val_images": evals[-1]["count"]}


def run(args: argparse.Namespace) -> List[Dict[str, Any]]:
    from .plan import plan

    work = Path(args.work or tempfile.mkdtemp(prefix="densenet-recipes-"))
    data = args.root or "demo"
    extra = [a for a in args.train_args if a != "--"]
    common = ["--data", data, "--arch", args.arch, "--image-size", str(args.image_size), "--workers",
              str(args.workers), "--log-every", "1000", "--wandb", "disabled", "--ckpt-every", "0",
              "--keep-epochs", "0", *extra]
    train_images = _count_train_images(data)
    rows = []
    for spec in _runs(args):
        name = spec["name"]
        if args.only and spec["key"] not in (*args.only, "paper"):
            continue
        schedule = plan([*common[2:], *spec["flags"]], args.processes, train_images)
        seeds = []
        for seed in args.seeds:
            print(f"training {name}, seed {seed} ...", flush=True)
            out = work / f"{name.replace(' ', '-')}-seed{seed}"
            result = _train([*spec["flags"], "--seed", str(seed)], common, out, args.processes, args.timeout)
            print(f"  top1 {result['final_top1']:.2f} (best {result['best_top1']:.2f}) in {result['seconds']:.0f} s",
                  flush=True)
            seeds.append({"seed": seed, **result})
        rows.append({"recipe": name, "seeds": seeds, "final_top1": _mean(seeds, "final_top1"),
                     "best_top1": _mean(seeds, "best_top1"), "seconds": _mean(seeds, "seconds"),
                     "epochs": seeds[0]["epochs"], "val_images": seeds[0]["val_images"],
                     "global_batch": schedule["global_batch"], "peak_lr": schedule["peak_lr"],
                     "steps": schedule["steps"], "image_pixels": schedule["image_pixels"],
                     "train_sizes": schedule["train_sizes"]})
    paper = rows[0]
    table = []
    for r in rows:
        per_seed = " / ".join(f"{s['final_top1']:.0f}" for s in r["seeds"])
        table.append([r["recipe"], r["global_batch"], f"{r['peak_lr']:.4g}", r["epochs"], r["steps"], per_seed,
                      f"{r['final_top1']:.2f}", f"{r['best_top1']:.2f}", f"{r['final_top1'] - paper['final_top1']:+.2f}",
                      f"{r['image_pixels'] / 1e9:.2f}", f"{r['image_pixels'] / paper['image_pixels']:.2f}",
                      f"{r['seconds']:.0f}", r["train_sizes"]])
    print()
    print_table(["recipe", "global batch", "peak lr", "epochs", "steps", "top1 by seed", "mean top1", "mean best",
                 "vs paper", "Gpixels", "pixels vs paper", "seconds", "training crops"], table)
    print(f"\n{paper['val_images']} validation images ({100 / paper['val_images']:.2f} points each); data {data}, "
          f"{args.arch} at {args.image_size} px, {args.processes} process(es), seeds "
          f"{' '.join(map(str, args.seeds))}; runs in {work}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(sys.argv), "rows": rows}, f, indent=2)
        print(f"wrote {args.json}")
    return rows


def _mean(seeds: Sequence[Dict[str, Any]], key: str) -> float:
    return sum(s[key] for s in seeds) / len(seeds)


def _count_train_images(data: str) -> int:
    from data import resolve_data_root
    from data.index import read_source

    source = read_source(resolve_data_root(data), "train")
    return getattr(source, "num_samples", None) or len(source)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("recipes", help="--recipe fast and LARS at 8x the batch against the paper's recipe",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", help="an image tree with train/ and val/ (default: the built-in demo data)")
    p.add_argument("--arch", default="densenet_tiny")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8, help="per process, of the paper and fast runs (LARS: 8x)")
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--size-multiple", type=int, default=8, help="--train-size-multiple of the fast run (small crops)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="run every recipe once per seed (default: 0)")
    p.add_argument("--timeout", type=float, default=7200, help="seconds one run may take")
    p.add_argument("--work", help="where the runs go (default: a temporary folder, kept)")
    p.add_argument("--lars-lr", type=float, nargs="+",
                   help="the LARS run's peak lr, one run each (default: one run at its 0.3 per 256 images, linear)")
    p.add_argument("--only", nargs="+", choices=ONLY,
                   help="these beside the paper's recipe (default: all)")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="more train_dist.py flags for every run, after --")
    p.set_defaults(run=run)

