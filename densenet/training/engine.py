"""The trainer: optimizer steps over an epoch, done fast, with the run's counters and the
decision to stop.

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
from typing import Any, Dict, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import Checkpointer, Progress
from .config import Config, ConfigError, eval_crop_size, train_sizes_of
from .distributed import DistInfo, all_reduce
from .evaluation import average_batchnorm_statistics, evaluate
from .inputs import DeviceNormalize
from .optim import LRSchedule, build_optimizer, load_optimizer_state, set_lr
from .reporting import Reporter, StepTimer, max_memory_gib
from .settings import RunSettings, seed_all
from .signals import StopRequest


class EpochEnd(enum.Enum):
    COMPLETE = "complete"  # every step of the epoch is done
    SIGNAL = "signal"  # a stop signal reached some rank
    MAX_STEPS = "max_steps"  # --max-steps reached
    NONFINITE = "nonfinite"  # the loss was NaN or infinite on some rank


def prepare_model(model: nn.Module, cfg: Config, run: RunSettings) -> nn.Module:
    """Device, memory format and SyncBatchNorm; done before the optimizer and EMA see the model."""
    if cfg.sync_bn:  # resolve_settings refused it off CUDA
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(run.device)
    if run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def compile_model(model: nn.Module, backend: str, image_sizes: int = 1) -> nn.Module:
    """torch.compile once, for the whole run.

    Static shapes (dynamic=False): training batches all have the same size, so one graph serves
    every step of every epoch at one image size (with progressive resizing, ``image_sizes`` sizes:
    a static graph each rather than a slower shape-generic one, and Dynamo's recompile limit raised
    to hold them all instead of falling back to eager after its default few), and nothing that
    differs after a resume (the epoch, the sampler position, loaded weights, the learning rate,
    which lives in the optimizer outside the graph)
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
    for limit in ("recompile_limit", "cache_size_limit"):  # the name changed across torch releases
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), image_sizes + 1))
    return torch.compile(model, backend=backend, dynamic=False)


@dataclass
class EpochStats:
    end: EpochEnd
    epoch: int  # the 1-based number of the epoch trained, as printed and recorded
    complete: bool = False  # every batch of that epoch is trained (Progress has moved to the next)
    epochs_done: float = 0.0  # completed epochs, fractional: where the run stands on a plot
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

    def signal_now(self, signum: int) -> int:
        """Outside the step loop (after an evaluation): the largest signal any rank has, read at once."""
        if self._pending is not None:
            raise RuntimeError("signal_now() with a step verdict still unread; flush() it first")
        self.post(0, signum, torch.zeros((), dtype=torch.float64, device=self.info.device))
        return self.flush().signal

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
    """Owns the wrapped model (DDP, compile), the AMP machinery, the EMA, the loss and the run's
    counters (``progress``: epoch, position in it, global step, best evaluation so far)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: LRSchedule, cfg: Config,
                 info: DistInfo, run: RunSettings, *, num_classes: int, normalize: DeviceNormalize,
                 reporter: Reporter) -> None:
        self.model = model  # the plain module: its state_dict has no wrapper prefixes
        self.optimizer = optimizer
        self.schedule = schedule
        self.cfg = cfg
        self.info = info
        self.reporter = reporter
        self._train_size: Optional[int] = None  # the training crop of the epoch under way, once said
        self.device = run.device
        self.amp_dtype = run.amp_dtype
        self.normalize = normalize
        self.progress = Progress(world_size=info.world_size, batch_size=cfg.batch_size, accum_steps=cfg.accum_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.ema = self._make_ema(model) if cfg.ema else None
        self._ema_takes_step = self.ema is not None and "step" in inspect.signature(self.ema.update).parameters

        self.ddp: Optional[DistributedDataParallel] = None
        train_model: nn.Module = model
        if info.is_distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(model, device_ids=device_ids)
            train_model = self.ddp
        self.train_model = (compile_model(train_model, cfg.compile_backend, len(set(train_sizes_of(cfg))))
                            if cfg.compile else train_model)

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

    def load_state_dict(self, state: Dict[str, Any], progress: Progress) -> None:
        """The weights, optimizer, EMA and scaler of a checkpoint, continuing at ``progress``."""
        self.model.load_state_dict(state["model"])
        load_optimizer_state(self.optimizer, state["optimizer"])
        if self.ema is not None:
            if state.get("ema") is not None:
                self.ema.module.load_state_dict(state["ema"])
            else:
                self.reporter.print("note: the checkpoint has no EMA weights; the EMA starts from the current weights")
                self.ema.module.load_state_dict(state["model"])
        if self.scaler.is_enabled() and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.progress = progress

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

    def train_epoch(self, loader: Any, stop: StopRequest, checkpoints: Optional[Checkpointer] = None) -> EpochStats:
        """Optimizer steps from the current position to the end of the current epoch (or an earlier stop).

        ``progress`` is advanced after every step, so it always describes the state of the weights,
        and moves on to the next epoch when this one is complete; the checkpointer is asked after
        every step whether a checkpoint is due, and writes it.
        """
        cfg, accum, progress = self.cfg, self.cfg.accum_steps, self.progress
        steps_per_epoch = len(loader) // accum
        first_step = progress.batch_in_epoch // accum
        epoch_number = progress.epoch + 1
        loader.set_epoch(progress.epoch, start_batch=progress.batch_in_epoch)
        self._say_train_size(loader.size_at(progress.epoch), epoch_number)
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
                                       f"epoch {epoch_number}, but its len() promised {len(loader)}") from None
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
            checkpoint_due = checkpoints is not None and checkpoints.due(progress.global_step, last)
            verdict = agreement.post(progress.global_step, stop.signum or 0, step_loss)
            # A signal, once received, is in every later verdict too: the newer one supersedes the
            # older unless the older one already says stop for a non-finite loss.
            if (checkpoint_due or last or max_reached) and not (verdict is not None and verdict.nonfinite):
                verdict = agreement.flush()
            if verdict is not None and verdict.nonfinite:
                return EpochStats(EpochEnd.NONFINITE, epoch_number, nonfinite_step=verdict.step,
                                  nonfinite_loss=verdict.loss.item())
            if progress.global_step % cfg.log_every == 0:
                self._report_window(step_in_epoch + 1, steps_per_epoch, timer, window_loss)
                window_loss.zero_()
            if verdict is not None and verdict.signal:
                end, stop_signal = EpochEnd.SIGNAL, verdict.signal
                break
            if max_reached:
                end = EpochEnd.MAX_STEPS
                break
            if checkpoint_due:
                checkpoints.save(self, epoch_end=False)
        totals = all_reduce(torch.cat([epoch_loss, torch.tensor([float(bad)], device=self.device,
                                                                dtype=torch.float64)]), self.info).tolist()
        # An epoch stopped by a signal at its last batch stays open: the resumed run evaluates it.
        complete = end is not EpochEnd.SIGNAL and progress.batch_in_epoch >= steps_per_epoch * accum
        if complete:
            progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
        return EpochStats(end, epoch_number, complete=complete,
                          epochs_done=progress.epoch + progress.batch_in_epoch / (steps_per_epoch * accum),
                          loss=totals[0] / max(totals[1], 1), bad_samples=int(totals[2]),
                          seconds=time.perf_counter() - started, signal=stop_signal)

    def _say_train_size(self, size: int, epoch_number: int) -> None:
        """With progressive resizing, a line (and a metrics event) whenever the training crop changes."""
        if self.cfg.train_size_start is None or size == self._train_size:
            return
        self._train_size = size
        eval_size = eval_crop_size(self.cfg)
        self.reporter.print(f"epoch {epoch_number}/{self.cfg.epochs}: training at {size} px (evaluating at {eval_size} px)")
        self.reporter.event("train_size", epoch=epoch_number, step=self.progress.global_step, size=size)

    def _report_window(self, step_in_epoch: int, steps_per_epoch: int, timer: StepTimer,
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
            "eta_run_s": timer.eta(total_steps - self.progress.global_step),
            "max_mem_gib": max_memory_gib(self.device),
        }
        self.reporter.train_window(epoch=self.progress.epoch + 1, epochs=self.cfg.epochs,
                                   step=self.progress.global_step, epoch_step=step_in_epoch,
                                   steps_per_epoch=steps_per_epoch, values=values,
                                   memory_kind="GiB" if self.device.type == "cuda" else "GiB rss")

    def agreed_signal(self, stop: StopRequest) -> int:
        """The stop signal of any rank, agreed by all: one that arrived during an evaluation may
        have reached only some ranks."""
        return StopAgreement(self.info).signal_now(stop.signum or 0)

    # --- evaluation -------------------------------------------------------------------------------

    def evaluate(self, loader: Any, model: Optional[nn.Module] = None) -> Any:
        model = model if model is not None else self.model
        average_batchnorm_statistics(model, self.info)
        return evaluate(model, loader, info=self.info, normalize=self.normalize, amp_dtype=self.amp_dtype)

    def end_epoch(self, stats: EpochStats, val_loader: Any) -> bool:
        """Evaluate the weights (and the EMA's) after an epoch, keep the best top-1, report the
        epoch; True when these weights are the best so far."""
        metrics = {"train_loss": stats.loss, "bad_samples": stats.bad_samples, "epoch_time_s": stats.seconds,
                   **self.evaluate(val_loader).as_dict("val_")}
        if self.ema is not None:
            metrics.update(self.evaluate(val_loader, self.ema.module).as_dict("val_ema_"))
        is_best = self.progress.note_top1(metrics["val_top1"], stats.epoch)
        self.reporter.epoch_end(epoch=stats.epoch, epochs=self.cfg.epochs, step=self.progress.global_step,
                                complete=stats.complete, epochs_done=stats.epochs_done, metrics=metrics,
                                best_top1=self.progress.best_top1, lr=self.optimizer.param_groups[0]["lr"])
        return is_best


def build_trainer(cfg: Config, info: DistInfo, run: RunSettings, *, num_classes: int, steps_per_epoch: int,
                  peak_lr: float, reporter: Reporter) -> Trainer:
    """The network, optimizer and lr schedule of a run and the Trainer that steps them: the one way
    they are built (train_dist.py and the GPU check). The initial weights are the same on every rank."""
    from data.transforms import IMAGENET_MEAN, IMAGENET_STD

    from ..model import create_model

    seed_all(cfg.seed)
    model = create_model(cfg.arch, num_classes=num_classes, memory_efficient=cfg.memory_efficient,
                         drop_rate=cfg.drop_rate)
    model = prepare_model(model, cfg, run)
    optimizer = build_optimizer(model, cfg, peak_lr)
    schedule = LRSchedule.from_config(cfg, peak_lr, steps_per_epoch)
    normalize = DeviceNormalize(IMAGENET_MEAN, IMAGENET_STD, run.device, run.channels_last)
    return Trainer(model, optimizer, schedule, cfg, info, run, num_classes=num_classes, normalize=normalize,
                   reporter=reporter)
