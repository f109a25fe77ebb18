"""What every benchmark shares: fresh child processes, repeat statistics, the table and the JSON."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple


def peak_memory_bytes(device: Any) -> int:
    """Peak memory of this process: max allocated on CUDA, peak RSS on the CPU."""
    import torch
    if getattr(device, "type", device) == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ru_maxrss is KiB on Linux


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on now (for a one-machine process group)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_child(kind: str, payload: Dict[str, Any], env: Optional[Dict[str, str]] = None,
              timeout: Optional[float] = None) -> Dict[str, Any]:
    """Run one measurement in a fresh interpreter, so its memory peak and warm caches are its own.
    A child still running after ``timeout`` seconds is killed: one hang must not eat a whole budget."""
    try:
        proc = subprocess.run([sys.executable, "-m", "densenet.bench", "_child", kind, json.dumps(payload)],
                              capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"timed out after {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {kind} {payload} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def spread(values: Sequence[float]) -> Tuple[float, float, float]:
    """(median, min, max) of repeated measurements."""
    return statistics.median(values), min(values), max(values)


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    line = "  ".join(f"{h:>{w}}" for h, w in zip(header, widths))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(f"{str(c):>{w}}" for c, w in zip(r, widths)))


def environment() -> Dict[str, Any]:
    import torch
    meta = {"command": " ".join([os.path.basename(sys.executable), "-m", "densenet.bench", *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "machine": platform.machine()}
    if torch.cuda.is_available():
        meta["gpu"] = torch.cuda.get_device_name(0)
    try:
        import PIL
        meta["pillow"] = PIL.__version__
    except ImportError:
        pass
    return meta


def write_json(path: Optional[str], rows: List[Dict[str, Any]], extra: Optional[Dict[str, Any]] = None) -> None:
    if not path:
        return
    with open(path, "w") as f:
        json.dump({"meta": {**environment(), **(extra or {})}, "rows": rows}, f, indent=2)
    print(f"\nwrote {path}")
