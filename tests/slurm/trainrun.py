"""Reading a training run from the outside, as the launch tests need it: metrics.jsonl records,
events, and waiting for a condition with a useful message when it never comes."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "train_dist.py"

# The tiniest real training: the built-in demo data at 32 px, a few-thousand-parameter DenseNet,
# a line in metrics.jsonl every step and a checkpoint every few.
TINY_TRAINING = [
    "--data", "demo", "--arch", "densenet_tiny", "--image-size", "32", "--batch-size", "8",
    "--workers", "0", "--log-every", "1", "--wandb", "disabled",
]


def training_env(**extra: str) -> dict[str, str]:
    """This environment without launcher variables a surrounding job could leak into a test."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "TORCHELASTIC_"))
           and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(WANDB_MODE="disabled", PYTHONUNBUFFERED="1", **extra)
    return env


def read_metrics(run_dir: Path) -> list[dict]:
    """Records of metrics.jsonl; a line still being written is left for the next read."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return records


def events(records: list[dict], name: str) -> list[dict]:
    return [r for r in records if r.get("kind") == "event" and r.get("event") == name]


def resumes(records: list[dict], max_steps: int) -> tuple[list[dict], list[dict]]:
    """"resumed" events split into those that continued training and those after the run was
    already complete; the latter mean a process failed after the last step and torchrun (with
    MAX_RESTARTS) restarted the finished run."""
    every = events(records, "resumed")
    return ([r for r in every if r["from_step"] < max_steps],
            [r for r in every if r["from_step"] >= max_steps])


def last_train_step(records: list[dict]) -> int:
    return max((r["step"] for r in records if r.get("kind") == "train"), default=0)


def wait_until(condition: Callable[[], object], timeout: float, what: str,
               explain: Callable[[], str] = lambda: "", poll: float = 0.25):
    """Polls until ``condition()`` is truthy and returns its value; fails with ``explain()``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{explain()}")
        time.sleep(poll)


def tail(path: Path, n: int = 60) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return f"({path} not written)"
    return f"--- last {min(n, len(lines))} lines of {path} ---\n" + "\n".join(lines[-n:])
