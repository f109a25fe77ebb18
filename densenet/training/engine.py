"""One optimizer step and one pass over the validation set, done fast and counted exactly.

uint8 batches arrive from the data loader; here they are copied to the device without blocking,
normalised there, optionally mixed (timm's Mixup), and run under autocast. Gradients of
``accum_steps`` micro-batches are accumulated with DDP's ``no_sync`` so only the last one
all-reduces. After every optimizer step all ranks agree in one tiny all-reduce whether to stop
(a signal on any rank, or a non-finite loss), so they always stop at the same step. The host reads
that verdict one step late (``StopAgreement``): by then the GPU has the next step queued, so the
host never waits for an idle device; before a checkpoint and at the epoch's end it reads at once.
"""
from __future__ import annotations

import contextlib
import enum
import inspect
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import Progress
from .config import Config, ConfigError
from .distributed import DistInfo, all_reduce
from .metrics_log import RunLog, StepTimer, format_duration, max_memory_gib
from .optim import LRSchedule, set_lr
from .signals import StopRequest
from .wandb_run import WandbRun


class EpochEnd(enum.Enum):
    COMPLETE = "complete"  # every step of the epoch is done
    SIGNAL = "signal"  # a stop signal reached some rank
    MAX_STEPS = "max_steps"  # --max-steps reached
    NONFINITE = "nonfinite"  # the loss was NaN or infinite on some rank


def resolve_amp(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype, or None for full precision."""
    if amp == "auto":
        if device.type != "cuda":
            return None
        return auto_amp_dtype(native_bf16(device))
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("amp: fp16 needs CUDA; use --amp bf16 or --amp off on the CPU")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def native_bf16(device: torch.device) -> bool:
    """Whether the GPU computes in bfloat16 natively. Plain ``is_bf16_supported()`` also says yes
    where bf16 is only emulated (Volta, Turing), which would run every layer several times slower."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # a torch without the argument: ask the hardware
        return torch.cuda.get_device_capability(device) >= (8, 0)


def auto_amp_dtype(bf16_is_native: bool) -> torch.dtype:
    """--amp auto on CUDA: bf16 where it is native (no loss scaling needed), else fp16."""
    return torch.bfloat16 if bf16_is_native else torch.float16


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process; True if it accepted.

    By default glibc serves every allocation above 32 MiB with a fresh mmap and returns it to the
    OS when freed, and trims the heap's free top: a CPU training step of DenseNet-121 at 224 px
    allocates and frees several GiB of activations, so every step faults all of them in again
    (about 2 million page faults per step at batch 32, measured: ~30% of the step time on a
    2-core machine). Serving everything from the heap and never trimming it lets the next step
    reuse the same pages; the process keeps its peak footprint, as a caching allocator would.
    Other C libraries (musl, macOS) are left alone.
    """
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    # A threshold of -1 reaches glibc as the largest size_t: the heap top is never trimmed.
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, -1))


def configure_backends(cfg: Config, device: torch.device) -> None:
    if device.type == "cpu" and cfg.cpu_keep_memory:
        keep_freed_memory()
    if cfg.deterministic:
        # Exact on the CPU. On CUDA a few backward kernels (adaptive average pooling among them) have no
        # deterministic version: warn about them rather than refuse to train.
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark  # fixed input sizes: autotuning pays off at once
    if device.type == "cuda":
        # TF32 for the float32 work (fp32 runs, and what autocast keeps in float32). PyTorch allows it
        # for cuDNN convolutions but not for matmuls by default; one switch sets both.
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32


def use_channels_last(cfg: Config, device: torch.device) -> bool:
    return cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"


def prepare_model(model: nn.Module, cfg: Config, info: DistInfo) -> nn.Module:
    """Device, memory format and SyncBatchNorm; done before the optimizer and EMA see the model."""
    if cfg.sync_bn:
        if info.device.type != "cuda":
            raise ConfigError("sync_bn: SyncBatchNorm needs CUDA; drop --sync-bn on the CPU")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(info.device)
    if use_channels_last(cfg, info.device):
        model = model.to(memory_format=torch.channels_last)
    return model


def compile_model(model: nn.Module, backend: str) -> nn.Module:
    """torch.compile once, for the whole run.

    Static shapes (dynamic=False): training batches all have the same size, so one graph serves
    every step of every epoch, and nothing that differs after a resume (the epoch, the sampler
    position, loaded weights, the learning rate, which lives in the optimizer outside the graph)
    reaches a guard. Only the training model is compiled: evaluation runs the plain module, so its
    eval-mode graph and its last, smaller batch never invalidate or add to the training graph.
    """
    import torch._dynamo

    # Some torch releases trace the memory-efficient layers' selective checkpointing (context_fn)
    # only behind this switch; later ones have no such switch and always trace it.
    if hasattr(torch._dynamo.config, "_experimental_support_context_fn_in_torch_utils_checkpoint"):
        torch._dynamo.config._experimental_support_context_fn_in_torch_utils_checkpoint = True
    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise ConfigError(f"compile_backend: unknown torch.compile backend {backend!r}; "
                          f"choose from {', '.join(torch._dynamo.list_backends())}")
    return torch.compile(model, backend=backend, dynamic=False)


class DeviceNormalize:
    """uint8 NCHW batch on the host -> normalised float batch on the device."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device, channels_last: bool):
        self.device = device
        self.channels_last = channels_last
        # Folding the 1/255 into mean and std saves one full pass over the batch.
        self.mean = torch.tensor([255.0 * m for m in mean], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor([255.0 * s for s in std], device=device).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return (x.float() - self.mean) / self.std


@dataclass
class EvalResult:
    top1: float
    top5: float
    loss: float
    count: int  # the images evaluated: the readable ones
    unreadable: int = 0  # validation files that could not be decoded, left out of everything above

    def as_dict(self, prefix: str = "") -> Dict[str, float]:
        return {f"{prefix}top1": self.top1, f"{prefix}top5": self.top5, f"{prefix}loss": self.loss,
                f"{prefix}count": self.count, f"{prefix}unreadable": self.unreadable}


@dataclass
class EpochStats:
    end: EpochEnd
    loss: float = float("nan")
    bad_samples: int = 0
    seconds: float = 0.0
    signal: int = 0  # the stop signal's number (the largest, if ranks received different ones)
    nonfinite_step: Optional[int] = None  # EpochEnd.NONFINITE: the optimizer step (1-based) whose loss was not finite
    nonfinite_loss: Optional[float] = None  # and this rank's loss of that step


@dataclass(frozen=True)
class Verdict:
    """What all ranks agreed after optimizer step number ``step`` (1-based)."""
    step: int
    signal: int  # the largest stop signal any rank had received by then, or 0
    nonfinite: bool  # the loss of that step was NaN or infinite on some rank
    loss: Optional[torch.Tensor]  # this rank's loss of that step, kept to report it


class StopAgreement:
    """The per-step agreement of all ranks on whether to stop, read by the host one step late.

    The flags are built on the device (a fill, no copy from pageable host memory), all-reduced there,
    and copied to pinned host memory behind an event. ``post`` queues step k's flags and returns the
    verdict of step k-1: waiting for its event costs nothing, since the device finished step k-1
    before it started the step now queued behind it. ``flush`` returns step k's verdict at once, for
    the steps after which something is written or the loop ends, so no checkpoint ever holds the
    weights of a non-finite step. On the CPU everything is synchronous and the lateness is the same,
    so the order of events is what it is on a GPU.
    """

    def __init__(self, info: DistInfo) -> None:
        self.info = info
        self._pending: Optional[tuple] = None  # (step, host flags, event, loss)
        # Two pinned buffers, used in turn: step k's copy never lands in the one step k-1's verdict
        # is still to be read from.
        self._host = ([torch.empty(2, dtype=torch.float64, pin_memory=True) for _ in range(2)]
                      if info.device.type == "cuda" else [])

    def post(self, step: int, signum: int, step_loss: torch.Tensor) -> Optional[Verdict]:
        device = self.info.device
        flags = torch.stack([torch.full((), float(signum), dtype=torch.float64, device=device),
                             (~torch.isfinite(step_loss)).double()])
        all_reduce(flags, self.info, op="max")  # any rank's signal counts
        event = None
        if self._host:
            host = self._host[step % 2]
            host.copy_(flags, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            flags = host
        previous, self._pending = self._pending, (step, flags, event, step_loss)
        return self._read(previous)

    def flush(self) -> Optional[Verdict]:
        pending, self._pending = self._pending, None
        return self._read(pending)

    @staticmethod
    def _read(pending: Optional[tuple]) -> Optional[Verdict]:
        if pending is None:
            return None
        step, flags, event, loss = pending
        if event is not None:
            event.synchronize()
        signal, nonfinite = flags.tolist()
        return Verdict(step, int(signal), bool(nonfinite), loss)


class Trainer:
    """Owns the wrapped model (DDP, compile), the AMP machinery, the EMA and the loss."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: LRSchedule, cfg: Config,
                 info: DistInfo, *, num_classes: int, mean: Sequence[float], std: Sequence[float],
                 log: RunLog, wandb: WandbRun) -> None:
        self.model = model  # the plain module: its state_dict has no wrapper prefixes
        self.optimizer = optimizer
        self.schedule = schedule
        self.cfg = cfg
        self.info = info
        self.log = log
        self.wandb = wandb
        self.device = info.device
        self.amp_dtype = resolve_amp(cfg.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.normalize = DeviceNormalize(mean, std, self.device, use_channels_last(cfg, self.device))
        self.ema = self._make_ema(model) if cfg.ema else None
        self._ema_takes_step = self.ema is not None and "step" in inspect.signature(self.ema.update).parameters

        self.ddp: Optional[DistributedDataParallel] = None
        train_model: nn.Module = model
        if info.is_distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(model, device_ids=device_ids)
            train_model = self.ddp
        self.train_model = compile_model(train_model, cfg.compile_backend) if cfg.compile else train_model

        self.mixup = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            from timm.data import Mixup
            from timm.loss import SoftTargetCrossEntropy

            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix,
                               label_smoothing=cfg.label_smoothing, num_classes=num_classes)
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        else:
            self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    def _make_ema(self, model: nn.Module) -> nn.Module:
        try:
            from timm.utils import ModelEmaV3
        except ImportError:  # timm before 1.0
            from timm.utils import ModelEmaV2

            return ModelEmaV2(model, decay=self.cfg.ema_decay)
        return ModelEmaV3(model, decay=self.cfg.ema_decay)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # --- state for checkpoints --------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
        }

    def load_state_dict(self, state: Dict[str, Any], report: Callable[[str], None]) -> None:
        from .optim import load_optimizer_state

        self.model.load_state_dict(state["model"])
        load_optimizer_state(self.optimizer, state["optimizer"])
        if self.ema is not None:
            if state.get("ema") is not None:
                self.ema.module.load_state_dict(state["ema"])
            else:
                report("note: the checkpoint has no EMA weights; the EMA starts from the current weights")
                self.ema.module.load_state_dict(state["model"])
        if self.scaler.is_enabled() and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    # --- training ---------------------------------------------------------------------------------

    def _forward_backward(self, images: torch.Tensor, targets: torch.Tensor, sync: bool) -> torch.Tensor:
        x = self.normalize(images)
        y = targets.to(self.device, non_blocking=True)
        if self.mixup is not None:
            x, y = self.mixup(x, y)
        no_sync = self.ddp.no_sync() if (self.ddp is not None and not sync) else contextlib.nullcontext()
        with no_sync:
            with self.autocast():
                loss = self.criterion(self.train_model(x), y)
            self.scaler.scale(loss / self.cfg.accum_steps).backward()
        return loss.detach()

    def _optimizer_step(self, step: int) -> None:
        set_lr(self.optimizer, self.schedule(step))
        if self.cfg.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            if self._ema_takes_step:
                self.ema.update(self.model, step=step + 1)
            else:
                self.ema.update(self.model)

    def train_epoch(self, loader: Any, progress: Progress, stop: StopRequest,
                    on_checkpoint: Callable[[], None]) -> EpochStats:
        """Optimizer steps from progress.batch_in_epoch to the end of progress.epoch (or an earlier stop).

        `progress` is advanced in place after every step, so it always describes the state of the
        weights; on_checkpoint() is called every cfg.ckpt_every steps (not at the epoch's end).
        """
        cfg, accum = self.cfg, self.cfg.accum_steps
        steps_per_epoch = len(loader) // accum
        first_step = progress.batch_in_epoch // accum
        loader.set_epoch(progress.epoch, start_batch=progress.batch_in_epoch)
        self.model.train()
        timer = StepTimer()
        started = time.perf_counter()
        window_loss = torch.zeros(2, dtype=torch.float64, device=self.device)  # (sum, count), no per-step sync
        epoch_loss = torch.zeros(2, dtype=torch.float64, device=self.device)
        bad = 0
        end, stop_signal = EpochEnd.COMPLETE, 0
        agreement = StopAgreement(self.info)
        batches = iter(loader)
        for step_in_epoch in range(first_step, steps_per_epoch):
            step_loss = torch.zeros((), dtype=torch.float64, device=self.device)
            for micro in range(accum):
                t0 = time.perf_counter()
                try:
                    images, targets, bad_mask = next(batches)
                except StopIteration:
                    raise RuntimeError(f"the training loader ended after batch {step_in_epoch * accum + micro} of "
                                       f"epoch {progress.epoch + 1}, but its len() promised {len(loader)}") from None
                timer.add_data(time.perf_counter() - t0, images.shape[0])
                bad += int(bad_mask.sum())  # a host tensor: counted without the device
                step_loss += self._forward_backward(images, targets, sync=micro == accum - 1).double()
            self._optimizer_step(progress.global_step)
            timer.end_step()
            step_loss /= accum
            progress.global_step += 1
            progress.batch_in_epoch = (step_in_epoch + 1) * accum
            window_loss += torch.stack([step_loss, torch.ones_like(step_loss)])
            epoch_loss += torch.stack([step_loss, torch.ones_like(step_loss)])
            last = step_in_epoch + 1 == steps_per_epoch
            max_reached = cfg.max_steps is not None and progress.global_step >= cfg.max_steps
            checkpoint_due = bool(cfg.ckpt_every) and progress.global_step % cfg.ckpt_every == 0 and not last
            verdict = agreement.post(progress.global_step, stop.signum or 0, step_loss)
            # A signal, once received, is in every later verdict too: the newer one supersedes the
            # older unless the older one already says stop for a non-finite loss.
            if (checkpoint_due or last or max_reached) and not (verdict is not None and verdict.nonfinite):
                verdict = agreement.flush()
            if verdict is not None and verdict.nonfinite:
                return EpochStats(EpochEnd.NONFINITE, nonfinite_step=verdict.step, nonfinite_loss=verdict.loss.item())
            if progress.global_step % cfg.log_every == 0:
                self._log_window(progress, step_in_epoch + 1, steps_per_epoch, timer, window_loss)
                window_loss.zero_()
            if verdict is not None and verdict.signal:
                end, stop_signal = EpochEnd.SIGNAL, verdict.signal
                break
            if max_reached:
                end = EpochEnd.MAX_STEPS
                break
            if checkpoint_due:
                on_checkpoint()
        totals = all_reduce(torch.cat([epoch_loss, torch.tensor([float(bad)], device=self.device,
                                                                dtype=torch.float64)]), self.info).tolist()
        return EpochStats(end, loss=totals[0] / max(totals[1], 1), bad_samples=int(totals[2]),
                          seconds=time.perf_counter() - started, signal=stop_signal)

    def _log_window(self, progress: Progress, step_in_epoch: int, steps_per_epoch: int, timer: StepTimer,
                    window_loss: torch.Tensor) -> None:
        loss_sum, count = all_reduce(window_loss.clone(), self.info).tolist()
        w = timer.window()
        total_steps = self.cfg.epochs * steps_per_epoch
        if self.cfg.max_steps is not None:
            total_steps = min(total_steps, self.cfg.max_steps)
        values = {
            "loss": loss_sum / max(count, 1),
            "lr": self.optimizer.param_groups[0]["lr"],
            "images_per_s": w["images_per_s"] * self.info.world_size,
            "data_wait": w["data_wait"],
            "step_time": w["step_time"],
            "eta_epoch_s": timer.eta(steps_per_epoch - step_in_epoch),
            "eta_run_s": timer.eta(total_steps - progress.global_step),
            "max_mem_gib": max_memory_gib(self.device),
        }
        mem_kind = "GiB" if self.device.type == "cuda" else "GiB rss"
        self.log.print(
            f"epoch {progress.epoch + 1}/{self.cfg.epochs}  step {step_in_epoch}/{steps_per_epoch} "
            f"(global {progress.global_step})  loss {values['loss']:.4f}  lr {values['lr']:.4g}  "
            f"{values['images_per_s']:.1f} img/s  data {100 * values['data_wait']:.0f}%  "
            f"step {values['step_time']:.3f}s  eta epoch {format_duration(values['eta_epoch_s'])} "
            f"run {format_duration(values['eta_run_s'])}  mem {values['max_mem_gib']:.2f} {mem_kind}")
        self.log.record("train", epoch=progress.epoch + 1, step=progress.global_step, epoch_step=step_in_epoch,
                        **values)
        self.wandb.log({f"train/{k}": v for k, v in values.items()}
                       | {"epoch": progress.epoch + step_in_epoch / steps_per_epoch}, step=progress.global_step)

    # --- evaluation -------------------------------------------------------------------------------

    def evaluate(self, loader: Any, model: Optional[nn.Module] = None) -> EvalResult:
        model = model if model is not None else self.model
        average_batchnorm_statistics(model, self.info)
        return evaluate(model, loader, info=self.info, normalize=self.normalize, amp_dtype=self.amp_dtype)


@torch.no_grad()
def average_batchnorm_statistics(model: nn.Module, info: DistInfo) -> None:
    """Give every rank the mean of the ranks' BN running statistics.

    Each rank updates its running averages from its own batches (DDP only broadcasts rank 0's
    buffers before each training forward), so without this every rank would evaluate a slightly
    different network, and none of them exactly the one rank 0 then writes to the checkpoint.
    """
    if not info.is_distributed:
        return
    stats = [b for name, b in model.named_buffers() if name.endswith(("running_mean", "running_var"))]
    if not stats:
        return
    flat = torch.cat([b.reshape(-1).float() for b in stats])
    all_reduce(flat, info).div_(info.world_size)
    for b, mean in zip(stats, flat.split([b.numel() for b in stats])):
        b.copy_(mean.view_as(b))


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, *, info: DistInfo, normalize: DeviceNormalize,
             amp_dtype: Optional[torch.dtype]) -> EvalResult:
    """Top-1/top-5 and loss over the readable images of the validation set, each counted once across
    ranks; unreadable ones (flagged ``bad`` by the loader) are left out and counted apart.

    Runs the plain module, not the DDP wrapper: ranks may have different numbers of batches,
    and DDP's forward would wait for collectives the other ranks never join.
    """
    device = info.device
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # top1, top5, loss
    count = unreadable = 0  # counted on the host, from host tensors: no copy to the device per batch
    criterion = nn.CrossEntropyLoss(reduction="sum")
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    for images, targets, bad_mask in loader:
        batch_unreadable = int(bad_mask.sum())
        if batch_unreadable:
            # Dropped on the host, before the copy: the model never sees a placeholder, and the
            # batches without one (nearly all) pay nothing.
            unreadable += batch_unreadable
            images, targets = images[~bad_mask], targets[~bad_mask]
            if not len(targets):
                continue
        x = normalize(images)
        y = targets.to(device, non_blocking=True)
        with autocast:
            logits = model(x)
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top.eq(y.unsqueeze(1))
        sums += torch.cat([torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()]).double(),
                           criterion(logits, y).double().view(1)])
        count += targets.numel()
    model.train(was_training)
    totals = torch.cat([sums, torch.tensor([float(count), float(unreadable)], dtype=torch.float64, device=device)])
    top1, top5, loss, count, unreadable = all_reduce(totals, info).tolist()
    count, unreadable = int(count), int(unreadable)
    if count + unreadable != loader.num_samples:
        raise RuntimeError(f"evaluation saw {count} readable and {unreadable} unreadable images across ranks, "
                           f"{count + unreadable} in all, but the validation set has {loader.num_samples}; "
                           "the evaluation loader must visit every image exactly once")
    if count == 0 and unreadable:
        raise RuntimeError(f"none of the {unreadable} validation images could be read; the dataset looks broken "
                           "(wrong folder, unfinished copy or unmounted filesystem?)")
    n = max(count, 1)
    return EvalResult(top1=100.0 * top1 / n, top5=100.0 * top5 / n, loss=loss / n, count=count,
                      unreadable=unreadable)


def seed_all(seed: int) -> None:
    """Seed torch (all devices), numpy and random; numpy's global RNG drives timm's Mixup."""
    import random

    import numpy as np

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
