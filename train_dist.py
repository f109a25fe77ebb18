"""Train DenseNet-BC on ImageNet with DistributedDataParallel: one run, read top to bottom.

    # the demo data on 2 CPU processes (the README's command):
    torchrun --nproc_per_node=2 train_dist.py --arch densenet_tiny --data demo --image-size 64 \\
        --epochs 30 --lr 0.2 --lr-schedule cosine --output-dir runs/demo
    # the paper's recipe on 8 GPUs (8 x 32 = 256 images per step, lr 0.1):
    torchrun --nproc_per_node=8 train_dist.py --arch densenet169 --data /path/to/imagenet
    # a more modern recipe (cosine, warmup, label smoothing, EMA, mixup/cutmix, RandAugment):
    torchrun --nproc_per_node=8 train_dist.py --arch densenet121 --recipe modern --data /path/to/imagenet
    # evaluate a checkpoint of ours (its arch and image size come with it) or a torchvision weight file:
    python train_dist.py --evaluate --weights densenet121-a639ec97.pth --data /path/to/imagenet

Running the same command again resumes from the newest valid checkpoint in --output-dir.
SIGTERM, SIGINT or SIGUSR1 on any rank: every rank finishes its step, a checkpoint is saved, exit 3.
Exit status: 0 done, 2 bad configuration or input (one line, before anything is written), 3 interrupted
(rerun to resume), 4 non-finite loss, 5 another process lost (a host died, was cut off or froze for
--dist-timeout seconds; rerun to resume).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback

from densenet.training.config import Config, ConfigError, parse_config
from densenet.training.signals import (EXIT_CONFIG_ERROR, EXIT_INTERRUPTED, EXIT_NONFINITE, EXIT_OK,
                                      EXIT_PEER_LOST, StopRequest, record_exit_status)


def print_once(message: str) -> None:
    """stderr of rank 0 only: every rank reads the same command line and would say the same."""
    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
        print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    # --help and command-line mistakes are answered before torch is imported, which takes seconds
    # on a cold node; main() parses again (it is cheap), so that it works the same when imported.
    try:
        parse_config(sys.argv[1:])
    except ConfigError as e:
        print_once(f"error: {e}")
        record_exit_status(EXIT_CONFIG_ERROR)
        sys.exit(EXIT_CONFIG_ERROR)

from dataclasses import dataclass  # noqa: E402  (everything below may import torch)
from pathlib import Path  # noqa: E402
from typing import Any, Dict, List, Optional  # noqa: E402

import densenet  # noqa: E402
from data import IMAGENET_MEAN, IMAGENET_STD, DataLayoutError  # noqa: E402
from data.files import atomic_write_bytes  # noqa: E402
from data.index import IndexCache, SplitIndex  # noqa: E402
from densenet.training.checkpoint import CheckpointError, Checkpointer, Progress, Resumed, check_fits  # noqa: E402
from densenet.training.config import config_changes, config_to_dict, eval_crop_size, save_config  # noqa: E402
from densenet.training.distributed import (DistInfo, SharedError, barrier, checked_on_every_rank,  # noqa: E402
                                           exit_without_teardown, init_distributed, lost_peer, shutdown)
from densenet.training.engine import EpochEnd, EpochStats, Trainer, build_trainer, prepare_model  # noqa: E402
from densenet.training.evaluation import evaluate  # noqa: E402
from densenet.training.loaders import build_loaders, eval_loader, index_data  # noqa: E402
from densenet.training.inputs import DeviceNormalize  # noqa: E402
from densenet.training.optim import kernels_in_use, lr_scaling_rule, peak_lr, scaled_lr, scaling_rule  # noqa: E402
from densenet.training.reporting import Reporter, format_duration, unreadable_note  # noqa: E402
from densenet.training.settings import RunSettings, configure_backends, resolve_settings, seed_all  # noqa: E402
from densenet.training.wandb_run import start_wandb  # noqa: E402
from densenet.weights import WeightsError, WeightsFile, read_weights  # noqa: E402

# What a bad input raises: each names the problem and the fix in one line, and ends the run with exit 2.
BAD_INPUT = (ConfigError, CheckpointError, DataLayoutError, WeightsError)


def main(argv: Optional[List[str]] = None) -> int:
    try:
        cfg = parse_config(argv)
    except ConfigError as e:
        print_once(f"error: {e}")
        return EXIT_CONFIG_ERROR
    stop = StopRequest().install()  # before anything slow, so an early signal is not lost
    info = init_distributed(cfg.device, cfg.deterministic, cfg.dist_timeout)
    peer_lost = False
    try:
        run = checked_on_every_rank(info, lambda: resolve_settings(cfg, info), BAD_INPUT)
        return evaluate_weights(cfg, info, run) if cfg.evaluate else train(cfg, info, run, stop)
    except SharedError as e:  # refused by every rank together: said once
        if info.is_main:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG_ERROR
    except BAD_INPUT as e:  # found by this rank alone, during the run
        print(f"error{f' (rank {info.rank})' if info.is_distributed else ''}: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG_ERROR
    except RuntimeError as e:
        said = lost_peer(e)
        if said is None:
            raise
        print(f"error (rank {info.rank}): lost contact with the other processes of the run ({said}): a host died, "
              f"lost its network or froze, or a process was killed. Rerun the same command to resume from the last "
              f"checkpoint (exit status {EXIT_PEER_LOST})", file=sys.stderr, flush=True)
        peer_lost = True  # its process group cannot be shut down cleanly: the process just ends
        return EXIT_PEER_LOST
    finally:
        if not peer_lost:
            shutdown(info)


def train(cfg: Config, info: DistInfo, run: RunSettings, stop: StopRequest) -> int:
    started = time.monotonic()
    run_dir = cfg.run_dir()
    # --- every refusal comes first: before the run folder, a loader or a W&B run exists
    checked_on_every_rank(info, lambda: check_output_dir(run_dir), BAD_INPUT)
    checkpoints = Checkpointer(run_dir, cfg, info)
    resumed = checkpoints.find_resume(BAD_INPUT)
    if resumed is not None and run_complete(resumed.progress, cfg):
        return say_complete(resumed, cfg, info)
    start_weights = (checked_on_every_rank(info, lambda: read_start_weights(cfg), BAD_INPUT)
                     if cfg.weights and resumed is None else None)
    indexes = index_data(cfg, info, ("train", "val"), IndexCache.of_run(run_dir))
    train_loader, val_loader = build_loaders(cfg, info, run, indexes)
    plan = checked_on_every_rank(info, lambda: plan_run(cfg, info, train_loader, resumed), BAD_INPUT)
    cfg = plan.cfg  # with the checkpoint's peak lr, when it is kept

    # --- the run folder and what is reported to it: rank 0 writes, every rank reads the same folder
    reporter = open_run_folder(cfg, info, plan, resumed, indexes)
    for loader in (train_loader, val_loader):  # each unreadable file listed once in the run folder
        loader.record_unreadable_to(run_dir / "unreadable.txt")
    configure_backends(cfg, info.device)

    # --- model, optimizer, lr schedule (the same initial weights on every rank); then resume,
    # or start from --weights (or from scratch)
    trainer = build_trainer(cfg, info, run, num_classes=plan.num_classes, steps_per_epoch=plan.steps_per_epoch,
                            peak_lr=plan.peak_lr, reporter=reporter)
    checkpoints.start_writing(cfg, classes=train_loader.classes, wandb_run_id=reporter.wandb.id, report=reporter.print)
    if resumed is not None:
        checkpoints.restore(trainer, resumed, run.rank_seed)
        say_resumed(resumed, plan, cfg, reporter)
    else:
        seed_all(run.rank_seed)  # dropout and mixup differ per rank from here on
        if start_weights is not None:
            load_initial_weights(trainer.model, start_weights, cfg.arch, reporter)
    if info.is_main:
        save_config(cfg, run_dir / "config.yaml", plan.derived())
    describe_run(cfg, info, run, trainer, train_loader, val_loader, plan)

    # --- the epoch loop: the trainer keeps the counters and asks for checkpoints within an epoch
    while not run_complete(trainer.progress, cfg):
        stats = trainer.train_epoch(train_loader, stop, checkpoints)
        if stats.end is EpochEnd.NONFINITE:
            return stop_nonfinite(stats, run_dir, reporter)
        if stats.end is EpochEnd.SIGNAL:
            checkpoints.save(trainer, epoch_end=False)
            return exit_interrupted(stats.signal, stop, reporter, trainer.progress)
        is_best = trainer.end_epoch(stats, val_loader)
        checkpoints.save(trainer, epoch_end=stats.complete, is_best=is_best)
        # A signal that came during the evaluation may have reached some ranks only: agree first.
        if signum := trainer.agreed_signal(stop):
            return exit_interrupted(signum, stop, reporter, trainer.progress)
    return say_finished(time.monotonic() - started, trainer.progress, run_dir, reporter)


def evaluate_weights(cfg: Config, info: DistInfo, run: RunSettings) -> int:
    """--evaluate: top-1/top-5 of --weights (ours or torchvision's) over the whole validation set."""
    weights = checked_on_every_rank(info, lambda: read_weights(cfg.weights), BAD_INPUT)
    cfg = checked_on_every_rank(info, lambda: settings_of(weights, cfg), BAD_INPUT)
    results_file = Path(cfg.results_file or cfg.run_dir() / f"eval_{Path(cfg.weights).stem}.json")
    # A checkpoint of ours names its classes: the labels are then those of its training data.
    val = index_data(cfg, info, ("val",), IndexCache(None), classes=weights.classes)["val"]
    val_loader = checked_on_every_rank(info, lambda: eval_loader(cfg, info, run, val.source), BAD_INPUT)
    num_classes = cfg.num_classes or weights.num_classes
    checked_on_every_rank(info, lambda: check_class_count(cfg, num_classes, val_loader.num_classes), BAD_INPUT)
    configure_backends(cfg, info.device)
    model = densenet.create_model(cfg.arch, num_classes=num_classes)
    try:
        model.load_state_dict(weights.state_dict)
    except RuntimeError as e:
        raise SharedError(f"weights: {cfg.weights} does not fit --arch {cfg.arch}: "
                          f"{str(e).splitlines()[0]}") from None
    model = prepare_model(model, cfg, run)
    normalize = DeviceNormalize(IMAGENET_MEAN, IMAGENET_STD, run.device, run.channels_last)
    result = evaluate(model, val_loader, info=info, normalize=normalize, amp_dtype=run.amp_dtype)
    if info.is_main:
        results = {"weights": cfg.weights, "arch": cfg.arch, "image_size": eval_crop_size(cfg), "data": cfg.data,
                   **result.as_dict()}
        results_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(results_file, (json.dumps(results, indent=2) + "\n").encode())
        print(f"eval {cfg.weights} ({cfg.arch}, {eval_crop_size(cfg)} px): top1 {result.top1:.3f}  "
              f"top5 {result.top5:.3f}  loss {result.loss:.4f}  images {result.count}"
              f"{unreadable_note(result.unreadable)}; results in {results_file}", flush=True)
    return EXIT_OK


def check_class_count(cfg: Config, num_classes: int, data_classes: int) -> None:
    """Output i must be class i of the data: any other count scores against the wrong labels."""
    if num_classes != data_classes:
        source = "--num-classes" if cfg.num_classes else cfg.weights
        raise ConfigError(f"num_classes: {source} has {num_classes} classes but {cfg.data} has {data_classes}, so "
                          "every score would be counted against other labels; give --data the classes the weights "
                          "were trained on (class indices follow ROOT/train's folders, else ROOT/val's: all 1000 "
                          "ILSVRC2012 classes when those are ImageNet wnids)")


def settings_of(weights: WeightsFile, cfg: Config) -> Config:
    """The arch and image size a checkpoint of ours was trained with, unless given: evaluating a
    64 px network at the default 224 px gives a number, but the wrong one."""
    changes: Dict[str, Any] = {}
    for key, saved in (("arch", weights.arch), ("image_size", weights.image_size)):
        if saved is None or saved == getattr(cfg, key):
            continue
        if cfg.given(key):
            if key == "arch":
                raise ConfigError(f"weights: {cfg.weights} holds a {saved}, not a {cfg.arch}; "
                                  f"drop --arch or pass --arch {saved}")
            continue  # another evaluation size on purpose
        changes[key] = saved
    if not changes:
        return cfg
    print_once(f"from {cfg.weights}: " + ", ".join(f"{k} {v}" for k, v in changes.items()))
    return cfg.with_values(**changes)


# --- checks made before anything is written ----------------------------------------------------

def check_output_dir(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output_dir: {run_dir} is a file, not a folder; give a folder with --output-dir")
    existing = next(p for p in [run_dir, *run_dir.parents] if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"output_dir: {run_dir} cannot be created: {existing} is a file; "
                          "give another --output-dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir: {run_dir} cannot be {'written' if existing == run_dir else 'created'}: "
                          f"{existing} is not writable; give another --output-dir")


def run_complete(progress: Progress, cfg: Config) -> bool:
    return progress.epoch >= cfg.epochs or (cfg.max_steps is not None and progress.global_step >= cfg.max_steps)


def say_complete(resumed: Resumed, cfg: Config, info: DistInfo) -> int:
    """A finished run says so at once, without building loaders, the model or a W&B run."""
    progress = resumed.progress
    if info.is_main:
        best = (f"; best val top1 {progress.best_top1:.2f} at epoch {progress.best_epoch}"
                if progress.best_epoch > 0 else "")
        print(f"nothing to do: {resumed.path} is the end of this run ({progress.epoch} of {cfg.epochs} epochs, "
              f"step {progress.global_step}{best}); raise --epochs (or --max-steps) to train on", flush=True)
    return EXIT_OK


def read_start_weights(cfg: Config) -> WeightsFile:
    weights = read_weights(cfg.weights)
    if weights.arch is not None and weights.arch != cfg.arch:
        raise ConfigError(f"weights: {cfg.weights} holds a {weights.arch}, but this run builds a {cfg.arch}; "
                          f"pass --arch {weights.arch} or other --weights")
    return weights


@dataclass(frozen=True)
class RunPlan:
    """What the data and the process layout make of the config: known once the loaders exist."""
    cfg: Config  # with the checkpoint's peak lr, when only the global batch changed
    steps_per_epoch: int
    num_classes: int
    global_batch: int
    peak_lr: float
    config_changes: List[str]  # between the checkpoint's config and this command's, as the user gave it

    def derived(self) -> Dict[str, Any]:
        """For config.yaml's comments and the W&B config."""
        return {"world_size": self.global_batch // (self.cfg.batch_size * self.cfg.accum_steps),
                "global_batch_size": self.global_batch, "peak_lr": self.peak_lr,
                "steps_per_epoch": self.steps_per_epoch, "num_classes": self.num_classes}


def plan_run(cfg: Config, info: DistInfo, train_loader: Any, resumed: Optional[Resumed]) -> RunPlan:
    steps_per_epoch = len(train_loader) // cfg.accum_steps
    num_classes = cfg.num_classes or train_loader.num_classes
    if steps_per_epoch == 0:
        largest = train_loader.rank_samples // cfg.accum_steps
        raise ConfigError(f"batch_size: {train_loader.num_samples} training images give each process "
                          f"{len(train_loader)} full batches of {cfg.batch_size}, fewer than the {cfg.accum_steps} "
                          f"of one optimizer step; use --batch-size {largest} or less")
    if num_classes < train_loader.num_classes:
        raise ConfigError(f"num_classes: {num_classes} is fewer than the {train_loader.num_classes} classes of "
                          "the training data; drop --num-classes to use the data's")
    global_batch = cfg.batch_size * info.world_size * cfg.accum_steps
    changes: List[str] = []
    if resumed is not None:
        check_fits(resumed.state, str(resumed.path), cfg.arch, num_classes)
        changes = config_changes(resumed.state["config"], cfg)
        cfg = keep_checkpoint_lr(cfg, resumed, global_batch, info)
    return RunPlan(cfg, steps_per_epoch, num_classes, global_batch, peak_lr(cfg, global_batch), changes)


def keep_checkpoint_lr(cfg: Config, resumed: Resumed, global_batch: int, info: DistInfo) -> Config:
    """A resumed run keeps its peak lr when only the global batch (another number of processes) or
    the scaling rule changed: scaling again would silently halve or double it mid-run. An --lr or
    --base-lr of this command that differs from the checkpoint's is the user's choice and wins."""
    old, saved = resumed.state["config"], resumed.progress
    if cfg.lr is not None or old.get("lr") is not None or cfg.base_lr != old.get("base_lr"):
        return cfg
    old_global = saved.world_size * saved.batch_size * saved.accum_steps
    # Checkpoints from before lr_scaling existed scaled linearly, whatever the optimizer.
    old_rule = scaling_rule(old.get("lr_scaling", "linear"), old.get("optimizer", cfg.optimizer))
    kept, scaled = scaled_lr(cfg.base_lr, old_rule, old_global), peak_lr(cfg, global_batch)
    if math.isclose(kept, scaled, rel_tol=1e-12):
        return cfg
    if info.is_main:
        why = (f"the global batch is now {global_batch} (the checkpoint's was {old_global})" if old_global != global_batch
               else f"the checkpoint's peak lr came from the {old_rule} scaling rule")
        print(f"warning: {why}; keeping its peak lr {kept:.4g} instead of the {scaled:.4g} that "
              f"{lr_scaling_rule(cfg)} scaling gives; pass --lr {scaled:.4g} to use that", flush=True)
    return cfg.with_values(lr=kept)


# --- the run as it goes ----------------------------------------------------------------------------

def restart_count() -> int:
    return int(os.environ.get("SLURM_RESTART_COUNT") or os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)


def open_run_folder(cfg: Config, info: DistInfo, plan: RunPlan, resumed: Optional[Resumed],
                    indexes: Dict[str, SplitIndex]) -> Reporter:
    """The run folder (made by rank 0, seen by every rank) with a copy of each data index that was
    listed now, and the run's reporter, with its W&B run (continued when the checkpoint names one)."""
    run_dir = cfg.run_dir()
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cache = IndexCache.of_run(run_dir)
        for index in indexes.values():
            cache.keep(index)
            print(index.describe(), flush=True)
    barrier(info)

    def say(message: str) -> None:
        if info.is_main:
            print(message, flush=True)

    wandb = start_wandb(mode=cfg.wandb, project=cfg.wandb_project, entity=cfg.wandb_entity, name=cfg.wandb_name,
                        tags=cfg.wandb_tags, config={**config_to_dict(cfg), **plan.derived()}, run_dir=run_dir,
                        run_id=resumed.state.get("wandb_run_id") if resumed else None, is_main=info.is_main,
                        report=say)
    return Reporter(run_dir, info.is_main, wandb)


def say_resumed(resumed: Resumed, plan: RunPlan, cfg: Config, reporter: Reporter) -> None:
    for change in plan.config_changes:
        reporter.print(f"config changed since the checkpoint: {change}")
    if cfg.weights:
        reporter.print(f"note: resuming, so --weights {cfg.weights} is not used (pass --no-resume to start from it)")
    step = resumed.progress.global_step
    reporter.event("resumed", epoch=resumed.progress.epoch + 1, step=step, from_step=step,
                   restart_count=restart_count(), checkpoint=str(resumed.path))


def describe_run(cfg: Config, info: DistInfo, run: RunSettings, trainer: Trainer, train_loader: Any,
                 val_loader: Any, plan: RunPlan) -> None:
    say = trainer.reporter.print
    n_params = sum(p.numel() for p in trainer.model.parameters()) / 1e6
    say(f"{cfg.arch} ({n_params:.2f}M parameters, {plan.num_classes} classes) on {info.world_size} x "
        f"{info.device.type} ({info.launcher}, {info.backend or 'no process group'}); "
        f"run folder {cfg.run_dir()}; restart count {restart_count()}")
    processes = f"{info.world_size} process" + ("es" if info.world_size > 1 else "")
    repeats = ""
    if train_loader.aug_repeats > 1:
        repeats = (f"repeated augmentation x{train_loader.aug_repeats} ({train_loader.rank_samples} samples "
                   f"per process per epoch), ")
    say(f"batch {cfg.batch_size} per process x {processes} x {cfg.accum_steps} accumulated = "
        f"{plan.global_batch} global; {cfg.optimizer}, peak lr {plan.peak_lr:.4g}"
        f"{'' if cfg.lr is not None else f' ({lr_scaling_rule(cfg)} scaling of {cfg.base_lr:g} per 256)'}; "
        f"amp {run.amp_dtype or 'off'}; channels_last {run.channels_last}; "
        f"compile {cfg.compile_backend if cfg.compile else 'off'}; "
        f"optimizer kernels {kernels_in_use(trainer.optimizer)}; "
        f"{train_loader.num_samples} train / {val_loader.num_samples} val images, {repeats}"
        f"{run.workers} loader worker{'s' if run.workers != 1 else ''} per process, decoded by "
        f"{'the loader workers' if run.decode_on is None else run.decode_on.type}; "
        f"{plan.steps_per_epoch} steps per epoch")


def load_initial_weights(model: Any, weights: WeightsFile, arch: str, reporter: Reporter) -> None:
    """--weights when training: start from them; a classifier of another size is left freshly initialised."""
    own = model.state_dict()
    skipped = [k for k, v in weights.state_dict.items() if k in own and v.shape != own[k].shape]
    try:
        model.load_state_dict({k: v for k, v in weights.state_dict.items() if k not in skipped}, strict=not skipped)
    except RuntimeError as e:
        raise ConfigError(f"weights: {weights.path} does not fit a {arch}: "
                          f"{str(e).splitlines()[0]}") from None
    note = f" (not loaded, shapes differ: {', '.join(skipped)})" if skipped else ""
    reporter.print(f"initial weights from {weights.path}{note}")


def exit_interrupted(signum: int, stop: StopRequest, reporter: Reporter, progress: Progress) -> int:
    stop.ignore_further()
    reporter.print(f"stopped by a signal at step {progress.global_step}; checkpoint saved: "
                   "run the same command to resume")
    reporter.event("interrupted", epoch=progress.epoch + 1, step=progress.global_step, signal=signum)
    reporter.finish(EXIT_INTERRUPTED, preempted=True)
    return EXIT_INTERRUPTED


def say_finished(seconds: float, progress: Progress, run_dir: Path, reporter: Reporter) -> int:
    reporter.finish(EXIT_OK)  # before the last line, so that wandb's closing notes do not bury it
    reporter.print(f"finished in {format_duration(seconds)}: best val top1 {progress.best_top1:.2f} at epoch "
                   f"{progress.best_epoch} ({run_dir / 'best.pt'}); run folder {run_dir}")
    return EXIT_OK


def stop_nonfinite(stats: EpochStats, run_dir: Path, reporter: Reporter) -> int:
    last = run_dir / "last.pt"
    kept = f"the last good checkpoint {last} was left as it was" if last.exists() else "no checkpoint was saved yet"
    message = (f"error: the training loss became {stats.nonfinite_loss} at step {stats.nonfinite_step} "
               f"(epoch {stats.epoch}); stopping without saving: {kept}. "
               "Try a lower --lr, --grad-clip, or --amp bf16 instead of fp16.")
    if reporter.is_main:
        print(message, file=sys.stderr, flush=True)
    reporter.event("nonfinite_loss", epoch=stats.epoch, step=stats.nonfinite_step, loss=str(stats.nonfinite_loss))
    reporter.finish(EXIT_NONFINITE)
    return EXIT_NONFINITE


if __name__ == "__main__":
    try:
        code = main()
    except Exception:  # a bug, not a bad input: show where, then end like every other run
        traceback.print_exc()
        code = 1
    record_exit_status(code)  # for launch/node_agent.sh, which sees only torchrun's status
    # Leave without the interpreter's teardown (see exit_without_teardown): in it, torch's C++
    # runtime now and then aborts after a completed run, and after an error it would wait forever
    # for loader workers that ignore SIGTERM; collecting garbage first shuts them down instead.
    exit_without_teardown(code)
