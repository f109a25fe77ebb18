"""The GPU check: training speed of the four ImageNet DenseNets, and whether the loader keeps up.

    python -m densenet.bench gpu                      # one GPU, about 7 minutes, prints the table
    python -m densenet.bench gpu --json gpu.json      # also the rows as JSON
    python -m densenet.bench gpu --device cpu --quick # the same plumbing on the CPU, a few minutes

What it measures, in this order (later parts are skipped, and say so, if --budget-s would run out):
1. densenet121 (ours, then timm's) training steps (forward, backward, fused SGD step) on synthetic
   input at the largest power-of-two batch that fits (up to --max-batch), in fp32 NCHW and in bf16
   autocast + channels_last: images/s, step time, max allocated memory (after autotuning);
2. the densenet121 training loader with --workers workers from JPEG files, decoded by the workers
   and, where ``data.build_train_loader`` offers ``decode="device"``, by the GPU in batches, against
   the model's rate (on the CPU, the device-decode path runs with the CPU as the device);
3. densenet121 with ``torch.compile`` (our trainer's compile_model: static shapes, compiled once),
   its compile time, graph count and recompiles during the timed steps (there should be none);
4. densenet169/201/161 as in 1;
5. the real ``Trainer.train_epoch`` on pre-made uint8 batches, against the bare step: the cost of
   the training loop itself (normalisation, the per-step stop/NaN agreement, logging);
6. timm's densenet121 compiled, then densenet169/201/161 compiled.

Batches are searched with cuDNN autotuning off (each new shape would be autotuned) and measured with
it on; a batch that then runs out of memory is halved. Every model configuration runs in a fresh
process, so memory peaks are its own. The JPEGs are the ImageNet sample where it exists, otherwise
synthetic ones of ImageNet's size (``--samples`` takes any folder of <class>_*.JPEG files).
Nothing is built or downloaded; timm is optional (its rows say n/a without it).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import jpeg_tree
from .common import fmt_bytes, peak_memory_bytes, print_table, run_child, write_json

ARCHS = ("densenet121", "densenet169", "densenet201", "densenet161")
# Rough cost of a training step relative to densenet121 (FLOPs and layer count), for the time budget.
ARCH_COST = {"densenet121": 1.0, "densenet169": 1.25, "densenet201": 1.6, "densenet161": 2.4}


@dataclass(frozen=True)
class ModelJob:
    impl: str  # "ours" | "timm"
    arch: str
    modes: Tuple[str, ...]
    device: str
    image_size: int
    min_batch: int
    max_batch: int
    batch: Optional[int]  # fixed (compile rows use the eager bf16 batch), or None to search
    timed_s: float
    compile_backend: str
    tf32: bool
    kind: str = "model"


@dataclass(frozen=True)
class TrainerJob:
    arch: str
    device: str
    image_size: int
    batch: int
    timed_s: float
    tf32: bool
    kind: str = "trainer"


@dataclass(frozen=True)
class LoaderJob:
    root: str
    decode: str  # "cpu" (the workers decode) | "device" (the device decodes each batch)
    device: str
    image_size: int
    batch: int
    workers: int
    timed_s: float
    warmup_batches: int
    kind: str = "loader"


# --- helpers shared by the children -------------------------------------------------------------------

def _sync(device: Any) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: Any) -> None:
    import torch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _oom_types() -> Tuple[type, ...]:
    import torch
    return (torch.cuda.OutOfMemoryError,) if hasattr(torch.cuda, "OutOfMemoryError") else (RuntimeError,)


def _set_backends(device: Any, tf32: bool, benchmark: bool) -> None:
    import torch
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = benchmark
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


def _timed_steps(step: Callable[[], None], device: Any, target_s: float) -> Tuple[int, float]:
    """Enough steps for about target_s seconds (at most 100), after one that sizes the count."""
    t0 = time.perf_counter()
    step()
    _sync(device)
    per_step = time.perf_counter() - t0
    n = max(1, min(100, math.ceil(target_s / max(per_step, 1e-6))))
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    _sync(device)
    return n, time.perf_counter() - t0


def _graph_count() -> int:
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return -1
    return int(counters["stats"].get("unique_graphs", 0))


# --- child: one model in one or more modes ---------------------------------------------------------------

def _model_child(job: ModelJob) -> Dict[str, Any]:
    import torch

    device = torch.device(job.device)
    results: Dict[str, Any] = {}
    for mode in job.modes:
        results[mode] = _one_mode(job, mode, device)
        _free(device)
    return results


def _one_mode(job: ModelJob, mode: str, device: Any) -> Dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from ..engine import compile_model
    from ..optim import optimizer_kernels
    from .step import build_model

    amp = torch.bfloat16 if mode.startswith("bf16") else None
    fmt = torch.channels_last if "-cl" in mode else torch.contiguous_format
    compiled = mode.endswith("compile")
    torch.manual_seed(0)
    try:
        model = build_model(job.impl, job.arch, False).to(device, memory_format=fmt).train()
    except ImportError as e:
        return {"error": f"n/a ({e})"}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4,
                                **optimizer_kernels("auto", device.type))
    forward = compile_model(model, job.compile_backend) if compiled else model
    classes = model.classifier.out_features if hasattr(model, "classifier") else 1000

    def make_step(batch: int) -> Callable[[], None]:
        x = torch.randn(batch, 3, job.image_size, job.image_size, device=device).contiguous(memory_format=fmt)
        y = torch.randint(0, classes, (batch,), device=device)

        def step() -> None:
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = F.cross_entropy(forward(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    def clear() -> None:
        optimizer.zero_grad(set_to_none=True)
        _free(device)

    batch, capped = job.batch, False
    if batch is None:  # the search: one step per size, without autotuning every new shape
        _set_backends(device, job.tf32, benchmark=False)
        size = job.min_batch
        while size <= job.max_batch and _fits(make_step, size, device):
            batch, size = size, size * 2
            clear()
        clear()
        if batch is None:
            return {"error": f"out of memory at batch {job.min_batch}"}
        capped = batch == job.max_batch
    _set_backends(device, job.tf32, benchmark=True)
    while batch >= 1:
        row = _measure(make_step, batch, device, job.timed_s, compiled)
        if row is not None:
            return {**row, "capped": capped}
        clear()  # out of memory with autotuning's workspaces: try half
        batch, capped = batch // 2, False
    return {"error": "out of memory"}


def _fits(make_step: Callable[[int], Callable[[], None]], batch: int, device: Any) -> bool:
    try:
        make_step(batch)()
        _sync(device)
        return True
    except _oom_types():
        return False  # the step and its tensors go with this frame; the caller frees the cache


def _measure(make_step: Callable[[int], Callable[[], None]], batch: int, device: Any, timed_s: float,
             compiled: bool) -> Optional[Dict[str, Any]]:
    import torch
    try:
        step = make_step(batch)
        graphs_before = _graph_count()
        t0 = time.perf_counter()
        step()  # compiles, and autotunes cuDNN for this shape
        _sync(device)
        first_s = time.perf_counter() - t0
        if device.type == "cuda":  # the peak of training itself, not of autotuning's trial workspaces
            torch.cuda.reset_peak_memory_stats(device)
        step()
        graphs_warm = _graph_count()
        n, seconds = _timed_steps(step, device, timed_s)
    except _oom_types():
        return None
    row = {"batch": batch, "images_per_s": batch * n / seconds, "step_s": seconds / n, "timed_steps": n,
           "max_mem_bytes": peak_memory_bytes(device), "first_step_s": first_s}
    if compiled:
        row.update(graphs=graphs_warm - graphs_before, recompiles=_graph_count() - graphs_warm)
    return row


# --- child: the real training loop on pre-made batches ------------------------------------------------------

class _PremadeBatches:
    """The loader interface Trainer.train_epoch uses, handing out one pre-made uint8 batch (pinned on
    CUDA) again and again: what is timed is the training loop, not decoding."""

    def __init__(self, batch: int, image_size: int, batches: int, classes: int, pin: bool) -> None:
        import torch
        self.images = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8)
        self.targets = torch.randint(0, classes, (batch,))
        self.bad = torch.zeros(batch, dtype=torch.bool)
        if pin:
            self.images, self.targets = self.images.pin_memory(), self.targets.pin_memory()
        self.batches = batches
        self.start = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.start = start_batch

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        for _ in range(self.start, self.batches):
            yield self.images, self.targets, self.bad


def _trainer_child(job: TrainerJob) -> Dict[str, Any]:
    import torch

    from data import IMAGENET_MEAN, IMAGENET_STD

    from .. import create_model
    from ..checkpoint import Progress
    from ..config import config_from_dict
    from ..distributed import DistInfo
    from ..engine import Trainer, configure_backends, prepare_model
    from ..metrics_log import RunLog
    from ..optim import LRSchedule, build_optimizer
    from ..signals import StopRequest
    from ..wandb_run import WandbRun

    device = torch.device(job.device)
    amp = "bf16" if device.type == "cuda" else "off"
    cfg = config_from_dict({"data": "premade", "arch": job.arch, "batch_size": job.batch, "image_size": job.image_size,
                            "amp": amp, "channels_last": device.type == "cuda", "tf32": job.tf32,
                            "log_every": 10**9, "wandb": "disabled", "device": device.type}, "gpu check")
    info = DistInfo(0, 1, 0, device, None, "single")
    configure_backends(cfg, device)
    torch.manual_seed(0)
    model = prepare_model(create_model(job.arch), cfg, info)
    optimizer = build_optimizer(model, cfg, lr=0.01)
    trainer = Trainer(model, optimizer, LRSchedule.from_config(cfg, 0.01, 1000), cfg, info, num_classes=1000,
                      mean=IMAGENET_MEAN, std=IMAGENET_STD, log=RunLog(None, False), wandb=WandbRun())
    stop = StopRequest()  # not installed: nothing here should stop the loop

    def epoch(batches: int) -> float:
        loader = _PremadeBatches(job.batch, job.image_size, batches, 1000, pin=device.type == "cuda")
        progress = Progress(world_size=1, batch_size=job.batch, accum_steps=1)
        t0 = time.perf_counter()
        trainer.train_epoch(loader, progress, stop, on_checkpoint=lambda: None)
        _sync(device)
        return time.perf_counter() - t0

    per_step = epoch(3) / 3  # warm-up: autotuning, the first allocations
    steps = max(1, min(100, math.ceil(job.timed_s / per_step)))
    seconds = epoch(steps)
    return {"batch": job.batch, "images_per_s": job.batch * steps / seconds, "step_s": seconds / steps,
            "timed_steps": steps, "max_mem_bytes": peak_memory_bytes(device)}


# --- child: the training loader ------------------------------------------------------------------------

def device_decode_available() -> bool:
    """Whether this checkout's loader has the device-decode mode (checked here, not assumed, so the
    check also runs on an older checkout)."""
    from data import build_train_loader
    return "decode" in inspect.signature(build_train_loader).parameters


def _loader_child(job: LoaderJob) -> Dict[str, Any]:
    import torch

    from data import build_train_loader

    device = torch.device(job.device)
    extra: Dict[str, Any] = {}
    if job.decode == "device":
        extra = {"decode": "device", "device": device}
    loader = build_train_loader(job.root, image_size=job.image_size, batch_size=job.batch, workers=job.workers,
                                pin_memory=device.type == "cuda", **extra)
    loader.set_epoch(0)
    batches = iter(loader)
    for _ in range(job.warmup_batches):  # every worker has started and delivered
        images, _, _ = next(batches)
    _sync(device)
    t0, images_seen = time.perf_counter(), 0
    for images, targets, _ in batches:  # as the trainer takes them: onto the device without blocking
        images.to(device, non_blocking=True)
        targets.to(device, non_blocking=True)
        images_seen += images.shape[0]
        if time.perf_counter() - t0 >= job.timed_s:
            break
    _sync(device)
    seconds = time.perf_counter() - t0
    if images_seen == 0:
        return {"error": "the loader ran out of batches during warm-up"}
    row = {"batch": job.batch, "images_per_s": images_seen / seconds, "images": images_seen, "seconds": seconds}
    decoder = getattr(loader, "decoder", None)
    if decoder is not None:  # where the images were decoded: device, workers, CPU fallback
        row["decoded"] = dict(decoder.counts)
    return row


def child(payload: Dict[str, Any]) -> Dict[str, Any]:
    kind = payload.pop("kind")
    if kind == "model":
        payload["modes"] = tuple(payload["modes"])
        return _model_child(ModelJob(**payload))
    if kind == "trainer":
        return _trainer_child(TrainerJob(**payload))
    return _loader_child(LoaderJob(**payload))


# --- the plan and the table ----------------------------------------------------------------------------

@dataclass
class Plan:
    args: argparse.Namespace
    device: str
    started: float = field(default_factory=time.perf_counter)
    # Seconds a job takes per unit of ARCH_COST, by kind: first guesses, then what the last such job took.
    estimates: Dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.args.quick:
            self.estimates = {"eager": 10.0, "compile": 20.0, "trainer": 10.0, "loader": 10.0}
        else:
            self.estimates = {"eager": 60.0, "compile": 150.0, "trainer": 40.0, "loader": 30.0}

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.started)

    def run(self, label: str, estimate_key: str, cost: float, job: Any) -> Optional[Dict[str, Any]]:
        """Run a job in a fresh process unless its estimated time no longer fits in the budget."""
        estimate = self.estimates[estimate_key] * cost
        if estimate > self.left():
            print(f"  skipped {label}: about {estimate:.0f} s needed, {max(self.left(), 0):.0f} s left", flush=True)
            return None
        t0 = time.perf_counter()
        try:
            result = run_child("gpu_check", asdict(job))
        except RuntimeError as e:
            result = {"error": str(e).strip().splitlines()[-1][:200]}
        took = time.perf_counter() - t0
        self.estimates[estimate_key] = took / cost
        print(f"  {label}: {took:.0f} s", flush=True)
        return result


def add_parser(sub) -> None:
    p = sub.add_parser("gpu", help="GPU check: the DenseNets' training speed and whether the loader keeps up",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the plumbing, not the speed")
    p.add_argument("--archs", default=",".join(ARCHS), help="comma-separated, densenet121 first")
    p.add_argument("--impls", default="ours,timm", help="ours, or ours,timm (timm's densenet121 beside ours)")
    p.add_argument("--image-size", type=int, default=None, help="default 224 (quick: 32)")
    p.add_argument("--min-batch", type=int, default=None, help="first batch of the search (default 32; quick: 2)")
    p.add_argument("--max-batch", type=int, default=None, help="last batch of the search (default 1024; quick: 2)")
    p.add_argument("--timed-s", type=float, default=None, help="seconds of timed steps per row (default 3)")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default 16; quick: 2)")
    p.add_argument("--loader-batch", type=int, default=None, help="loader batch (default 256; quick: 8)")
    p.add_argument("--loader-s", type=float, default=None, help="seconds of timed loading (default 10)")
    p.add_argument("--samples", default=None, help="folder of <class>_*.JPEG files for the loader rows "
                   "(default: the ImageNet sample if present, else synthetic JPEGs)")
    p.add_argument("--compile-backend", default=None, help="default inductor (quick: eager)")
    p.add_argument("--no-tf32", dest="tf32", action="store_false", help="full float32 in the fp32 rows")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting new rows after this many "
                   "seconds (default 420; quick: 600)")
    p.add_argument("--json", default=None, help="also write the rows as JSON to this file")
    p.set_defaults(run=run)


def _defaults(args: argparse.Namespace) -> None:
    quick = args.quick
    pick = lambda value, full, small: value if value is not None else (small if quick else full)  # noqa: E731
    args.image_size = pick(args.image_size, 224, 32)
    args.min_batch = pick(args.min_batch, 32, 2)
    args.max_batch = pick(args.max_batch, 1024, 2)
    args.timed_s = pick(args.timed_s, 3.0, 0.3)
    args.workers = pick(args.workers, 16, 2)
    args.loader_batch = pick(args.loader_batch, 256, 8)
    args.loader_s = pick(args.loader_s, 10.0, 1.0)
    args.compile_backend = pick(args.compile_backend, "inductor", "eager")
    args.budget_s = pick(args.budget_s, 420.0, 600.0)
    args.archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    unknown = [a for a in args.archs if a not in ARCHS]
    if unknown or not args.archs or args.archs[0] != "densenet121":
        raise SystemExit(f"error: --archs must start with densenet121 and name only {', '.join(ARCHS)}")
    args.impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    if not args.impls or args.impls[0] != "ours" or not set(args.impls) <= {"ours", "timm"}:
        raise SystemExit(f"error: --impls must be ours or ours,timm, got {','.join(args.impls)}")
    if args.min_batch < 1 or args.max_batch < args.min_batch:
        raise SystemExit(f"error: need 1 <= --min-batch <= --max-batch, got {args.min_batch}, {args.max_batch}")


def _loader_tree(args: argparse.Namespace, workdir: Path) -> Tuple[Path, str]:
    samples = Path(args.samples) if args.samples else jpeg_tree.default_samples()
    source = str(samples)
    if samples is None:
        samples = jpeg_tree.write_synthetic_samples(workdir / "samples", count=16 if args.quick else 100)
        source = "synthetic JPEGs, 500x375"
    files = len(jpeg_tree.sample_files(samples))
    # Enough images that no epoch ends while timing, even at a few thousand images per second.
    needed = args.loader_batch * (2 * args.workers + 2) + int(args.loader_s * (500 if args.quick else 10000))
    root = jpeg_tree.make_tree(samples, workdir / "tree", copies=max(1, math.ceil(needed / files)))
    jpeg_tree.read_all(root)
    return root, source


def run(args: argparse.Namespace) -> List[Dict[str, Any]]:
    import torch

    _defaults(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available; use --device cpu --quick")
    plan = Plan(args, device)
    rows: List[Dict[str, Any]] = []

    def model_job(impl: str, arch: str, modes: Tuple[str, ...], batch: Optional[int] = None) -> ModelJob:
        return ModelJob(impl, arch, modes, device, args.image_size, args.min_batch, args.max_batch, batch,
                        args.timed_s, args.compile_backend, args.tf32)

    def add_model_rows(impl: str, arch: str, result: Optional[Dict[str, Any]], modes: Tuple[str, ...]) -> None:
        for mode in modes:
            res = (result or {}).get(mode) if result and "error" not in result else result
            rows.append({"part": "model", "impl": impl, "arch": arch, "mode": mode,
                         **(res if res is not None else {"error": "skipped (time budget)"})})

    def eager(impl: str, arch: str) -> None:
        modes = ("fp32-nchw", "bf16-cl")
        add_model_rows(impl, arch, plan.run(f"{impl} {arch} eager", "eager", ARCH_COST[arch],
                                            model_job(impl, arch, modes)), modes)

    def compiled(impl: str, arch: str) -> None:
        eager_row = _find(rows, impl, arch, "bf16-cl")
        batch = eager_row.get("batch") if eager_row else None
        if not batch:
            add_model_rows(impl, arch, {"error": "n/a (no eager bf16-cl batch)"}, ("bf16-cl-compile",))
            return
        add_model_rows(impl, arch, plan.run(f"{impl} {arch} compiled", "compile", ARCH_COST[arch],
                                            model_job(impl, arch, ("bf16-cl-compile",), batch)),
                       ("bf16-cl-compile",))

    print(f"GPU check on {device}: {args.image_size} px, batches {args.min_batch}-{args.max_batch} (powers of two), "
          f"about {args.timed_s:g} s timed per row, budget {args.budget_s:.0f} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="densenet-gpu-check-") as tmp:
        eager("ours", "densenet121")
        if "timm" in args.impls:
            eager("timm", "densenet121")
        root, source = _loader_tree(args, Path(tmp))
        for decode in ("cpu", "device"):
            job = LoaderJob(str(root), decode, device, args.image_size, args.loader_batch, args.workers,
                            args.loader_s, warmup_batches=2 * args.workers)
            result: Optional[Dict[str, Any]]
            if decode == "device" and not device_decode_available():
                result = {"error": "n/a (data.build_train_loader has no decode='device')"}
            else:
                result = plan.run(f"loader {decode} decode", "loader", 1.0, job)
            rows.append({"part": "loader", "impl": "ours", "arch": "densenet121", "mode": f"{decode}-decode",
                         "workers": args.workers, "source": source,
                         **(result if result is not None else {"error": "skipped (time budget)"})})
        compiled("ours", "densenet121")
        for arch in args.archs[1:]:
            eager("ours", arch)
        ref = _find(rows, "ours", "densenet121", "bf16-cl")
        if ref and ref.get("batch"):
            mode = "bf16-cl" if device.startswith("cuda") else "fp32-nchw"  # the trainer's defaults there
            result = plan.run("trainer loop", "trainer", 1.0,
                              TrainerJob("densenet121", device, args.image_size, ref["batch"], args.timed_s, args.tf32))
            rows.append({"part": "trainer", "impl": "ours", "arch": "densenet121", "mode": mode,
                         **(result if result is not None else {"error": "skipped (time budget)"})})
        if "timm" in args.impls:
            compiled("timm", "densenet121")
        for arch in args.archs[1:]:
            compiled("ours", arch)
    _report(rows, args, device, time.perf_counter() - plan.started)
    write_json(args.json, rows, {"image_size": args.image_size, "tf32": args.tf32, "quick": args.quick})
    return rows


def _find(rows: List[Dict[str, Any]], impl: str, arch: str, mode: str, part: str = "model") -> Optional[Dict[str, Any]]:
    for row in rows:
        if (row["part"], row["impl"], row["arch"], row["mode"]) == (part, impl, arch, mode) and "error" not in row:
            return row
    return None


def _ratio(a: Optional[Dict[str, Any]], b: Optional[Dict[str, Any]]) -> Optional[float]:
    if a and b and a.get("images_per_s") and b.get("images_per_s"):
        return a["images_per_s"] / b["images_per_s"]
    return None


def _report(rows: List[Dict[str, Any]], args: argparse.Namespace, device: str, seconds: float) -> None:
    best_model = _find(rows, "ours", "densenet121", "bf16-cl-compile") or _find(rows, "ours", "densenet121", "bf16-cl")
    table = []
    for row in rows:
        if row["part"] == "model":
            base = _find(rows, row["impl"], row["arch"], "fp32-nchw")
            vs = _ratio(row, base)
        elif row["part"] == "trainer":
            vs = _ratio(row, _find(rows, "ours", "densenet121", row["mode"]))
        else:
            vs = _ratio(row, best_model)
        name = {"model": row["mode"], "trainer": f"trainer loop, {row['mode']}",
                "loader": f"loader, {row['mode']}, {row.get('workers')} workers"}[row["part"]]
        if "error" in row:
            table.append([row["impl"], row["arch"], name, "", row["error"], "", "", "", ""])
            continue
        batch = f"{row['batch']}{'+' if row.get('capped') else ''}"
        extra = ""
        if "graphs" in row:
            extra = f"compile {row['first_step_s']:.0f}s, {row['graphs']} graphs, {row['recompiles']} recompiles"
        if "decoded" in row:
            extra = "decoded by " + ", ".join(f"{where} {n}" for where, n in row["decoded"].items())
        table.append([row["impl"], row["arch"], name, batch, f"{row['images_per_s']:.1f}",
                      f"{row['step_s']:.3f}" if "step_s" in row else "",
                      fmt_bytes(row["max_mem_bytes"]) if "max_mem_bytes" in row else "",
                      f"{vs:.2f}" if vs else "", extra])
    import torch
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "CPU"
    print(f"\n{name}, torch {torch.__version__}, {os.cpu_count()} CPUs; {args.image_size} px; synthetic input for "
          f"the model rows; TF32 {'on' if args.tf32 else 'off'}; batch: largest power of two that fits "
          f"('+': the --max-batch cap {args.max_batch} fit); {seconds:.0f} s in all")
    print("vs: model rows against the same model's fp32-nchw row; the trainer loop against the bare bf16-cl step "
          "at the same batch; loader rows against our densenet121's best bf16-cl rate")
    print_table(["impl", "arch", "mode", "batch", "img/s", "step s", "max mem", "vs", "notes"], table)
    def model(impl: str, mode: str) -> Optional[Dict[str, Any]]:
        return _find(rows, impl, "densenet121", mode)

    def loader(decode: str) -> Optional[Dict[str, Any]]:
        return _find(rows, "ours", "densenet121", f"{decode}-decode", "loader")

    checks = [
        ("densenet121 bf16-cl / fp32-nchw", _ratio(model("ours", "bf16-cl"), model("ours", "fp32-nchw")), 3.0),
        ("ours / timm densenet121, bf16-cl", _ratio(model("ours", "bf16-cl"), model("timm", "bf16-cl")), 1.0),
        ("ours / timm densenet121, bf16-cl compiled",
         _ratio(model("ours", "bf16-cl-compile"), model("timm", "bf16-cl-compile")), 1.0),
        ("device-decode loader / model", _ratio(loader("device"), best_model), 1.2),
        ("CPU-decode loader / model", _ratio(loader("cpu"), best_model), 1.2),
    ]
    print()
    for label, value, target in checks:
        verdict = "n/a" if value is None else ("meets" if value >= target else "below")
        shown = "n/a" if value is None else f"{value:.2f}"
        print(f"  {label}: {shown} (target >= {target:g}: {verdict})")
