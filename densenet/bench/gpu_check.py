"""The GPU check: the CUDA-only correctness checks, then training speed of the four ImageNet
DenseNets against torchvision's and timm's, and whether the input pipeline keeps up.

    python -m densenet.bench gpu                      # one GPU, under 8 minutes, prints the tables
    python -m densenet.bench gpu --json gpu.json      # also the rows as JSON
    python -m densenet.bench gpu --device cpu --quick # the same plumbing on the CPU, a few minutes

What it runs, in this order (later parts are skipped, and say so, if --budget-s would run out; each
part runs in a fresh process with a timeout, so one hang cannot eat the budget):
1. the correctness checks (``gpu_correctness``): device-decoded batches against CPU-decoded ones in
   the real training loop with accumulation; decoding ahead while the training stream is busy;
   fused optimizer resume after a memory-layout change; SyncBatchNorm (and its refusal with
   --memory-efficient); synchronising CUDA calls per training step and per evaluation batch;
2. the real ``Trainer.train_epoch`` on densenet121 (bf16, channels_last) fed three ways: pre-made
   uint8 batches (the loop's own cost), the CPU-decode loader and the device-decode loader, both
   from JPEG files with --workers workers;
3. densenet121 training steps (forward, backward, fused SGD step) on synthetic input at the largest
   power-of-two batch that fits (up to --max-batch), ours, torchvision's and timm's, in fp32 NCHW,
   bf16 NCHW and bf16 channels_last: images/s, step time, max allocated memory (after autotuning);
4. our densenet121 with ``torch.compile`` (the trainer's compile_model: static shapes, compiled
   once), its compile time, graph count and recompiles during the timed steps (there should be none);
5. densenet169/201/161 as in 3, then torchvision's and timm's densenet121 compiled, then
   densenet169/201/161 compiled.

Batches are searched with cuDNN autotuning off (each new shape would be autotuned) and measured with
it on; a batch that then runs out of memory is halved. The JPEGs are the ImageNet sample where it
exists, otherwise synthetic ones of ImageNet's size (``--samples`` takes any folder of
<class>_*.JPEG files). Nothing is built or downloaded; timm is optional (its rows say n/a without it).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import jpeg_tree
from .common import fmt_bytes, peak_memory_bytes, print_table, run_child, write_json
from .gpu_correctness import CHECKS, CheckJob, run_check

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


MODES = ("fp32-nchw", "bf16-nchw", "bf16-cl")
IMPLS = ("ours", "torchvision", "timm")
SOURCES = ("premade", "cpu", "device")  # what feeds the trainer loop: pre-made batches, or JPEGs decoded there


@dataclass(frozen=True)
class TrainerJob:
    arch: str
    device: str
    image_size: int
    batch: int
    timed_s: float
    tf32: bool
    source: str = "premade"
    root: str = ""
    workers: int = 0
    kind: str = "trainer"


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

    from ..training.engine import compile_model
    from ..training.optim import optimizer_kernels
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

def _trainer_child(job: TrainerJob) -> Dict[str, Any]:
    import torch

    from data import TrainTransform, build_train_loader

    from ..training.checkpoint import Progress
    from ..training.signals import StopRequest
    from .gpu_correctness import FirstBatches, PremadeBatches, build_trainer

    device = torch.device(job.device)
    cuda = device.type == "cuda"
    trainer = build_trainer(device, batch=job.batch, image_size=job.image_size, amp="bf16" if cuda else "off",
                            channels_last=cuda, arch=job.arch, classes=1000, extra={"tf32": job.tf32})
    stop = StopRequest()  # not installed: nothing here should stop the loop
    loader = None
    if job.source != "premade":
        loader = build_train_loader(job.root, TrainTransform(job.image_size), batch_size=job.batch,
                                    workers=job.workers, pin_memory=device.type == "cuda",
                                    decode_on=device if job.source == "device" else None)

    def epoch(batches: int, number: int) -> float:
        if loader is None:
            source: Any = PremadeBatches(job.batch, job.image_size, batches, 1000, pin=device.type == "cuda")
        else:
            source = FirstBatches(loader, min(batches, len(loader)))
        trainer.progress = Progress(epoch=number, world_size=1, batch_size=job.batch, accum_steps=1)
        t0 = time.perf_counter()
        trainer.train_epoch(source, stop)
        _sync(device)
        return time.perf_counter() - t0

    warmup = 3 if loader is None else 2 * max(job.workers, 1) + 2  # autotuning; every worker started
    per_step = epoch(warmup, 0) / warmup
    steps = max(1, min(100, math.ceil(job.timed_s / per_step)))
    if loader is not None:
        steps = min(steps, len(loader))
    seconds = epoch(steps, 1)
    row = {"batch": job.batch, "images_per_s": job.batch * steps / seconds, "step_s": seconds / steps,
           "timed_steps": steps, "max_mem_bytes": peak_memory_bytes(device)}
    if loader is not None and loader.decoder is not None:
        row["decoded"] = dict(loader.decoder.counts)
        row["decoder"] = loader.decoder.backend
    return row


def child(payload: Dict[str, Any]) -> Dict[str, Any]:
    kind = payload.pop("kind")
    if kind == "model":
        payload["modes"] = tuple(payload["modes"])
        return _model_child(ModelJob(**payload))
    if kind == "check":
        return run_check(payload)
    return _trainer_child(TrainerJob(**payload))


# --- the plan and the table ----------------------------------------------------------------------------

@dataclass
class Plan:
    args: argparse.Namespace
    device: str
    started: float = field(default_factory=time.perf_counter)
    # Seconds a job takes per unit of ARCH_COST, by kind: first guesses, then what the last such job took.
    estimates: Dict[str, float] = field(default_factory=dict)
    skipped: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.args.quick:
            self.estimates = {"check": 15.0, "eager": 10.0, "compile": 20.0, "trainer": 10.0}
        else:
            self.estimates = {"check": 25.0, "eager": 40.0, "compile": 90.0, "trainer": 30.0}

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.started)

    def run(self, label: str, estimate_key: str, cost: float, job: Any) -> Optional[Dict[str, Any]]:
        """Run a job in a fresh process unless its estimated time no longer fits in the budget; kill it
        if it takes four times its estimate (at least a minute) or runs past the budget's end."""
        estimate = self.estimates[estimate_key] * cost
        if estimate > self.left():
            self.skipped.append(label)
            print(f"  skipped {label}: about {estimate:.0f} s needed, {max(self.left(), 0):.0f} s left", flush=True)
            return None
        timeout = max(10.0, min(max(4 * estimate, 60.0), self.left() + 30))
        t0 = time.perf_counter()
        try:
            result = run_child("gpu_check", asdict(job), timeout=timeout)
        except RuntimeError as e:
            result = {"error": str(e).strip().splitlines()[-1][:200]}
        took = time.perf_counter() - t0
        if "error" not in result:
            self.estimates[estimate_key] = took / cost
        print(f"  {label}: {took:.0f} s{' (' + result['error'] + ')' if 'error' in result else ''}", flush=True)
        return result


def add_parser(sub) -> None:
    p = sub.add_parser("gpu", help="GPU check: CUDA-only correctness checks, the DenseNets' training speed, the "
                       "input pipeline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the plumbing, not the speed")
    p.add_argument("--archs", default=",".join(ARCHS), help="comma-separated, densenet121 first")
    p.add_argument("--impls", default=",".join(IMPLS), help="ours first, then any of torchvision, timm")
    p.add_argument("--checks", default=",".join(CHECKS), help=f"correctness checks to run (default all: "
                   f"{','.join(CHECKS)}; 'none' for none)")
    p.add_argument("--image-size", type=int, default=None, help="default 224 (quick: 32)")
    p.add_argument("--min-batch", type=int, default=None, help="first batch of the search (default 32; quick: 2)")
    p.add_argument("--max-batch", type=int, default=None, help="last batch of the search (default 1024; quick: 2)")
    p.add_argument("--timed-s", type=float, default=None, help="seconds of timed steps per row (default 3)")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default 12; quick: 2)")
    p.add_argument("--trainer-batch", type=int, default=None, help="batch of the trainer-loop rows (default 256; "
                   "quick: 4)")
    p.add_argument("--samples", default=None, help="folder of <class>_*.JPEG files for the JPEG rows "
                   "(default: synthetic JPEGs)")
    p.add_argument("--compile-backend", default=None, help="default inductor (quick: eager)")
    p.add_argument("--no-tf32", dest="tf32", action="store_false", help="full float32 in the fp32 rows")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting new parts after this many "
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
    args.workers = pick(args.workers, 12, 2)
    args.trainer_batch = pick(args.trainer_batch, 256, 4)
    args.compile_backend = pick(args.compile_backend, "inductor", "eager")
    args.budget_s = pick(args.budget_s, 420.0, 600.0)
    args.archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    unknown = [a for a in args.archs if a not in ARCHS]
    if unknown or not args.archs or args.archs[0] != "densenet121":
        raise SystemExit(f"error: --archs must start with densenet121 and name only {', '.join(ARCHS)}")
    args.impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    if not args.impls or args.impls[0] != "ours" or not set(args.impls) <= set(IMPLS):
        raise SystemExit(f"error: --impls must be ours, then any of torchvision, timm; got {','.join(args.impls)}")
    args.checks = [] if args.checks.strip() == "none" else [c.strip() for c in args.checks.split(",") if c.strip()]
    if not set(args.checks) <= set(CHECKS):
        raise SystemExit(f"error: --checks must name only {', '.join(CHECKS)} (or none), got {','.join(args.checks)}")
    if args.min_batch < 1 or args.max_batch < args.min_batch:
        raise SystemExit(f"error: need 1 <= --min-batch <= --max-batch, got {args.min_batch}, {args.max_batch}")


def _jpeg_tree(args: argparse.Namespace, workdir: Path) -> Tuple[Path, str]:
    samples = Path(args.samples) if args.samples else None
    source = str(samples)
    if samples is None:
        samples = jpeg_tree.write_synthetic_samples(workdir / "samples", count=16 if args.quick else 100)
        source = "synthetic JPEGs, 500x375"
    files = len(jpeg_tree.sample_files(samples))
    # Enough images for the trainer rows' warm-up and timed steps: at most 100 steps after warm-up.
    needed = args.trainer_batch * (2 * args.workers + 2 + (8 if args.quick else 100))
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
        add_model_rows(impl, arch, plan.run(f"{impl} {arch} eager", "eager", ARCH_COST[arch],
                                            model_job(impl, arch, MODES)), MODES)

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
        root, source = _jpeg_tree(args, Path(tmp))
        check_size, check_batch = (64, 4) if args.quick else (224, 32)
        for name in args.checks:
            job = CheckJob(name, device, str(root), check_size, check_batch, min(args.workers, 4))
            result = plan.run(f"check {name}", "check", 1.0, job)
            rows.append({"part": "check", "impl": "ours", "arch": "-", "mode": name,
                         **(result if result is not None else {"error": "skipped (time budget)"})})
        mode = "bf16-cl" if device.startswith("cuda") else "fp32-nchw"  # the trainer's defaults there
        for feed in SOURCES:
            job = TrainerJob("densenet121", device, args.image_size, args.trainer_batch, args.timed_s, args.tf32,
                             source=feed, root=str(root), workers=args.workers)
            result = plan.run(f"trainer loop, {feed}", "trainer", 1.0 if feed == "premade" else 1.5, job)
            rows.append({"part": "trainer", "impl": "ours", "arch": "densenet121", "mode": f"{mode}, {feed}",
                         "workers": 0 if feed == "premade" else args.workers, "source": source,
                         **(result if result is not None else {"error": "skipped (time budget)"})})
        for impl in args.impls:
            eager(impl, "densenet121")
        compiled("ours", "densenet121")
        for arch in args.archs[1:]:
            eager("ours", arch)
        for impl in args.impls[1:]:
            compiled(impl, "densenet121")
        for arch in args.archs[1:]:
            compiled("ours", arch)
    _report(rows, args, device, time.perf_counter() - plan.started, plan.skipped)
    write_json(args.json, rows, {"image_size": args.image_size, "tf32": args.tf32, "quick": args.quick,
                                 "skipped": plan.skipped})
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


def _check_summary(row: Dict[str, Any]) -> str:
    if "error" in row:
        return row["error"]
    shown = {k: v for k, v in row.items() if k not in ("part", "impl", "arch", "mode", "ok", "seconds")}
    parts = [f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items() if v != ""]
    return ("PASS" if row.get("ok") else "FAIL") + ": " + "; ".join(parts)


def _report(rows: List[Dict[str, Any]], args: argparse.Namespace, device: str, seconds: float,
            skipped: List[str]) -> None:
    import torch

    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "CPU"
    print(f"\n{name}, torch {torch.__version__}, {os.cpu_count()} CPUs; {args.image_size} px; TF32 "
          f"{'on' if args.tf32 else 'off'}; {seconds:.0f} s in all")
    checks = [r for r in rows if r["part"] == "check"]
    if checks:
        print("\ncorrectness checks")
        for row in checks:
            print(f"  {row['mode']}: {_check_summary(row)}")
    bare = next((r for r in rows if r["part"] == "trainer" and r["mode"].endswith("premade") and "error" not in r),
                None)
    table = []
    for row in rows:
        if row["part"] == "check":
            continue
        if row["part"] == "model":
            vs = _ratio(row, _find(rows, row["impl"], row["arch"], "fp32-nchw"))
            label = row["mode"]
        else:
            vs = _ratio(row, bare)
            label = f"trainer loop, {row['mode']}" + (f", {row['workers']} workers" if row.get("workers") else "")
        if "error" in row:
            table.append([row["impl"], row["arch"], label, "", row["error"], "", "", "", ""])
            continue
        batch = f"{row['batch']}{'+' if row.get('capped') else ''}"
        extra = ""
        if "graphs" in row:
            extra = f"compile {row['first_step_s']:.0f}s, {row['graphs']} graphs, {row['recompiles']} recompiles"
        if "decoded" in row:
            extra = f"{row.get('decoder', '')} decoded " + ", ".join(f"{w} {n}" for w, n in row["decoded"].items())
        table.append([row["impl"], row["arch"], label, batch, f"{row['images_per_s']:.1f}",
                      f"{row['step_s']:.3f}" if "step_s" in row else "",
                      fmt_bytes(row["max_mem_bytes"]) if "max_mem_bytes" in row else "",
                      f"{vs:.2f}" if vs else "", extra])
    print("\nvs: model rows against the same model's fp32-nchw row; trainer rows against the trainer on pre-made "
          "batches. Model rows: synthetic input, batch = largest power of two that fits ('+': the --max-batch "
          f"cap {args.max_batch} fit)")
    print_table(["impl", "arch", "mode", "batch", "img/s", "step s", "max mem", "vs", "notes"], table)

    def model(impl: str, mode: str) -> Optional[Dict[str, Any]]:
        return _find(rows, impl, "densenet121", mode)

    def trainer(feed: str) -> Optional[Dict[str, Any]]:
        return next((r for r in rows if r["part"] == "trainer" and r["mode"].endswith(feed) and "error" not in r),
                    None)

    targets = [
        ("densenet121 bf16-cl / fp32-nchw", _ratio(model("ours", "bf16-cl"), model("ours", "fp32-nchw")), 3.0),
        ("densenet121 bf16-cl / bf16-nchw", _ratio(model("ours", "bf16-cl"), model("ours", "bf16-nchw")), 1.0),
        ("ours / torchvision densenet121, bf16-cl", _ratio(model("ours", "bf16-cl"), model("torchvision", "bf16-cl")),
         1.0),
        ("ours / timm densenet121, bf16-cl", _ratio(model("ours", "bf16-cl"), model("timm", "bf16-cl")), 1.0),
        ("ours / timm densenet121, bf16-cl compiled",
         _ratio(model("ours", "bf16-cl-compile"), model("timm", "bf16-cl-compile")), 1.0),
        ("trainer, device decode / pre-made batches", _ratio(trainer("device"), trainer("premade")), 0.9),
        ("trainer, CPU decode / pre-made batches", _ratio(trainer("cpu"), trainer("premade")), 0.9),
        ("trainer on pre-made batches / bare bf16-cl step", _ratio(trainer("premade"), model("ours", "bf16-cl")), 0.9),
    ]
    print()
    for label, value, target in targets:
        verdict = "n/a" if value is None else ("meets" if value >= target else "below")
        shown = "n/a" if value is None else f"{value:.2f}"
        print(f"  {label}: {shown} (target >= {target:g}: {verdict})")
    failed = [r["mode"] for r in checks if "error" in r or not r.get("ok")]
    print(f"\nchecks failed: {', '.join(failed) if failed else 'none'}; skipped (time budget): "
          f"{', '.join(skipped) if skipped else 'nothing'}")
