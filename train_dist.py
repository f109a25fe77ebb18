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
(rerun to resume), 4 non-finite loss.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback

from densenet.training.config import Config, ConfigError, parse_config
from densenet.training.signals import EXIT_CONFIG_ERROR, EXIT_INTERRUPTED, EXIT_NONFINITE, EXIT_OK, StopRequest


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
        sys.exit(EXIT_CONFIG_ERROR)

from pathlib import Path  # noqa: E402  (everything below may import torch)
from typing import Any, Dict, List, Optional  # noqa: E402

import torch  # noqa: E402

import densenet  # noqa: E402
from data import (IMAGENET_MEAN, IMAGENET_STD, DataLayoutError, build_eval_loader, build_train_loader,  # noqa: E402
                  resolve_data_root)
from data.files import atomic_write_bytes  # noqa: E402
from densenet.training.checkpoint import (CHECKPOINT_FORMAT, CheckpointError, CheckpointSaver, Progress,  # noqa: E402
                                 capture_rng_state, check_fits, choose_resume, load_checkpoint, restore_rng_state)
from densenet.training.config import config_changes, config_to_dict, save_config  # noqa: E402
from densenet.training.distributed import (DistInfo, SharedError, all_reduce, barrier, checked_on_every_rank,  # noqa: E402
                                  decided_by_main, default_workers, exit_without_teardown, gather_objects,
                                  init_distributed, shutdown)
from densenet.training.engine import (DeviceNormalize, EpochEnd, Trainer, configure_backends, evaluate,  # noqa: E402
                             prepare_model, resolve_amp, seed_all, use_channels_last)
from densenet.training.metrics_log import RunLog, format_duration  # noqa: E402
from densenet.training.optim import LRSchedule, build_optimizer, kernels_in_use, peak_lr  # noqa: E402
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
    info = init_distributed(cfg.device, cfg.deterministic)
    try:
        return evaluate_weights(cfg, info) if cfg.evaluate else train(cfg, info, stop)
    except SharedError as e:  # refused by every rank together: said once
        if info.is_main:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG_ERROR
    except BAD_INPUT as e:  # found by this rank alone, during the run
        print(f"error{f' (rank {info.rank})' if info.is_distributed else ''}: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG_ERROR
    finally:
        shutdown(info)


def workers_for(cfg: Config, info: DistInfo) -> int:
    return cfg.workers if cfg.workers is not None else default_workers(info)


def pin_memory(cfg: Config, info: DistInfo) -> bool:
    return cfg.pin_memory and info.device.type == "cuda"


def eval_loader_for(cfg: Config, root: Path, info: DistInfo) -> Any:
    # None: the loader's floor(image_size / 0.875), 224 -> 256 (timm's rounding; the one place it is made)
    return build_eval_loader(root, image_size=cfg.image_size, resize_size=cfg.eval_resize,
                             batch_size=cfg.eval_batch_size or cfg.batch_size, workers=workers_for(cfg, info),
                             rank=info.rank, world_size=info.world_size, pin_memory=pin_memory(cfg, info))


def evaluate_weights(cfg: Config, info: DistInfo) -> int:
    """--evaluate: top-1/top-5 of --weights (ours or torchvision's) over the whole validation set."""
    weights = checked_on_every_rank(info, lambda: read_weights(cfg.weights), BAD_INPUT)
    cfg = checked_on_every_rank(info, lambda: settings_of(weights, cfg), BAD_INPUT)
    results_file = Path(cfg.results_file or cfg.run_dir() / f"eval_{Path(cfg.weights).stem}.json")
    val_loader = checked_on_every_rank(info, lambda: eval_loader_for(cfg, resolve_data_root(cfg.data), info),
                                       BAD_INPUT)
    configure_backends(cfg, info.device)
    model = densenet.create_model(cfg.arch, num_classes=cfg.num_classes or weights.num_classes)
    try:
        model.load_state_dict(weights.state_dict)
    except RuntimeError as e:
        raise SharedError(f"weights: {cfg.weights} does not fit --arch {cfg.arch}: "
                          f"{str(e).splitlines()[0]}") from None
    model = prepare_model(model, cfg, info)
    normalize = DeviceNormalize(IMAGENET_MEAN, IMAGENET_STD, info.device, use_channels_last(cfg, info.device))
    result = evaluate(model, val_loader, info=info, normalize=normalize, amp_dtype=resolve_amp(cfg.amp, info.device))
    if info.is_main:
        results = {"weights": cfg.weights, "arch": cfg.arch, "image_size": cfg.image_size, "data": cfg.data,
                   **result.as_dict()}
        results_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(results_file, (json.dumps(results, indent=2) + "\n").encode())
        print(f"eval {cfg.weights} ({cfg.arch}, {cfg.image_size} px): top1 {result.top1:.3f}  "
              f"top5 {result.top5:.3f}  loss {result.loss:.4f}  images {result.count}"
              f"{unreadable_note(result.unreadable)}; results in {results_file}", flush=True)
    return EXIT_OK


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


def train(cfg: Config, info: DistInfo, stop: StopRequest) -> int:
    started = time.monotonic()
    run_dir = cfg.run_dir()
    # --- every refusal comes first: before the run folder, a loader or a W&B run exists
    checked_on_every_rank(info, lambda: check_output_dir(run_dir), BAD_INPUT)
    resume_path = decided_by_main(info, lambda: resume_file(cfg, run_dir), BAD_INPUT)
    ckpt = checked_on_every_rank(info, lambda: load_checked(resume_path, cfg), BAD_INPUT) if resume_path else None
    saved = Progress.from_dict(ckpt["progress"]) if ckpt is not None else None
    if saved is not None and run_complete(saved, cfg):
        return say_complete(resume_path, saved, cfg, info)
    start_weights = None
    if cfg.weights and ckpt is None:
        start_weights = checked_on_every_rank(info, lambda: read_weights(cfg.weights), BAD_INPUT)
        checked_on_every_rank(info, lambda: check_weights_arch(start_weights, cfg), BAD_INPUT)
    train_loader, val_loader = checked_on_every_rank(info, lambda: build_loaders(cfg, info), BAD_INPUT)
    steps_per_epoch = len(train_loader) // cfg.accum_steps
    num_classes = cfg.num_classes or train_loader.num_classes
    checked_on_every_rank(info, lambda: check_data_fits(cfg, train_loader, steps_per_epoch, num_classes,
                                                        info.world_size, ckpt, resume_path), BAD_INPUT)

    # --- the run folder and its logs: rank 0 writes, every rank reads the same folder
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier(info)
    log = RunLog(run_dir, info.is_main)
    for loader in (train_loader, val_loader):  # each unreadable file listed once in the run folder
        loader.record_unreadable_to(run_dir / "unreadable.txt")
    restart_count = int(os.environ.get("SLURM_RESTART_COUNT") or os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
    configure_backends(cfg, info.device)

    # --- model, optimizer, learning-rate schedule (lr scaled linearly to the global batch)
    seed_all(cfg.seed)  # the same on every rank, so every rank builds the same initial weights
    model = densenet.create_model(cfg.arch, num_classes=num_classes, memory_efficient=cfg.memory_efficient,
                                  drop_rate=cfg.drop_rate)
    model = prepare_model(model, cfg, info)
    global_batch = cfg.batch_size * info.world_size * cfg.accum_steps
    changes = config_changes(ckpt["config"], cfg) if ckpt is not None else []  # as the user asked
    if ckpt is not None:
        cfg = keep_checkpoint_lr(cfg, ckpt, global_batch, log)
    lr = peak_lr(cfg, global_batch)
    optimizer = build_optimizer(model, cfg, lr)
    schedule = LRSchedule.from_config(cfg, lr, steps_per_epoch)
    derived = {"world_size": info.world_size, "global_batch_size": global_batch, "peak_lr": lr,
               "steps_per_epoch": steps_per_epoch, "num_classes": num_classes}

    # --- resume, or start from --weights (or from scratch)
    progress = Progress(world_size=info.world_size, batch_size=cfg.batch_size, accum_steps=cfg.accum_steps)
    wandb = start_wandb(mode=cfg.wandb, project=cfg.wandb_project, entity=cfg.wandb_entity, name=cfg.wandb_name,
                        tags=cfg.wandb_tags, config={**config_to_dict(cfg), **derived}, run_dir=run_dir,
                        run_id=ckpt.get("wandb_run_id") if ckpt else None, is_main=info.is_main, report=log.print)
    trainer = Trainer(model, optimizer, schedule, cfg, info, num_classes=num_classes, mean=IMAGENET_MEAN,
                      std=IMAGENET_STD, log=log, wandb=wandb)
    if ckpt is not None:
        trainer.load_state_dict(ckpt, report=log.print)
        progress = resume_progress(ckpt, resume_path, cfg, info, log)
        for change in changes:
            log.print(f"config changed since the checkpoint: {change}")
        if cfg.weights:
            log.print(f"note: resuming, so --weights {cfg.weights} is not used (pass --no-resume to start from it)")
        log.record("event", epoch=progress.epoch + 1, step=progress.global_step, event="resumed",
                   from_step=progress.global_step, restart_count=restart_count, checkpoint=resume_path)
    else:
        seed_all(cfg.seed + 1000 * info.rank)  # dropout and mixup differ per rank from here on
        if start_weights is not None:
            load_initial_weights(model, start_weights, cfg.arch, log)
    if info.is_main:
        save_config(cfg, run_dir / "config.yaml", derived)
    describe_run(cfg, info, log, model, trainer, train_loader, val_loader, derived, restart_count)

    # --- checkpoints: all ranks take part (RNG states are gathered), rank 0 writes
    saver = CheckpointSaver(run_dir, cfg.keep_epochs) if info.is_main else None

    def save(epoch_end: bool, is_best: bool = False) -> None:
        rng = gather_objects(capture_rng_state(info.device), info)
        if saver is not None:
            state = {"format": CHECKPOINT_FORMAT, "arch": cfg.arch, "config": config_to_dict(cfg),
                     **trainer.state_dict(), "progress": progress.to_dict(), "rng": rng,
                     "classes": list(train_loader.classes), "wandb_run_id": wandb.id}
            written = saver.save(state, epoch_end=epoch_end, is_best=is_best)
            batches = steps_per_epoch * cfg.accum_steps
            at = (f"end of epoch {progress.epoch}" if progress.batch_in_epoch == 0 else
                  f"epoch {progress.epoch + 1}, batch {progress.batch_in_epoch} of {batches}")
            log.print(f"saved {', '.join(p.name for p in written)} ({at}, step {progress.global_step})")
        barrier(info)  # nobody moves on (or exits) before the files are complete

    # --- the epoch loop
    while not run_complete(progress, cfg):
        stats = trainer.train_epoch(train_loader, progress, stop, on_checkpoint=lambda: save(epoch_end=False))
        if stats.end is EpochEnd.NONFINITE:
            return stop_nonfinite(progress, stats.nonfinite_step, stats.nonfinite_loss, run_dir, log, wandb)
        if stats.end is EpochEnd.SIGNAL:
            save(epoch_end=False)
            return exit_interrupted(stats.signal, stop, log, wandb, progress)
        epoch_number = progress.epoch + 1  # 1-based, as printed and recorded
        epoch_done = progress.batch_in_epoch >= steps_per_epoch * cfg.accum_steps
        if epoch_done:
            progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
        epochs_float = progress.epoch + progress.batch_in_epoch / (steps_per_epoch * cfg.accum_steps)
        metrics = {"train_loss": stats.loss, "bad_samples": stats.bad_samples, "epoch_time_s": stats.seconds,
                   **trainer.evaluate(val_loader).as_dict("val_")}
        if trainer.ema is not None:
            metrics.update(trainer.evaluate(val_loader, trainer.ema.module).as_dict("val_ema_"))
        is_best = metrics["val_top1"] > progress.best_top1
        if is_best:
            progress.best_top1, progress.best_epoch = metrics["val_top1"], epoch_number
        report_epoch(metrics, epoch_number, epoch_done, progress, cfg, log, lr=optimizer.param_groups[0]["lr"])
        wandb.log({f"epoch/{k}": v for k, v in metrics.items()} | {"epoch": epochs_float}, step=progress.global_step)
        save(epoch_end=epoch_done, is_best=is_best)
        # A signal that arrived during evaluation may have reached only some ranks: agree first.
        signum = int(all_reduce(torch.tensor([float(stop.signum or 0)], device=info.device), info, op="max").item())
        if signum:
            return exit_interrupted(signum, stop, log, wandb, progress)
    wandb.finish(EXIT_OK)  # before the last line, so that wandb's closing notes do not bury it
    log.print(f"finished in {format_duration(time.monotonic() - started)}: best val top1 {progress.best_top1:.2f} "
              f"at epoch {progress.best_epoch} ({run_dir / 'best.pt'}); run folder {run_dir}")
    log.close()
    return EXIT_OK


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


def resume_file(cfg: Config, run_dir: Path) -> Optional[str]:
    found = choose_resume(run_dir, cfg.resume, print_once)
    return str(found) if found else None


def load_checked(path: str, cfg: Config) -> Dict[str, Any]:
    ckpt = load_checkpoint(Path(path))
    check_fits(ckpt, path, cfg.arch, cfg.num_classes)
    return ckpt


def run_complete(progress: Progress, cfg: Config) -> bool:
    return progress.epoch >= cfg.epochs or (cfg.max_steps is not None and progress.global_step >= cfg.max_steps)


def say_complete(path: str, progress: Progress, cfg: Config, info: DistInfo) -> int:
    """A finished run says so at once, without building loaders, the model or a W&B run."""
    if info.is_main:
        best = (f"; best val top1 {progress.best_top1:.2f} at epoch {progress.best_epoch}"
                if progress.best_epoch > 0 else "")
        print(f"nothing to do: {path} is the end of this run ({progress.epoch} of {cfg.epochs} epochs, "
              f"step {progress.global_step}{best}); raise --epochs (or --max-steps) to train on", flush=True)
    return EXIT_OK


def check_weights_arch(weights: WeightsFile, cfg: Config) -> None:
    if weights.arch is not None and weights.arch != cfg.arch:
        raise ConfigError(f"weights: {cfg.weights} holds a {weights.arch}, but this run builds a {cfg.arch}; "
                          f"pass --arch {weights.arch} or other --weights")


def build_loaders(cfg: Config, info: DistInfo) -> Any:
    root = resolve_data_root(cfg.data)
    try:
        train_loader = build_train_loader(root, image_size=cfg.image_size, batch_size=cfg.batch_size,
                                          workers=workers_for(cfg, info),
                                          rank=info.rank, world_size=info.world_size, seed=cfg.seed,
                                          auto_augment=cfg.auto_augment, random_erasing=cfg.random_erasing,
                                          pin_memory=pin_memory(cfg, info), decode=cfg.decode, device=info.device)
    except ValueError as e:  # an augmentation policy or setting the transforms do not know
        raise ConfigError(str(e)) from None
    return train_loader, eval_loader_for(cfg, root, info)


def check_data_fits(cfg: Config, train_loader: Any, steps_per_epoch: int, num_classes: int, world_size: int,
                    ckpt: Optional[Dict[str, Any]], resume_path: Optional[str]) -> None:
    if steps_per_epoch == 0:
        largest = train_loader.num_samples // (world_size * cfg.accum_steps)
        raise ConfigError(f"batch_size: {train_loader.num_samples} training images give each process "
                          f"{len(train_loader)} full batches of {cfg.batch_size}, fewer than the {cfg.accum_steps} "
                          f"of one optimizer step; use --batch-size {largest} or less")
    if num_classes < train_loader.num_classes:
        raise ConfigError(f"num_classes: {num_classes} is fewer than the {train_loader.num_classes} classes of "
                          "the training data; drop --num-classes to use the data's")
    if ckpt is not None:
        check_fits(ckpt, resume_path, cfg.arch, num_classes)


# --- the run as it goes ----------------------------------------------------------------------------

def keep_checkpoint_lr(cfg: Config, ckpt: Dict[str, Any], global_batch: int, log: RunLog) -> Config:
    """A resumed run keeps its peak lr when only the global batch changed (another number of
    processes): the linear scaling rule would silently halve or double it mid-run. An --lr or
    --base-lr of this command that differs from the checkpoint's is the user's choice and wins."""
    old, saved = ckpt["config"], Progress.from_dict(ckpt["progress"])
    old_global = saved.world_size * saved.batch_size * saved.accum_steps
    if cfg.lr is not None or old.get("lr") is not None or cfg.base_lr != old.get("base_lr") \
            or old_global == global_batch:
        return cfg
    kept, scaled = peak_lr(cfg, old_global), peak_lr(cfg, global_batch)
    log.print(f"warning: the global batch is now {global_batch} (the checkpoint's was {old_global}); keeping its "
              f"peak lr {kept:.4g} instead of the {scaled:.4g} that linear scaling gives; pass --lr {scaled:.4g} "
              "to use that")
    return cfg.with_values(lr=kept)


def describe_run(cfg: Config, info: DistInfo, log: RunLog, model: torch.nn.Module, trainer: Trainer,
                 train_loader: Any, val_loader: Any, derived: Dict[str, Any], restart_count: int) -> None:
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    log.print(f"{cfg.arch} ({n_params:.2f}M parameters, {derived['num_classes']} classes) on {info.world_size} x "
              f"{info.device.type} ({info.launcher}, {info.backend or 'no process group'}); "
              f"run folder {cfg.run_dir()}; restart count {restart_count}")
    processes = f"{info.world_size} process" + ("es" if info.world_size > 1 else "")
    workers = workers_for(cfg, info)
    log.print(f"batch {cfg.batch_size} per process x {processes} x {cfg.accum_steps} accumulated = "
              f"{derived['global_batch_size']} global; peak lr {derived['peak_lr']:.4g}; "
              f"amp {trainer.amp_dtype or 'off'}; channels_last {use_channels_last(cfg, info.device)}; "
              f"compile {cfg.compile_backend if cfg.compile else 'off'}; "
              f"optimizer kernels {kernels_in_use(trainer.optimizer)}; "
              f"{train_loader.num_samples} train / {val_loader.num_samples} val images, "
              f"{workers} loader worker{'s' if workers != 1 else ''} per process, decoded by "
              f"{'the loader workers' if cfg.decode == 'cpu' else info.device.type}; "
              f"{derived['steps_per_epoch']} steps per epoch")


def unreadable_note(count: int) -> str:
    return f" ({count} unreadable, left out)" if count else ""


def report_epoch(metrics: Dict[str, float], epoch_number: int, epoch_done: bool, progress: Progress, cfg: Config,
                 log: RunLog, lr: float) -> None:
    ema = f"  ema top1 {metrics['val_ema_top1']:.2f}" if "val_ema_top1" in metrics else ""
    log.print(f"epoch {epoch_number}/{cfg.epochs} {'done' if epoch_done else 'stopped'} "
              f"(step {progress.global_step}): train loss {metrics['train_loss']:.4f}  "
              f"val top1 {metrics['val_top1']:.2f}  top5 {metrics['val_top5']:.2f}  loss {metrics['val_loss']:.4f} "
              f"on {metrics['val_count']} images{unreadable_note(metrics['val_unreadable'])}{ema}  "
              f"best {progress.best_top1:.2f}  bad samples {metrics['bad_samples']}  {metrics['epoch_time_s']:.0f}s")
    log.record("eval", epoch=epoch_number, step=progress.global_step,
               **{k[4:]: v for k, v in metrics.items() if k.startswith("val_")})
    log.record("epoch", epoch=epoch_number, step=progress.global_step, epoch_complete=epoch_done,
               best_top1=progress.best_top1, **metrics)
    log.summary({"epoch": epoch_number, "step": progress.global_step, "lr": lr, **metrics})


def resume_progress(ckpt: Dict[str, Any], path: str, cfg: Config, info: DistInfo, log: RunLog) -> Progress:
    saved = Progress.from_dict(ckpt["progress"])
    rng_states = ckpt["rng"]
    if saved.same_layout(info.world_size, cfg.batch_size, cfg.accum_steps):
        restore_rng_state(rng_states[info.rank], info.device)
        progress = saved
    else:
        log.print(f"warning: the checkpoint was written by {saved.world_size} processes x batch {saved.batch_size} "
                  f"x accum {saved.accum_steps}; now {info.world_size} x {cfg.batch_size} x {cfg.accum_steps}: "
                  "resuming at the same image count of the epoch, but not bitwise exactly")
        seed_all(cfg.seed + 1000 * info.rank + saved.global_step)
        progress = saved.relayout(info.world_size, cfg.batch_size, cfg.accum_steps)
    best = (f"best top1 {progress.best_top1:.2f} (epoch {progress.best_epoch})" if progress.best_epoch > 0
            else "no evaluation yet")
    log.print(f"resumed from {path}: epoch {progress.epoch + 1}, batch {progress.batch_in_epoch}, "
              f"step {progress.global_step}, {best}")
    return progress


def load_initial_weights(model: torch.nn.Module, weights: WeightsFile, arch: str, log: RunLog) -> None:
    """--weights when training: start from them; a classifier of another size is left freshly initialised."""
    own = model.state_dict()
    skipped = [k for k, v in weights.state_dict.items() if k in own and v.shape != own[k].shape]
    try:
        model.load_state_dict({k: v for k, v in weights.state_dict.items() if k not in skipped}, strict=not skipped)
    except RuntimeError as e:
        raise ConfigError(f"weights: {weights.path} does not fit a {arch}: "
                          f"{str(e).splitlines()[0]}") from None
    note = f" (not loaded, shapes differ: {', '.join(skipped)})" if skipped else ""
    log.print(f"initial weights from {weights.path}{note}")


def exit_interrupted(signum: int, stop: StopRequest, log: RunLog, wandb: Any, progress: Progress) -> int:
    stop.ignore_further()
    log.print(f"stopped by a signal at step {progress.global_step}; checkpoint saved: run the same command to resume")
    log.record("event", epoch=progress.epoch + 1, step=progress.global_step, event="interrupted", signal=signum)
    wandb.mark_preempting()
    wandb.finish(EXIT_INTERRUPTED)
    log.close()
    return EXIT_INTERRUPTED


def stop_nonfinite(progress: Progress, bad_step: int, loss: float, run_dir: Path, log: RunLog, wandb: Any) -> int:
    last = run_dir / "last.pt"
    kept = f"the last good checkpoint {last} was left as it was" if last.exists() else "no checkpoint was saved yet"
    message = (f"error: the training loss became {loss} at step {bad_step} "
               f"(epoch {progress.epoch + 1}); stopping without saving: {kept}. "
               "Try a lower --lr, --grad-clip, or --amp bf16 instead of fp16.")
    if log.is_main:
        print(message, file=sys.stderr, flush=True)
    log.record("event", epoch=progress.epoch + 1, step=bad_step, event="nonfinite_loss", loss=str(loss))
    wandb.finish(EXIT_NONFINITE)
    log.close()
    return EXIT_NONFINITE


if __name__ == "__main__":
    try:
        code = main()
    except Exception:  # a bug, not a bad input: show where, then end like every other run
        traceback.print_exc()
        code = 1
    # Leave without the interpreter's teardown (see exit_without_teardown): in it, torch's C++
    # runtime now and then aborts after a completed run, and after an error it would wait forever
    # for loader workers that ignore SIGTERM; collecting garbage first shuts them down instead.
    exit_without_teardown(code)
