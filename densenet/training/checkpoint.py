"""Checkpoint files: atomic writes (data/files.py), keep-K, finding the newest valid one, RNG state for exact resume.

A checkpoint is a plain dict saved with torch.save and loadable with ``torch.load(weights_only=True)``:

    format        CHECKPOINT_FORMAT
    arch, config  model name and the resolved config as plain data
    model         the unwrapped model's state_dict (torchvision names, no module./_orig_mod. prefixes)
    ema           the EMA model's state_dict, or None
    optimizer     optimizer.state_dict()
    scaler        GradScaler.state_dict(), or None
    progress      epoch (completed epochs), batch_in_epoch (batches of that epoch already trained),
                  global_step (optimizer steps), world_size, batch_size, accum_steps, best_top1, best_epoch
    rng           one dict per rank: torch, cuda, numpy, python generator states
    classes       class ids (wnids) of the training data, in label order
    wandb_run_id  the W&B run to continue on resume, or None
"""
from __future__ import annotations

import io
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from data.files import atomic_write_bytes

CHECKPOINT_FORMAT = 1
LAST = "last.pt"
BEST = "best.pt"
_EPOCH_RE = re.compile(r"^epoch_(\d{4,})\.pt$")
_REQUIRED = ("format", "arch", "config", "model", "optimizer", "progress", "rng")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable or not one of ours."""


@dataclass
class Progress:
    """Where training stands; the position the data sampler resumes from is (epoch, batch_in_epoch)."""

    epoch: int = 0
    batch_in_epoch: int = 0
    global_step: int = 0
    world_size: int = 1
    batch_size: int = 0
    accum_steps: int = 1
    best_top1: float = -1.0
    best_epoch: int = -1

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Progress":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def same_layout(self, world_size: int, batch_size: int, accum_steps: int) -> bool:
        return (self.world_size, self.batch_size, self.accum_steps) == (world_size, batch_size, accum_steps)

    def relayout(self, world_size: int, batch_size: int, accum_steps: int) -> "Progress":
        """The same point of the epoch, counted in images, for another number of processes or batch size.

        Exact resume needs the same layout; this keeps a changed one from repeating or skipping
        more than one global batch of the interrupted epoch.
        """
        images_done = self.batch_in_epoch * self.world_size * self.batch_size
        step_images = world_size * batch_size * accum_steps
        batch_in_epoch = (images_done // step_images) * accum_steps
        return Progress(self.epoch, batch_in_epoch, self.global_step, world_size, batch_size, accum_steps,
                        self.best_top1, self.best_epoch)


def epoch_filename(completed_epochs: int) -> str:
    return f"epoch_{completed_epochs:04d}.pt"


# --- RNG state -------------------------------------------------------------------------------------

def capture_rng_state(device: torch.device) -> Dict[str, Any]:
    """This process's generator states as tensors and tuples (weights_only-loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }


def restore_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# --- files -----------------------------------------------------------------------------------------

def serialize(state: Dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """Load one of our checkpoints on the CPU, with weights_only=True; CheckpointError if it is not one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as e:  # truncated zip, bad pickle, disallowed global...: all mean "unusable"
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or any(k not in state for k in _REQUIRED):
        missing = [k for k in _REQUIRED if not isinstance(state, dict) or k not in state]
        raise CheckpointError(f"{path}: not a training checkpoint of this project (missing {', '.join(missing)})")
    if state["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {state['format']}, this code reads {CHECKPOINT_FORMAT}")
    return state


def resume_candidates(run_dir: Path) -> List[Path]:
    """Checkpoint files of a run folder, newest first. Every save writes last.pt, so it comes first;
    the others (best.pt, epoch_XXXX.pt) only matter when it is damaged, and go by modification time."""
    others = [run_dir / BEST] + [p for p in run_dir.glob("epoch_*.pt") if _EPOCH_RE.match(p.name)]
    others = sorted((p for p in others if p.is_file()), key=lambda p: -p.stat().st_mtime_ns)
    return ([run_dir / LAST] if (run_dir / LAST).is_file() else []) + others


def find_latest_valid(run_dir: Path, report: Callable[[str], None]) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """The newest checkpoint in run_dir that loads; unreadable ones are reported and skipped."""
    for path in resume_candidates(run_dir):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as e:
            report(f"warning: skipping checkpoint {e}; trying the next newest")
    return None


def choose_resume(run_dir: Path, resume: str, report: Callable[[str], None]) -> Optional[Path]:
    """The checkpoint a run starts from, by --resume: a file as given; 'auto', the newest one in the
    run folder that loads (None in a folder without checkpoints); 'never', None.

    A run folder holding checkpoints is never written over by a run that does not continue them:
    when none of them loads (a truncated last.pt, an older format), or with 'never', this raises a
    CheckpointError that names the files and the way out, before anything is written."""
    if resume not in ("auto", "never"):
        return Path(resume)
    existing = resume_candidates(run_dir)
    names = ", ".join(p.name for p in existing)
    if resume == "never":
        if existing:
            raise CheckpointError(f"{run_dir} holds checkpoints of an earlier run ({names}), which --no-resume "
                                  "would overwrite; give a new --output-dir, or drop --no-resume to continue that run")
        return None
    found = find_latest_valid(run_dir, report)
    if found is None and existing:
        raise CheckpointError(f"none of the checkpoints in {run_dir} loads ({names}); nothing was changed. "
                              "Resume from a good copy with --resume FILE, or start afresh with --no-resume "
                              "--output-dir NEW_FOLDER")
    return found[0] if found else None


def check_fits(ckpt: Dict[str, Any], path: str, arch: str, num_classes: Optional[int]) -> None:
    """One line saying what a checkpoint holds when it is not the network this run builds, instead of
    load_state_dict's list of every mismatched tensor (classes are compared when known)."""
    classifier = ckpt["model"].get("classifier.weight")
    saved_classes = int(classifier.shape[0]) if classifier is not None else None
    if ckpt["arch"] != arch or (None not in (saved_classes, num_classes) and saved_classes != num_classes):
        wanted = f"a {arch}" + (f" with {num_classes} classes" if num_classes is not None else "")
        raise CheckpointError(f"{path} holds a {ckpt['arch']} with {saved_classes} classes, but this run builds "
                              f"{wanted}; pass --arch {ckpt['arch']} (and the same data) to continue it, or give "
                              "a new --output-dir")


class CheckpointSaver:
    """Writes last.pt, best.pt and the newest K epoch_XXXX.pt of one run folder (rank 0 only)."""

    def __init__(self, run_dir: Path, keep_epochs: int) -> None:
        self.run_dir = run_dir
        self.keep_epochs = keep_epochs
        # Temp files left by a save that was killed half-way are garbage, never a checkpoint
        # (atomic_write_bytes names them .<name>.tmp-<pid>).
        for stale in run_dir.glob(".*.pt.tmp-*"):
            stale.unlink(missing_ok=True)

    def save(self, state: Dict[str, Any], *, epoch_end: bool, is_best: bool) -> List[Path]:
        data = serialize(state)  # serialised once, written to every file that needs it
        written = [self.run_dir / LAST]
        if epoch_end and self.keep_epochs > 0:
            written.append(self.run_dir / epoch_filename(state["progress"]["epoch"]))
        if is_best:
            written.append(self.run_dir / BEST)
        for path in written:
            atomic_write_bytes(path, data)
        if epoch_end:
            self._prune_epochs()
        return written

    def _prune_epochs(self) -> None:
        epochs = sorted((int(m.group(1)), p) for p in self.run_dir.glob("epoch_*.pt")
                        if (m := _EPOCH_RE.match(p.name)))
        for _, path in epochs[: max(0, len(epochs) - self.keep_epochs)]:
            path.unlink(missing_ok=True)
