"""Model training step (forward, backward, SGD step): ours against torchvision's and timm's DenseNet.

    # memory-efficient vs plain, ours and torchvision's (CPU, densenet121, batch 32, 224 px)
    python -m densenet.bench step --impl ours,torchvision --memory-efficient off,on --repeats 3

    # layouts and precisions against torchvision and timm
    python -m densenet.bench step --impl ours,torchvision,timm --channels-last off,on --amp off,bf16

    # the same comparison under each host-memory setting of the process (CPU)
    python -m densenet.bench step --impl ours,torchvision --memory-efficient off,on --allocator system,thp

Every configuration runs in a fresh process (its peak memory is its own: peak RSS on the CPU, max
allocated on CUDA), and configurations are interleaved within each repeat, each repeat starting one
row later than the last, so a slow drift of a noisy machine hits every row alike. The first row is
the reference of the ratio columns.

On the CPU a large share of a DenseNet step can go to the kernel handing out fresh zeroed pages:
glibc returns every freed block above 32 MiB to the system, so each step faults its activations in
again. `--allocator` runs the process with glibc's defaults (`system`), with PyTorch's transparent
huge pages for blocks of 2 MiB and more (`thp`: THP_MEM_ALLOC_ENABLE=1, one fault per 2 MiB instead
of per 4 KiB where the kernel allows huge pages on request), or with the trainer's
`--cpu-keep-memory` setting (`keep`: freed memory stays in the process, which also holds on to
fragments, so its peak RSS is higher).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List

from .common import fmt_bytes, peak_memory_bytes, print_table, run_child, spread, write_json

IMPLS = ("ours", "torchvision", "timm")
ALLOCATORS = ("system", "thp", "keep")


@dataclass(frozen=True)
class StepConfig:
    impl: str
    arch: str
    batch_size: int
    image_size: int
    channels_last: bool
    amp: str  # "off" | "bf16" | "fp16"
    memory_efficient: bool
    compile: bool
    device: str
    warmup: int
    steps: int
    allocator: str = "system"  # "system" | "thp" | "keep" (host memory of the process)

    def cells(self) -> List[str]:
        return [self.impl, "cl" if self.channels_last else "nchw", self.amp,
                "mem-eff" if self.memory_efficient else "plain", "yes" if self.compile else "no", self.allocator]

    def env(self) -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
        if self.allocator == "thp":
            # Read once by PyTorch's CPU allocator at its first allocation, so it must be in place
            # before the child imports torch.
            env["THP_MEM_ALLOC_ENABLE"] = "1"
        return env


def build_model(impl: str, arch: str, memory_efficient: bool):
    if impl == "ours":
        import densenet
        return densenet.create_model(arch, memory_efficient=memory_efficient)
    if impl == "torchvision":
        import torchvision
        return getattr(torchvision.models, arch)(memory_efficient=memory_efficient)
    if impl == "timm":
        import timm
        model = timm.create_model(arch, pretrained=False)
        if memory_efficient:
            model.set_grad_checkpointing(True)
        return model
    raise ValueError(f"unknown implementation {impl!r}; choose from {IMPLS}")


def child(payload: Dict[str, Any]) -> Dict[str, Any]:
    """One configuration in this process: warm-up steps, then timed training steps."""
    import torch
    import torch.nn.functional as F

    cfg = StepConfig(**payload)
    applied = cfg.allocator == "system"
    if cfg.allocator == "keep":
        from densenet.training.settings import keep_freed_memory
        applied = keep_freed_memory()
    elif cfg.allocator == "thp":
        applied = os.environ.get("THP_MEM_ALLOC_ENABLE") == "1"
    torch.manual_seed(0)
    device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = build_model(cfg.impl, cfg.arch, cfg.memory_efficient).to(device, memory_format=fmt).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    forward = torch.compile(model) if cfg.compile else model
    x = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, device=device).to(memory_format=fmt)
    y = torch.randint(0, model.classifier.out_features, (cfg.batch_size,), device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(forward(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(cfg.warmup):
        step()
    sync()
    times = []
    for _ in range(cfg.steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    return {"step_s": step_s, "images_per_s": cfg.batch_size / step_s, "peak_mem_bytes": peak_memory_bytes(device),
            "allocator_applied": applied}


def _choices(allowed):
    def parse(text: str) -> List[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        if not values or any(v not in allowed for v in values):
            raise argparse.ArgumentTypeError(f"{text!r}: give a comma-separated list of {', '.join(allowed)}")
        return values
    return parse


def add_parser(sub) -> None:
    p = sub.add_parser("step", help="model training step: images/s and peak memory",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="densenet121")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--impl", type=_choices(IMPLS), default=["ours", "torchvision"])
    p.add_argument("--channels-last", type=_choices(("off", "on")), default=["off"])
    p.add_argument("--amp", type=_choices(("off", "bf16", "fp16")), default=["off"])
    p.add_argument("--memory-efficient", type=_choices(("off", "on")), default=["off"])
    p.add_argument("--compile", type=_choices(("off", "on")), default=["off"])
    p.add_argument("--allocator", type=_choices(ALLOCATORS), default=["system"],
                   help="host memory setting of the process: system (glibc defaults), thp (PyTorch's "
                        "transparent huge pages), keep (the trainer's --cpu-keep-memory)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=2, help="timed steps per process (their median counts)")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per configuration")
    p.add_argument("--json", default=None, help="also write the rows as JSON to this file")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> List[Dict[str, Any]]:
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    configs = [
        StepConfig(impl, args.arch, args.batch_size, args.image_size, cl == "on", amp, me == "on", comp == "on",
                   device, args.warmup, args.steps, alloc)
        for impl, cl, amp, me, comp, alloc in itertools.product(args.impl, args.channels_last, args.amp,
                                                               args.memory_efficient, args.compile, args.allocator)
    ]
    results: Dict[StepConfig, List[Dict[str, float]]] = {c: [] for c in configs}
    for r in range(args.repeats):
        # Start each repeat one row later, so no configuration always runs first (cold caches, a
        # machine just going quiet) and the drift of the machine spreads over all rows.
        shift = r % len(configs)
        for cfg in configs[shift:] + configs[:shift]:
            res = run_child("step", asdict(cfg), env=cfg.env())
            results[cfg].append(res)
            print(f"  repeat {r + 1}/{args.repeats}  {' '.join(cfg.cells())}  {res['images_per_s']:.2f} img/s  "
                  f"step {res['step_s']:.3f}s  peak {fmt_bytes(res['peak_mem_bytes'])}", flush=True)

    ref = configs[0]
    ref_ips = statistics.median(r["images_per_s"] for r in results[ref])
    ref_mem = statistics.median(r["peak_mem_bytes"] for r in results[ref])
    rows, table = [], []
    for cfg in configs:
        med, lo, hi = spread([r["images_per_s"] for r in results[cfg]])
        mem = statistics.median(r["peak_mem_bytes"] for r in results[cfg])
        row = {**asdict(cfg), "images_per_s": med, "images_per_s_min": lo, "images_per_s_max": hi,
               "step_s": cfg.batch_size / med, "peak_mem_bytes": mem, "speed_ratio": med / ref_ips,
               "time_ratio": ref_ips / med, "mem_ratio": mem / ref_mem, "repeats": args.repeats,
               "allocator_applied": all(r["allocator_applied"] for r in results[cfg])}
        rows.append(row)
        table.append([*cfg.cells(), f"{med:.2f}", f"{lo:.2f}-{hi:.2f}", f"{row['step_s']:.3f}", fmt_bytes(mem),
                      f"{row['speed_ratio']:.3f}", f"{row['time_ratio']:.3f}", f"{row['mem_ratio']:.3f}"])
    print(f"\n{args.arch}, batch {args.batch_size}, {args.image_size} px, {device}; {args.warmup} warm-up + "
          f"{args.steps} timed steps per process (median), {args.repeats} fresh processes per row "
          f"(median, min-max); reference row: {' '.join(ref.cells())}")
    print_table(["impl", "fmt", "amp", "mode", "compile", "allocator", "img/s", "spread", "step s", "peak mem",
                 "speed/ref", "time/ref", "mem/ref"], table)
    write_json(args.json, rows)
    return rows
