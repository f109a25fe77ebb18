"""The run's checkpoints, owned by one ``Checkpointer``: it finds and loads the one to resume
from, decides when to write, builds and writes them (atomically, keeping the newest K epochs), and
carries every rank's RNG state for exact resume.

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

import random
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from data.files import atomic_write_bytes

from ..weights import WeightsError, load_torch_file, serialize
from .config import Config, config_to_dict
from .distributed import DistInfo, barrier, checked_on_every_rank, decided_by_main, gather_objects
from .settings import seed_all

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

    def note_top1(self, top1: float, epoch: int) -> bool:
        """Keep an evaluation's top-1 if it is the best so far (``epoch`` 1-based); True if it is."""
        if not top1 > self.best_top1:  # a NaN top-1 is never the best
            return False
        self.best_top1, self.best_epoch = top1, epoch
        return True

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

def load_checkpoint(path: Path) -> Dict[str, Any]:
    """Load one of our checkpoints on the CPU, with weights_only=True; CheckpointError if it is not one."""
    try:
        state = load_torch_file(path, what="checkpoint")
    except WeightsError as e:  # missing, not a file, truncated zip, disallowed global...: all "unusable"
        raise CheckpointError(str(e)) from None
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


@dataclass
class Resumed:
    """The checkpoint a run continues, as loaded."""
    path: Path
    state: Dict[str, Any]

    @property
    def progress(self) -> Progress:
        return Progress.from_dict(self.state["progress"])


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Checkpointer:
    """The checkpoints of one run folder.

    Before anything is written, ``find_resume`` chooses (rank 0) and loads (every rank) the
    checkpoint to continue; ``restore`` puts it into the trainer. During the run the trainer asks
    ``due`` after every step and calls ``save``, as the epoch loop does after each evaluation: every
    rank contributes its RNG state, rank 0 writes last.pt, best.pt and the newest ``keep_epochs``
    epoch_XXXX.pt, and nobody moves on before the files are complete.
    """

    def __init__(self, run_dir: Path, cfg: Config, info: DistInfo) -> None:
        self.run_dir = run_dir
        self.cfg = cfg
        self.info = info
        self._record: Optional[Dict[str, Any]] = None  # what every checkpoint of the run also holds
        self._report: Callable[[str], None] = print if info.is_main else (lambda message: None)

    # --- before the run folder exists -------------------------------------------------------------

    def find_resume(self, refusals: Tuple[type, ...]) -> Optional[Resumed]:
        """The checkpoint --resume names, loaded and checked against the run's arch (and classes,
        when given); None to start afresh. A refusal is raised on every rank together."""
        cfg, info = self.cfg, self.info

        def choose() -> Optional[str]:
            found = choose_resume(self.run_dir, cfg.resume, _warn)
            return str(found) if found else None

        path = decided_by_main(info, choose, refusals)
        if path is None:
            return None

        def load() -> Dict[str, Any]:
            state = load_checkpoint(Path(path))
            check_fits(state, path, cfg.arch, cfg.num_classes)
            return state

        return Resumed(Path(path), checked_on_every_rank(info, load, refusals))

    # --- during the run -----------------------------------------------------------------------------

    def start_writing(self, cfg: Config, *, classes: List[str], wandb_run_id: Optional[str],
                      report: Callable[[str], None]) -> None:
        """From here on, checkpoints can be written: with the run's config as planned (it may differ
        from the one the resume was chosen with: a kept peak lr, which the next resume must find
        again), its classes and W&B run id, and a line through ``report`` for every save. Temp files
        of a save killed half-way are removed."""
        self.cfg = cfg
        self._record = {"classes": list(classes), "wandb_run_id": wandb_run_id}
        self._report = report
        if self.info.is_main:
            for stale in self.run_dir.glob(".*.pt.tmp-*"):  # atomic_write_bytes's names
                stale.unlink(missing_ok=True)

    def restore(self, trainer: Any, resumed: Resumed, rank_seed: int) -> None:
        """Continue ``resumed`` in ``trainer``: bitwise exactly when the process layout is the
        checkpoint's; at the same image count of the epoch otherwise."""
        cfg, info = self.cfg, self.info
        saved = resumed.progress
        if saved.same_layout(info.world_size, cfg.batch_size, cfg.accum_steps):
            progress = saved
        else:
            self._report(f"warning: the checkpoint was written by {saved.world_size} processes x batch "
                         f"{saved.batch_size} x accum {saved.accum_steps}; now {info.world_size} x {cfg.batch_size} x "
                         f"{cfg.accum_steps}: resuming at the same image count of the epoch, but not bitwise exactly")
            progress = saved.relayout(info.world_size, cfg.batch_size, cfg.accum_steps)
        trainer.load_state_dict(resumed.state, progress)
        if progress is saved:
            restore_rng_state(resumed.state["rng"][info.rank], info.device)
        else:
            seed_all(rank_seed + saved.global_step)
        best = (f"best top1 {progress.best_top1:.2f} (epoch {progress.best_epoch})" if progress.best_epoch > 0
                else "no evaluation yet")
        self._report(f"resumed from {resumed.path}: epoch {progress.epoch + 1}, batch {progress.batch_in_epoch}, "
                     f"step {progress.global_step}, {best}")

    def due(self, step: int, last_in_epoch: bool) -> bool:
        """Whether optimizer step ``step`` ends with a checkpoint of its own (--ckpt-every); the
        epoch's last step is followed by the epoch's checkpoint instead."""
        every = self.cfg.ckpt_every
        return bool(every) and step % every == 0 and not last_in_epoch

    def save(self, trainer: Any, *, epoch_end: bool, is_best: bool = False) -> None:
        """A checkpoint of ``trainer`` as it stands; every rank calls this at the same point."""
        if self._record is None:
            raise RuntimeError("Checkpointer.save() before start_writing()")
        rng = gather_objects(capture_rng_state(self.info.device), self.info)
        if self.info.is_main:
            progress = trainer.progress
            state = {"format": CHECKPOINT_FORMAT, "arch": self.cfg.arch, "config": config_to_dict(self.cfg),
                     **trainer.state_dict(), "progress": progress.to_dict(), "rng": rng, **self._record}
            written = self.write_files(state, epoch_end=epoch_end, is_best=is_best)
            batches = trainer.schedule.steps_per_epoch * self.cfg.accum_steps
            at = (f"end of epoch {progress.epoch}" if progress.batch_in_epoch == 0 else
                  f"epoch {progress.epoch + 1}, batch {progress.batch_in_epoch} of {batches}")
            self._report(f"saved {', '.join(p.name for p in written)} ({at}, step {progress.global_step})")
        barrier(self.info)  # nobody moves on (or exits) before the files are complete

    def write_files(self, state: Dict[str, Any], *, epoch_end: bool, is_best: bool) -> List[Path]:
        """Write a built checkpoint: last.pt, epoch_XXXX.pt at an epoch's end, best.pt when best."""
        data = serialize(state)  # serialised once, written to every file that needs it
        written = [self.run_dir / LAST]
        if epoch_end and self.cfg.keep_epochs > 0:
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
        for _, path in epochs[: max(0, len(epochs) - self.cfg.keep_epochs)]:
            path.unlink(missing_ok=True)
