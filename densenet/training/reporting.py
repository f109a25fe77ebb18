"""What rank 0 tells the user: console lines, the metrics.jsonl file and summary.csv of the run folder.

summary.csv holds one row per evaluation (timm's habit), for a spreadsheet or pandas. Every JSONL
line is one JSON object with at least "kind" ("train", "eval", "epoch" or "event"), "epoch" (the
1-based number of the epoch the line belongs to), "step" (global optimizer step) and "time" (Unix
seconds), plus the metric values.
"""
from __future__ import annotations

import csv
import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, TextIO

import torch


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    clock = f"{h:d}:{m:02d}:{s:02d}"
    return f"{days}d {clock}" if days else clock


def max_memory_gib(device: torch.device) -> float:
    """Peak allocated device memory on CUDA; on the CPU, this process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


class RunLog:
    """Console output and the JSONL metrics file; silent on ranks other than 0."""

    def __init__(self, run_dir: Optional[Path], is_main: bool, stream: TextIO = sys.stdout) -> None:
        self.is_main = is_main
        self.stream = stream
        self._jsonl = open(run_dir / "metrics.jsonl", "a") if (is_main and run_dir is not None) else None
        self._summary = run_dir / "summary.csv" if (is_main and run_dir is not None) else None

    def print(self, message: str) -> None:
        if self.is_main:
            print(message, file=self.stream, flush=True)

    def record(self, kind: str, *, epoch: int, step: int, **values: Any) -> None:
        if self._jsonl is None:
            return
        line = {"kind": kind, "epoch": epoch, "step": step, "time": round(time.time(), 3), **values}
        self._jsonl.write(json.dumps(line, allow_nan=True) + "\n")
        self._jsonl.flush()

    def summary(self, row: Dict[str, Any]) -> None:
        """Append one row to summary.csv; a resumed run keeps the columns the file already has."""
        if self._summary is None:
            return
        columns = list(row)
        if self._summary.is_file() and self._summary.stat().st_size:
            with open(self._summary, newline="") as f:
                columns = next(csv.reader(f), columns)
        with open(self._summary, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            if f.tell() == 0:
                writer.writeheader()
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


class StepTimer:
    """Data-wait and step times over the current logging window, plus a smoothed step time for ETAs."""

    def __init__(self) -> None:
        self.window_start = time.perf_counter()
        self.data_time = 0.0
        self.steps = 0
        self.images = 0
        self.smoothed_step: Optional[float] = None

    def add_data(self, data_time: float, images: int) -> None:
        self.data_time += data_time
        self.images += images

    def end_step(self) -> None:
        self.steps += 1

    def window(self) -> Dict[str, float]:
        """Close the window: images/s (of this process), data-wait share, mean step time."""
        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
        steps = max(self.steps, 1)
        step_time = elapsed / steps
        # The first window includes warm-up (compile, cudnn autotuning): weigh later windows more.
        self.smoothed_step = step_time if self.smoothed_step is None else 0.7 * self.smoothed_step + 0.3 * step_time
        out = {"images_per_s": self.images / elapsed, "data_wait": self.data_time / elapsed, "step_time": step_time}
        self.window_start = time.perf_counter()
        self.data_time, self.steps, self.images = 0.0, 0, 0
        return out

    def eta(self, steps_left: int) -> float:
        return float("nan") if self.smoothed_step is None else steps_left * self.smoothed_step
