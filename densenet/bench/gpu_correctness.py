"""The correctness checks of the GPU check: what only CUDA can show, each in a fresh process.

* ``decode_accum``: the real training loop with two accumulated micro-batches per step sees the
  same crops, flips and pixel statistics from ``decode="device"`` as from the CPU pipeline;
* ``decode_ordering``: batches decoded ahead while the training stream is busy and has freed
  memory its queued kernels still read: no queued reduction is corrupted and every batch equals
  the one decoded on an idle GPU;
* ``fused_resume``: optimizer state written with one memory layout and loaded with the other
  (channels_last toggled), stepped with the fused and the loop kernels: the same weights;
* ``sync_bn``: --sync-bn converts every BatchNorm and trains on one rank; with --memory-efficient
  it is refused in one line;
* ``host_syncs``: synchronising CUDA calls per training step and per evaluation batch, counted by
  ``torch.cuda.set_sync_debug_mode("warn")`` in the real trainer; and what --amp auto picks on this
  GPU (bf16 only where it is native).

On the CPU (``--device cpu --quick``) each runs what has meaning there and says what it left out.
"""

from __future__ import annotations

import io
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

CHECKS = ("decode_accum", "decode_ordering", "fused_resume", "sync_bn", "host_syncs")


@dataclass(frozen=True)
class CheckJob:
    name: str
    device: str
    root: str  # a JPEG tree (ImageNet layout) for the decode checks
    image_size: int
    batch: int
    workers: int
    kind: str = "check"


class PremadeBatches:
    """The loader interface Trainer.train_epoch and evaluate use, handing out one pre-made uint8
    batch (pinned on CUDA) again and again: what is timed or counted is the loop, not decoding."""

    def __init__(self, batch: int, image_size: int, batches: int, classes: int, pin: bool) -> None:
        import torch
        self.images = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8)
        self.targets = torch.randint(0, classes, (batch,))
        self.bad = torch.zeros(batch, dtype=torch.bool)
        if pin:
            self.images, self.targets = self.images.pin_memory(), self.targets.pin_memory()
        self.batches = batches
        self.num_samples = batches * batch
        self.start = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.start = start_batch

    def size_at(self, epoch: int) -> int:
        return self.images.shape[-1]

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        for _ in range(self.start, self.batches):
            yield self.images, self.targets, self.bad


class FirstBatches:
    """The first ``n`` batches of a real train loader, as an epoch of n batches."""

    def __init__(self, loader: Any, n: int) -> None:
        self.loader, self.n = loader, n

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.loader.set_epoch(epoch, start_batch)

    def size_at(self, epoch: int) -> int:
        return self.loader.size_at(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(self.loader)


def _sync(device: Any) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_trainer(device: Any, *, accum_steps: int = 1, batch: int = 8, image_size: int = 64, amp: str = "off",
                  channels_last: bool = False, arch: str = "densenet_tiny", classes: int = 10, extra: Dict = None):
    """The real Trainer on one device, no process group, nothing logged, built the way train_dist.py
    builds it (lr 0.01): what the checks and the trainer-loop rows drive."""
    from ..training.config import config_from_dict
    from ..training.distributed import DistInfo
    from ..training.engine import build_trainer as build_run_trainer
    from ..training.reporting import Reporter
    from ..training.settings import configure_backends, resolve_settings

    cfg = config_from_dict({"data": "none", "arch": arch, "batch_size": batch, "image_size": image_size,
                            "accum_steps": accum_steps, "amp": amp, "channels_last": channels_last,
                            "log_every": 10**9, "wandb": "disabled", "device": device.type, "lr": 0.01,
                            "workers": 0, **(extra or {})}, "gpu check")
    info = DistInfo(0, 1, 0, device, None, "single")
    configure_backends(cfg, device)
    return build_run_trainer(cfg, info, resolve_settings(cfg, info), num_classes=classes, steps_per_epoch=1000,
                             peak_lr=0.01, reporter=Reporter(None, False))


def _decode_accum(job: CheckJob, device: Any) -> Dict[str, Any]:
    """Inputs as the model saw them (un-normalised), device decode against CPU decode."""
    import torch

    from data import IMAGENET_MEAN, IMAGENET_STD, TrainTransform, build_train_loader

    from ..training.checkpoint import Progress
    from ..training.signals import StopRequest

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    seen: Dict[str, torch.Tensor] = {}
    for decode in ("device", "cpu"):
        loader = build_train_loader(job.root, TrainTransform(job.image_size), batch_size=job.batch,
                                    workers=job.workers, seed=1, decode_on=device if decode == "device" else None,
                                    pin_memory=device.type == "cuda")
        trainer = build_trainer(device, accum_steps=2, batch=job.batch, image_size=job.image_size,
                                classes=loader.num_classes)
        inputs: List[torch.Tensor] = []
        trainer.model.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().float().cpu() * std + mean))
        four_steps = FirstBatches(loader, min(len(loader), 8))  # four optimizer steps of two micro-batches
        trainer.progress = Progress(world_size=1, batch_size=job.batch, accum_steps=2)
        trainer.train_epoch(four_steps, StopRequest())
        seen[decode] = torch.cat(inputs)
    a, b = seen["device"], seen["cpu"]
    difference = (a - b).abs()
    flips_agree = bool((difference.mean(dim=(1, 2, 3)) < (a - b.flip(-1)).abs().mean(dim=(1, 2, 3))).all())
    mean_gap = float((a.mean(dim=(0, 2, 3)) - b.mean(dim=(0, 2, 3))).abs().max())
    std_gap = float((a.std(dim=(0, 2, 3)) - b.std(dim=(0, 2, 3))).abs().max())
    mean_abs = float(difference.mean())
    ok = flips_agree and mean_abs < 4.0 and mean_gap < 1.0 and std_gap < 1.0
    return {"ok": ok, "images": a.shape[0], "mean_abs_diff": mean_abs, "max_abs_diff": float(difference.max()),
            "channel_mean_gap": mean_gap, "channel_std_gap": std_gap, "flips_agree": flips_agree}


def _decode_ordering(job: CheckJob, device: Any) -> Dict[str, Any]:
    import torch

    from data import TrainTransform, build_train_loader

    def batches(stress: bool) -> tuple:
        loader = build_train_loader(job.root, TrainTransform(job.image_size), batch_size=job.batch,
                                    workers=job.workers, seed=2, decode_on=device)
        loader.set_epoch(0)
        images, corrupted = [], 0
        for i, (x, _, _) in enumerate(loader):
            if i == 6:
                break
            if stress and device.type == "cuda":
                # The training stream's pattern at its worst: tensors whose reductions are still
                # queued behind a long kernel are freed, and then the next batch is asked for.
                victims = [torch.full((1 << 22,), float(k + 1), device=device) for k in range(4)]
                busy = torch.randn(4096, 4096, device=device)
                for _ in range(30):
                    busy = busy @ busy / 64
                sums = [v.sum() for v in victims]
                del victims
                images.append(x.clone())
                _sync(device)
                corrupted += sum(float(s) != (1 << 22) * (k + 1) for k, s in enumerate(sums))
            else:
                images.append(x.clone())
        _sync(device)
        return [t.cpu() for t in images], corrupted

    stressed, corrupted = batches(True)
    idle, _ = batches(False)
    equal = sum(torch.equal(a, b) for a, b in zip(stressed, idle))
    return {"ok": corrupted == 0 and equal == len(idle) and len(idle) > 0, "batches": len(idle),
            "equal_to_idle": equal, "corrupted_reductions": corrupted,
            "note": "" if device.type == "cuda" else "no streams on the CPU: equality only"}


def _fused_resume(job: CheckJob, device: Any) -> Dict[str, Any]:
    import torch

    from .. import create_model
    from ..training.optim import load_optimizer_state

    results: Dict[str, Any] = {}
    ok = True
    for name, make in (("sgd", lambda p, **k: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-4, **k)),
                       ("adamw", lambda p, **k: torch.optim.AdamW(p, lr=1e-3, **k))):
        for saved_cl in (True, False):
            torch.manual_seed(0)
            model = create_model("densenet_tiny", num_classes=10).to(device)
            if saved_cl:
                model = model.to(memory_format=torch.channels_last)
            opt = make(model.parameters(), foreach=False)
            x = torch.randn(4, 3, 32, 32, device=device)
            for _ in range(2):
                model(x).sum().backward()
                opt.step()
                opt.zero_grad()
            buffer = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
            stepped = {}
            for kernel in ("fused", "loop"):
                buffer.seek(0)
                state = torch.load(buffer, weights_only=True)
                resumed = create_model("densenet_tiny", num_classes=10).to(device)
                if not saved_cl:
                    resumed = resumed.to(memory_format=torch.channels_last)
                resumed.load_state_dict(state["model"])
                opt2 = make(resumed.parameters(), **({"fused": True} if kernel == "fused" else {"foreach": False}))
                label = f"{name} {'cl->nchw' if saved_cl else 'nchw->cl'} {kernel}"
                try:
                    load_optimizer_state(opt2, state["opt"])
                    torch.manual_seed(1)
                    resumed(torch.randn(4, 3, 32, 32, device=device)).sum().backward()
                    opt2.step()
                    _sync(device)
                    stepped[kernel] = [p.detach().float().cpu() for p in resumed.parameters()]
                except Exception as e:  # the defect this checks for is a crash on CUDA
                    results[label] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                    ok = False
            if len(stepped) == 2:
                diff = max(float((a - b).abs().max()) for a, b in zip(stepped["fused"], stepped["loop"]))
                results[f"{name} {'cl->nchw' if saved_cl else 'nchw->cl'} max diff"] = diff
                ok = ok and diff < 1e-4
    return {"ok": ok, **results}


def _sync_bn(job: CheckJob, device: Any) -> Dict[str, Any]:
    import os

    import torch
    import torch.distributed as dist

    from .. import create_model
    from .common import free_port
    from ..training.config import ConfigError, parse_config

    out: Dict[str, Any] = {}
    try:
        parse_config(["--data", "demo", "--sync-bn", "--memory-efficient", "--device", "cuda"])
        out["config_refuses_memory_efficient"] = False
    except ConfigError as e:
        out["config_refuses_memory_efficient"] = True
        out["message"] = str(e)
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(create_model("densenet_tiny", memory_efficient=True))
    try:
        converted.train()(torch.randn(2, 3, 32, 32, requires_grad=True)).sum().backward()
        out["model_refuses_memory_efficient"] = False
    except (ValueError, RuntimeError) as e:
        out["model_refuses_memory_efficient"] = "SyncBatchNorm" in str(e) or "sync" in str(e).lower()
    ok = out["config_refuses_memory_efficient"] and out["model_refuses_memory_efficient"]
    if device.type != "cuda":
        return {"ok": ok, **out, "note": "SyncBatchNorm's forward needs CUDA: the one-rank training step left out"}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=device)
    try:
        model = create_model("densenet121", num_classes=10)
        bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model).to(device)
        synced = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
        model(torch.randn(4, 3, 64, 64, device=device)).sum().backward()
        _sync(device)
        out.update(batchnorm_layers=bn, synchronised=synced)
        ok = ok and synced == bn
    finally:
        dist.destroy_process_group()
    return {"ok": ok, **out}


def _host_syncs(job: CheckJob, device: Any) -> Dict[str, Any]:
    import torch

    from ..training.checkpoint import Progress
    from ..training.evaluation import evaluate
    from ..training.settings import native_bf16, resolve_amp
    from ..training.signals import StopRequest

    if device.type != "cuda":
        return {"ok": True, "note": "torch.cuda.set_sync_debug_mode needs CUDA: nothing counted on the CPU"}
    trainer = build_trainer(device, batch=job.batch, image_size=job.image_size, amp="bf16", channels_last=True,
                            arch="densenet121", classes=1000)
    steps, batches = 20, 10
    warmup, epoch, validation = (PremadeBatches(job.batch, job.image_size, n, 1000, pin=True)
                                 for n in (3, steps, batches))  # pinned before anything is counted

    def count(fn) -> int:
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        return sum("synchroniz" in str(w.message) for w in caught)

    trainer.train_epoch(warmup, StopRequest())
    _sync(device)
    trainer.progress = Progress(batch_size=job.batch)
    in_steps = count(lambda: trainer.train_epoch(epoch, StopRequest()))
    in_eval = count(lambda: evaluate(trainer.model, validation, info=trainer.info, normalize=trainer.normalize,
                                     amp_dtype=trainer.amp_dtype))
    # An epoch ends with one read of the agreement and one of the epoch's totals; an evaluation with
    # one of its totals. Anything per step or per batch beyond that is a defect.
    # --amp auto against the hardware itself: bf16 is native from compute capability 8.0 (Ampere).
    native = native_bf16(device)
    amp_auto = resolve_amp("auto", device)
    expected = torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    return {"ok": in_steps <= 3 and in_eval <= 2 and amp_auto == expected, "steps": steps,
            "syncs_in_epoch": in_steps, "eval_batches": batches, "syncs_in_eval": in_eval,
            "native_bf16": native, "amp_auto": str(amp_auto).replace("torch.", "")}


def run_check(payload: Dict[str, Any]) -> Dict[str, Any]:
    import torch

    job = CheckJob(**payload)
    device = torch.device(job.device)
    t0 = time.perf_counter()
    result = globals()[f"_{job.name}"](job, device)
    return {**result, "seconds": time.perf_counter() - t0}


def check_tree(samples: Path, workdir: Path, copies: int) -> Path:
    from . import jpeg_tree
    root = jpeg_tree.make_tree(samples, workdir / "check-tree", copies=copies)
    jpeg_tree.read_all(root)
    return root
