"""What rank 0 tells the user, through one ``Reporter``: console lines, the run folder's
metrics.jsonl and summary.csv, and the W&B run.

summary.csv holds one row per evaluation (timm's habit), for a spreadsheet or pandas. Every JSONL
line is one JSON object with at least "kind" ("train", "eval", "epoch" or "event"), "epoch" (the
1-based number of the epoch the line belongs to), "step" (global optimizer step) and "time" (Unix
seconds), plus the metric values. W&B gets the same values as ``train/<name>`` and
``epoch/<name>``, at the global step, with the fractional epoch as ``epoch``.
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

from .wandb_run import WandbRun


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


def unreadable_note(count: int) -> str:
    return f" ({count} unreadable, left out)" if count else ""


class Reporter:
    """Every record of a run, fanned out to the console, the JSONL and CSV files and W&B; silent
    on ranks other than 0 (their W&B run is nothing, their run folder None)."""

    def __init__(self, run_dir: Optional[Path], is_main: bool, wandb: Optional[WandbRun] = None,
                 stream: TextIO = sys.stdout) -> None:
        self.is_main = is_main
        self.stream = stream
        self.wandb = wandb if wandb is not None else WandbRun()
        self._jsonl = open(run_dir / "metrics.jsonl", "a") if (is_main and run_dir is not None) else None
        self._summary = run_dir / "summary.csv" if (is_main and run_dir is not None) else None

    def print(self, message: str) -> None:
        if self.is_main:
            print(message, file=self.stream, flush=True)

    def event(self, event: str, *, epoch: int, step: int, **values: Any) -> None:
        """Something that happened to the run (resumed, interrupted, non-finite loss): a JSONL line."""
        self._record("event", epoch=epoch, step=step, event=event, **values)

    def train_window(self, *, epoch: int, epochs: int, step: int, epoch_step: int, steps_per_epoch: int,
                     values: Dict[str, float], memory_kind: str) -> None:
        """The training figures of the last --log-every steps."""
        self.print(
            f"epoch {epoch}/{epochs}  step {epoch_step}/{steps_per_epoch} "
            f"(global {step})  loss {values['loss']:.4f}  lr {values['lr']:.4g}  "
            f"{values['images_per_s']:.1f} img/s  data {100 * values['data_wait']:.0f}%  "
            f"step {values['step_time']:.3f}s  eta epoch {format_duration(values['eta_epoch_s'])} "
            f"run {format_duration(values['eta_run_s'])}  mem {values['max_mem_gib']:.2f} {memory_kind}")
        self._record("train", epoch=epoch, step=step, epoch_step=epoch_step, **values)
        self.wandb.log({f"train/{k}": v for k, v in values.items()}
                       | {"epoch": epoch - 1 + epoch_step / steps_per_epoch}, step=step)

    def epoch_end(self, *, epoch: int, epochs: int, step: int, complete: bool, epochs_done: float,
                  metrics: Dict[str, float], best_top1: float, lr: float) -> None:
        """An epoch's training loss and evaluation (``val_`` and ``val_ema_`` keys), once it is
        complete or stopped by --max-steps; ``epochs_done`` is the fractional epoch count."""
        ema = f"  ema top1 {metrics['val_ema_top1']:.2f}" if "val_ema_top1" in metrics else ""
        self.print(f"epoch {epoch}/{epochs} {'done' if complete else 'stopped'} "
                   f"(step {step}): train loss {metrics['train_loss']:.4f}  "
                   f"val top1 {metrics['val_top1']:.2f}  top5 {metrics['val_top5']:.2f}  "
                   f"loss {metrics['val_loss']:.4f} on {metrics['val_count']} images"
                   f"{unreadable_note(metrics['val_unreadable'])}{ema}  best {best_top1:.2f}  "
                   f"bad samples {metrics['bad_samples']}  {metrics['epoch_time_s']:.0f}s")
        self._record("eval", epoch=epoch, step=step, **{k[4:]: v for k, v in metrics.items() if k.startswith("val_")})
        self._record("epoch", epoch=epoch, step=step, epoch_complete=complete, best_top1=best_top1, **metrics)
        self._summary_row({"epoch": epoch, "step": step, "lr": lr, **metrics})
        self.wandb.log({f"epoch/{k}": v for k, v in metrics.items()} | {"epoch": epochs_done}, step=step)

    def finish(self, exit_code: int, preempted: bool = False) -> None:
        """Close the W&B run (marked preempting when a signal stopped it) and the files."""
        if preempted:
            self.wandb.mark_preempting()
        self.wandb.finish(exit_code)
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None

    def _record(self, kind: str, *, epoch: int, step: int, **values: Any) -> None:
        if self._jsonl is None:
            return
        line = {"kind": kind, "epoch": epoch, "step": step, "time": round(time.time(), 3), **values}
        self._jsonl.write(json.dumps(line, allow_nan=True) + "\n")
        self._jsonl.flush()

    def _summary_row(self, row: Dict[str, Any]) -> None:
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
