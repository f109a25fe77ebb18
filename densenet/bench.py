"""Training-step benchmark: our DenseNet against torchvision's and timm's, side by side.

Each measurement runs in a fresh child process, so its peak memory (peak RSS on the CPU, max
allocated on CUDA) belongs to that configuration alone. Configurations are interleaved across
repeats, so slow drift of a noisy machine hits every row alike; the table shows the median and the
spread (min-max) over repeats, and the ratio of each row to its reference row.

    # memory-efficient vs plain, ours and torchvision's (CPU, densenet121, batch 32, 224 px)
    python -m densenet.bench step --arch densenet121 --batch-size 32 --image-size 224 \
        --impl ours,torchvision --memory-efficient off,on --repeats 3 --json bench-step.json

    # layouts and precisions against torchvision and timm
    python -m densenet.bench step --impl ours,torchvision,timm --channels-last off,on --amp off,bf16
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

IMPLS = ("ours", "torchvision", "timm")


@dataclass(frozen=True)
class StepConfig:
    impl: str
    arch: str
    batch_size: int
    image_size: int
    channels_last: bool
    amp: str  # "off" | "bf16" | "fp16"
    memory_efficient: bool
    device: str
    warmup: int
    steps: int

    def label(self) -> str:
        return (f"{self.impl:<11} {'cl' if self.channels_last else 'nchw':<4} {self.amp:<4} "
                f"{'mem-eff' if self.memory_efficient else 'plain':<7}")


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


def _peak_memory_bytes(device) -> int:
    import torch
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_step_child(cfg: StepConfig) -> Dict[str, float]:
    """One configuration, in this process: warm-up steps, then timed SGD training steps."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = build_model(cfg.impl, cfg.arch, cfg.memory_efficient).to(device, memory_format=fmt).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    x = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, device=device).to(memory_format=fmt)
    y = torch.randint(0, 1000, (cfg.batch_size,), device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
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
    return {"step_s": step_s, "images_per_s": cfg.batch_size / step_s, "peak_mem_bytes": _peak_memory_bytes(device)}


def _run_in_child(cfg: StepConfig) -> Dict[str, float]:
    proc = subprocess.run([sys.executable, "-m", "densenet.bench", "_child", json.dumps(asdict(cfg))],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed for {cfg.label()}:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _choices(text: str, allowed) -> List[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"{text!r}: each value must be one of {sorted(allowed)}")
    return values


def _fmt_mem(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def bench_step(args: argparse.Namespace) -> List[Dict]:
    device = args.device or ("cuda" if _cuda_available() else "cpu")
    configs = [
        StepConfig(impl, args.arch, args.batch_size, args.image_size, cl == "on", amp, me == "on", device,
                   args.warmup, args.steps)
        for impl, cl, amp, me in itertools.product(args.impl, args.channels_last, args.amp, args.memory_efficient)
    ]
    results: Dict[StepConfig, List[Dict[str, float]]] = {c: [] for c in configs}
    for r in range(args.repeats):
        for cfg in configs:  # interleaved: every repeat visits every configuration once
            res = _run_in_child(cfg)
            results[cfg].append(res)
            print(f"  repeat {r + 1}/{args.repeats}  {cfg.label()}  {res['images_per_s']:8.2f} img/s  "
                  f"step {res['step_s']:.3f}s  peak {_fmt_mem(res['peak_mem_bytes'])}", flush=True)

    reference = configs[0]
    ref_ips = statistics.median(r["images_per_s"] for r in results[reference])
    ref_mem = statistics.median(r["peak_mem_bytes"] for r in results[reference])
    rows = []
    print()
    print(f"arch={args.arch} batch={args.batch_size} image={args.image_size} device={device} "
          f"warmup={args.warmup} timed steps={args.steps} repeats={args.repeats} (fresh process each)")
    print(f"reference row: {reference.label().strip()}")
    header = (f"{'impl':<11} {'fmt':<4} {'amp':<4} {'mode':<7} {'img/s':>8} {'spread':>15} "
              f"{'step s':>7} {'peak mem':>10} {'speed/ref':>9} {'time/ref':>8} {'mem/ref':>7}")
    print(header)
    print("-" * len(header))
    for cfg in configs:
        ips = [r["images_per_s"] for r in results[cfg]]
        mem = statistics.median(r["peak_mem_bytes"] for r in results[cfg])
        med = statistics.median(ips)
        row = {**asdict(cfg), "images_per_s": med, "images_per_s_min": min(ips), "images_per_s_max": max(ips),
               "step_s": args.batch_size / med, "peak_mem_bytes": mem,
               "speed_ratio": med / ref_ips, "time_ratio": ref_ips / med, "mem_ratio": mem / ref_mem,
               "repeats": args.repeats}
        rows.append(row)
        print(f"{cfg.label()} {med:8.2f} {f'{min(ips):.2f}-{max(ips):.2f}':>15} {row['step_s']:7.3f} "
              f"{_fmt_mem(mem):>10} {row['speed_ratio']:9.3f} {row['time_ratio']:8.3f} {row['mem_ratio']:7.3f}")
    if args.json:
        meta = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "python": platform.python_version(),
                "torch": _torch_version(), "cpus": os.cpu_count(), "machine": platform.machine()}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
        print(f"\nwrote {args.json}")
    return rows


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def _torch_version() -> str:
    import torch
    return torch.__version__


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        cfg = StepConfig(**json.loads(argv[1]))
        print(json.dumps(run_step_child(cfg)))
        return 0
    parser = argparse.ArgumentParser(prog="python -m densenet.bench",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    step = sub.add_parser("step", help="model training step: images/s and peak memory")
    step.add_argument("--arch", default="densenet121")
    step.add_argument("--batch-size", type=int, default=32)
    step.add_argument("--image-size", type=int, default=224)
    step.add_argument("--impl", type=lambda s: _choices(s, IMPLS), default=["ours", "torchvision"])
    step.add_argument("--channels-last", type=lambda s: _choices(s, ("off", "on")), default=["off"])
    step.add_argument("--amp", type=lambda s: _choices(s, ("off", "bf16", "fp16")), default=["off"])
    step.add_argument("--memory-efficient", type=lambda s: _choices(s, ("off", "on")), default=["off"])
    step.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    step.add_argument("--warmup", type=int, default=1)
    step.add_argument("--steps", type=int, default=2)
    step.add_argument("--repeats", type=int, default=3)
    step.add_argument("--json", default=None, help="also write the rows as JSON to this file")
    args = parser.parse_args(argv)
    if args.command == "step":
        bench_step(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
