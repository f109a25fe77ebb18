"""Helpers for the trainer tests: real train_dist.py processes (plain python or torchrun) on real JPEG trees."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "train_dist.py")
# densenet_tiny at 32 px with no loader workers: a step takes tens of milliseconds on one core.
TINY = ["--arch", "densenet_tiny", "--image-size", "32", "--workers", "0", "--wandb", "disabled", "--log-every", "1"]


def demo_root(dest: Path, val_keep: Optional[int] = None) -> Path:
    """The built-in demo tree (real JPEGs, 10 classes, 500 train / 100 val), optionally with only
    `val_keep` validation images so that their number does not divide by the world size."""
    from data import resolve_data_root

    root = resolve_data_root("demo", cache_dir=dest / "cache")
    if val_keep is None:
        return root
    odd = dest / "odd"
    shutil.copytree(root, odd)
    val_files = sorted((odd / "val").rglob("*.JPEG"))
    for f in val_files[val_keep:]:
        f.unlink()
    return odd


def env() -> Dict[str, str]:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_SILENT="true")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "WANDB_MODE", "SLURM_PROCID",
                "SLURM_STEP_NUM_TASKS"):
        e.pop(key, None)
    return e


def command(args: Sequence[str], nproc: int = 1) -> List[str]:
    if nproc == 1:
        return [sys.executable, TRAIN, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", TRAIN, *args]


def run(args: Sequence[str], nproc: int = 1, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run to the end; stdout and stderr together in .stdout."""
    return subprocess.run(command(args, nproc), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


# A backend that records each graph torch.compile hands it and runs the graph as captured: Dynamo's
# guards and recompilation decisions are the same as under inductor, without its code generation.
COUNTING_RUN = """
import sys
from torch._dynamo import register_backend
graphs = []

@register_backend
def counting(gm, example_inputs):
    # the batch of images: the largest 4-d input with 3 channels (the stem's weights are one too)
    images = [x for x in example_inputs if getattr(x, "ndim", 0) == 4 and x.shape[1] == 3]
    graphs.append(tuple(max(images, key=lambda x: x.numel()).shape) if images else None)
    return gm.forward

import train_dist
status = train_dist.main(sys.argv[1:])
print("GRAPHS", len(graphs), sorted(s[-1] for s in graphs if s), flush=True)
sys.exit(status)
"""


def compiled_graphs(args: Sequence[str]) -> tuple:
    """Run train_dist.py (one process) with ``args`` under the counting backend (``--compile
    --compile-backend counting``): (graphs compiled, the image size of each, sorted; the output)."""
    proc = subprocess.run([sys.executable, "-c", COUNTING_RUN, *args], cwd=REPO, env=env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout
    match = re.search(r"^GRAPHS (\d+) \[(.*)\]$", proc.stdout, re.M)
    assert match, proc.stdout
    return int(match.group(1)), [int(s) for s in match.group(2).split(",") if s.strip()], proc.stdout


class Background:
    """A training run in the background whose output goes to a file we can watch."""

    def __init__(self, args: Sequence[str], log_path: Path, nproc: int = 1) -> None:
        self.log_path = log_path
        self._log = open(log_path, "w")
        # A session of its own, so that a signal can go to the whole process group, as Ctrl-C or SLURM send it.
        self.proc = subprocess.Popen(command(args, nproc), cwd=REPO, env=env(), stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log_path.read_text()

    def wait_for(self, pattern: str, timeout: float = 180) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.output())
            if m:
                return m
            if self.proc.poll() is not None:
                raise AssertionError(f"run ended (status {self.proc.returncode}) before {pattern!r}:\n{self.output()}")
            time.sleep(0.02)
        raise AssertionError(f"no {pattern!r} within {timeout}s:\n{self.output()}")

    def finish(self, timeout: float = 180) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def worker_pid(self, rank: int) -> int:
        """The torchrun worker process of `rank` (a child of the launcher)."""
        children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True,
                                  text=True).stdout.split()
        for pid in map(int, children):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return pid
        raise AssertionError(f"no worker with RANK={rank} among {children}")

    def kill(self, sig: int = signal.SIGTERM, pid: Optional[int] = None) -> None:
        os.kill(pid or self.proc.pid, sig)

    def kill_group(self, sig: int) -> None:
        """Signal the launcher and every process it started, as SLURM or a terminal's Ctrl-C does."""
        os.killpg(self.proc.pid, sig)


def jsonl(run_dir: Path) -> List[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _tensors(obj, prefix: str = "") -> Dict[str, torch.Tensor]:
    out: Dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_tensors(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_tensors(v, f"{prefix}/{i}"))
    return out


def assert_same_training_state(a: Path, b: Path) -> None:
    """Bitwise equal weights, EMA, optimizer buffers and position."""
    sa, sb = load(a), load(b)
    for key in ("global_step", "epoch", "batch_in_epoch"):
        assert sa["progress"][key] == sb["progress"][key], (key, sa["progress"], sb["progress"])
    for part in ("model", "ema", "optimizer", "scaler"):
        ta, tb = _tensors(sa[part]), _tensors(sb[part])
        assert ta.keys() == tb.keys(), part
        differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
        assert not differ, f"{part} differs in {len(differ)} tensors, e.g. {differ[:3]}"
    assert len(_tensors(sa["model"])) > 10


# --- W&B offline run files ----------------------------------------------------------------------------

def wandb_records(run_file: Path) -> list:
    """Decode a W&B .wandb file: a ':W&B' header, then a LevelDB-style log of protobuf Records
    (32 KiB blocks; 7-byte chunk headers of crc32, length, type; full/first/middle/last chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", f"{run_file} is not a W&B run file"
    pos, block, pending, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the rest of a block too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            pending, complete = b"", chunk
        elif kind == 2:
            pending, complete = chunk, None
        elif kind == 3:
            pending, complete = pending + chunk, None
        elif kind == 4:
            pending, complete = b"", pending + chunk
        else:
            break  # zero padding at the end of the file
        if complete is not None:
            record = pb.Record()
            record.ParseFromString(complete)
            records.append(record)
    return records


def wandb_history(run_file: Path) -> Dict[int, dict]:
    """{step: {metric: value}} of every history record in the file."""
    history: Dict[int, dict] = {}
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            history.setdefault(record.history.step.num, {}).update(items)
    return history


def wandb_config(run_file: Path) -> dict:
    config: dict = {}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        updates = record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
        for item in updates:
            config[item.key] = json.loads(item.value_json)
    return config
