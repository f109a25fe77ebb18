"""Train DenseNet-BC on ImageNet with DistributedDataParallel: one run, read top to bottom.

    # the demo data on 2 CPU processes, a few minutes:
    torchrun --nproc_per_node=2 train_dist.py --arch densenet_tiny --data demo --image-size 64 \\
        --batch-size 32 --epochs 6 --output-dir runs/demo
    # the paper's recipe on 8 GPUs (8 x 32 = 256 images per step, lr 0.1):
    torchrun --nproc_per_node=8 train_dist.py --arch densenet169 --data /path/to/imagenet
    # a more modern recipe (cosine, warmup, label smoothing, EMA, mixup/cutmix, RandAugment):
    torchrun --nproc_per_node=8 train_dist.py --arch densenet121 --recipe modern --data /path/to/imagenet
    # evaluate a checkpoint of ours or a torchvision weight file:
    python train_dist.py --evaluate --arch densenet121 --weights densenet121-a639ec97.pth --data /path/to/imagenet

Running the same command again resumes from the newest valid checkpoint in --output-dir.
SIGTERM, SIGINT or SIGUSR1 on any rank: every rank finishes its step, a checkpoint is saved, exit 3.
Exit status: 0 done, 2 bad configuration or input, 3 interrupted (rerun to resume), 4 non-finite loss.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

import densenet
from data import (IMAGENET_MEAN, IMAGENET_STD, DataLayoutError, build_eval_loader, build_train_loader,
                  resolve_data_root)
from densenet.checkpoint import (CHECKPOINT_FORMAT, CheckpointError, CheckpointSaver, Progress, capture_rng_state,
                                 check_fits, choose_resume, load_checkpoint, restore_rng_state)
from densenet.config import Config, ConfigError, config_changes, config_to_dict, parse_config, save_config
from densenet.distributed import (DistInfo, all_reduce, barrier, broadcast_object, default_workers,
                                  exit_without_teardown, gather_objects, init_distributed, shutdown)
from densenet.engine import (DeviceNormalize, EpochEnd, Trainer, configure_backends, evaluate, prepare_model,
                             resolve_amp, seed_all, use_channels_last)
from densenet.metrics_log import RunLog
from densenet.optim import LRSchedule, build_optimizer, kernels_in_use, peak_lr
from densenet.signals import EXIT_CONFIG_ERROR, EXIT_INTERRUPTED, EXIT_NONFINITE, EXIT_OK, StopRequest
from densenet.wandb_run import start_wandb


def main(argv: Optional[List[str]] = None) -> int:
    try:
        cfg = parse_config(argv)
    except ConfigError as e:
        if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
            print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    stop = StopRequest().install()  # before anything slow, so an early signal is not lost
    info = init_distributed(cfg.device, cfg.deterministic)
    try:
        return evaluate_weights(cfg, info) if cfg.evaluate else train(cfg, info, stop)
    except (ConfigError, CheckpointError, DataLayoutError) as e:
        print(f"error (rank {info.rank}): {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    finally:
        shutdown(info)


def workers_for(cfg: Config, info: DistInfo) -> int:
    return cfg.workers if cfg.workers is not None else default_workers(info)


def pin_memory(cfg: Config, info: DistInfo) -> bool:
    return cfg.pin_memory and info.device.type == "cuda"


def eval_loader_for(cfg: Config, root: Path, info: DistInfo) -> Any:
    resize = cfg.eval_resize or round(cfg.image_size / 0.875)  # 224 -> 256, the usual centre crop ratio
    return build_eval_loader(root, image_size=cfg.image_size, resize_size=resize,
                             batch_size=cfg.eval_batch_size or cfg.batch_size, workers=workers_for(cfg, info),
                             rank=info.rank, world_size=info.world_size, pin_memory=pin_memory(cfg, info))


def evaluate_weights(cfg: Config, info: DistInfo) -> int:
    """--evaluate: top-1/top-5 of --weights (ours or torchvision's) over the whole validation set."""
    configure_backends(cfg, info.device)
    weights = densenet.load_state_dict_file(cfg.weights)
    model = densenet.create_model(cfg.arch, num_classes=cfg.num_classes or weights["classifier.weight"].shape[0])
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ConfigError(f"weights: {cfg.weights} does not fit --arch {cfg.arch}: {str(e).splitlines()[0]}") from None
    model = prepare_model(model, cfg, info)
    val_loader = eval_loader_for(cfg, resolve_data_root(cfg.data), info)
    normalize = DeviceNormalize(IMAGENET_MEAN, IMAGENET_STD, info.device, use_channels_last(cfg, info.device))
    result = evaluate(model, val_loader, info=info, normalize=normalize, amp_dtype=resolve_amp(cfg.amp, info.device))
    if info.is_main:
        print(f"eval {cfg.weights}: top1 {result.top1:.3f}  top5 {result.top5:.3f}  loss {result.loss:.4f}  "
              f"images {result.count}", flush=True)
    return EXIT_OK


def train(cfg: Config, info: DistInfo, stop: StopRequest) -> int:
    # --- run folder and logs: rank 0 writes, every rank reads the same folder
    run_dir = cfg.run_dir()
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier(info)
    log = RunLog(run_dir, info.is_main)
    restart_count = int(os.environ.get("SLURM_RESTART_COUNT") or os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
    configure_backends(cfg, info.device)
    seed_all(cfg.seed)  # the same on every rank, so every rank builds the same initial weights

    # --- data
    root = resolve_data_root(cfg.data)
    train_loader = build_train_loader(root, image_size=cfg.image_size, batch_size=cfg.batch_size,
                                      workers=workers_for(cfg, info),
                                      rank=info.rank, world_size=info.world_size, seed=cfg.seed,
                                      auto_augment=cfg.auto_augment, random_erasing=cfg.random_erasing,
                                      pin_memory=pin_memory(cfg, info), decode=cfg.decode, device=info.device)
    val_loader = eval_loader_for(cfg, root, info)
    steps_per_epoch = len(train_loader) // cfg.accum_steps
    num_classes = cfg.num_classes or train_loader.num_classes
    check_data_fits(cfg, train_loader, steps_per_epoch, num_classes)

    # --- model, optimizer, learning-rate schedule (lr scaled linearly to the global batch)
    model = densenet.create_model(cfg.arch, num_classes=num_classes, memory_efficient=cfg.memory_efficient,
                                  drop_rate=cfg.drop_rate)
    model = prepare_model(model, cfg, info)
    global_batch = cfg.batch_size * info.world_size * cfg.accum_steps
    lr = peak_lr(cfg, global_batch)
    optimizer = build_optimizer(model, cfg, lr)
    schedule = LRSchedule.from_config(cfg, lr, steps_per_epoch)
    derived = {"world_size": info.world_size, "global_batch_size": global_batch, "peak_lr": lr,
               "steps_per_epoch": steps_per_epoch, "num_classes": num_classes}

    # --- resume: rank 0 picks the file, every rank loads it (each needs its own RNG state)
    ckpt = load_resume_checkpoint(cfg, run_dir, info, log)
    if ckpt:
        check_fits(ckpt, cfg.arch, num_classes)
    progress = Progress(world_size=info.world_size, batch_size=cfg.batch_size, accum_steps=cfg.accum_steps)
    wandb = start_wandb(mode=cfg.wandb, project=cfg.wandb_project, entity=cfg.wandb_entity, name=cfg.wandb_name,
                        tags=cfg.wandb_tags, config={**config_to_dict(cfg), **derived}, run_dir=run_dir,
                        run_id=ckpt.get("wandb_run_id") if ckpt else None, is_main=info.is_main, report=log.print)
    trainer = Trainer(model, optimizer, schedule, cfg, info, num_classes=num_classes, mean=IMAGENET_MEAN,
                      std=IMAGENET_STD, log=log, wandb=wandb)
    if ckpt:
        trainer.load_state_dict(ckpt, report=log.print)
        progress = resume_progress(ckpt, cfg, info, log)
        for change in config_changes(ckpt["config"], cfg):
            log.print(f"config changed since the checkpoint: {change}")
        if cfg.weights:
            log.print(f"note: resuming, so --weights {cfg.weights} is not used (pass --no-resume to start from it)")
        log.record("event", epoch=progress.epoch + 1, step=progress.global_step, event="resumed",
                   from_step=progress.global_step, restart_count=restart_count, checkpoint=ckpt["_path"])
    else:
        seed_all(cfg.seed + 1000 * info.rank)  # dropout and mixup differ per rank from here on
        if cfg.weights:
            load_initial_weights(model, cfg.weights, log)
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
            log.print(f"saved {', '.join(p.name for p in written)} (epoch {progress.epoch}, "
                      f"batch {progress.batch_in_epoch}, step {progress.global_step})")
        barrier(info)  # nobody moves on (or exits) before the files are complete

    # --- the epoch loop
    def finished() -> bool:
        return progress.epoch >= cfg.epochs or (cfg.max_steps is not None and progress.global_step >= cfg.max_steps)

    if finished():
        log.print(f"nothing to do: the run is complete (epoch {progress.epoch}, step {progress.global_step})")
    while not finished():
        stats = trainer.train_epoch(train_loader, progress, stop, on_checkpoint=lambda: save(epoch_end=False))
        if stats.end is EpochEnd.NONFINITE:
            return stop_nonfinite(progress, stats.extra["step"], stats.extra["step_loss"], run_dir, log, wandb)
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
        report_epoch(metrics, epoch_number, epoch_done, progress, cfg, log)
        wandb.log({f"epoch/{k}": v for k, v in metrics.items()} | {"epoch": epochs_float}, step=progress.global_step)
        save(epoch_end=epoch_done, is_best=is_best)
        # A signal that arrived during evaluation may have reached only some ranks: agree first.
        signum = int(all_reduce(torch.tensor([float(stop.signum or 0)], device=info.device), info, op="max").item())
        if signum:
            return exit_interrupted(signum, stop, log, wandb, progress)
    wandb.finish(EXIT_OK)  # before the last line, so that wandb's closing notes do not bury it
    log.print(f"finished: best val top1 {progress.best_top1:.2f} at epoch {progress.best_epoch}; "
              f"run folder {run_dir}")
    log.close()
    return EXIT_OK


def check_data_fits(cfg: Config, train_loader: Any, steps_per_epoch: int, num_classes: int) -> None:
    if steps_per_epoch == 0:
        raise ConfigError(f"batch_size: {len(train_loader)} batches per process per epoch is fewer than "
                          f"accum_steps={cfg.accum_steps}; use a smaller --batch-size or --accum-steps")
    if num_classes < train_loader.num_classes:
        raise ConfigError(f"num_classes: {num_classes} is fewer than the {train_loader.num_classes} classes of "
                          "the training data; drop --num-classes to use the data's")


def describe_run(cfg: Config, info: DistInfo, log: RunLog, model: torch.nn.Module, trainer: Trainer,
                 train_loader: Any, val_loader: Any, derived: Dict[str, Any], restart_count: int) -> None:
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    log.print(f"{cfg.arch} ({n_params:.2f}M parameters, {derived['num_classes']} classes) on {info.world_size} x "
              f"{info.device.type} ({info.launcher}, {info.backend or 'no process group'}); "
              f"run folder {cfg.run_dir()}; restart count {restart_count}")
    processes = f"{info.world_size} process" + ("es" if info.world_size > 1 else "")
    log.print(f"batch {cfg.batch_size} per process x {processes} x {cfg.accum_steps} accumulated = "
              f"{derived['global_batch_size']} global; peak lr {derived['peak_lr']:.4g}; "
              f"amp {trainer.amp_dtype or 'off'}; channels_last {use_channels_last(cfg, info.device)}; "
              f"compile {cfg.compile_backend if cfg.compile else 'off'}; "
              f"optimizer kernels {kernels_in_use(trainer.optimizer)}; "
              f"{train_loader.num_samples} train / {val_loader.num_samples} val images, decoded by "
              f"{'the loader workers' if cfg.decode == 'cpu' else info.device.type}; "
              f"{derived['steps_per_epoch']} steps per epoch")


def report_epoch(metrics: Dict[str, float], epoch_number: int, epoch_done: bool, progress: Progress, cfg: Config,
                 log: RunLog) -> None:
    ema = f"  ema top1 {metrics['val_ema_top1']:.2f}" if "val_ema_top1" in metrics else ""
    log.print(f"epoch {epoch_number}/{cfg.epochs} {'done' if epoch_done else 'stopped'} "
              f"(step {progress.global_step}): train loss {metrics['train_loss']:.4f}  "
              f"val top1 {metrics['val_top1']:.2f}  top5 {metrics['val_top5']:.2f}  loss {metrics['val_loss']:.4f} "
              f"on {metrics['val_count']} images{ema}  best {progress.best_top1:.2f}  "
              f"bad samples {metrics['bad_samples']}  {metrics['epoch_time_s']:.0f}s")
    log.record("eval", epoch=epoch_number, step=progress.global_step,
               **{k[4:]: v for k, v in metrics.items() if k.startswith("val_")})
    log.record("epoch", epoch=epoch_number, step=progress.global_step, epoch_complete=epoch_done,
               best_top1=progress.best_top1, **metrics)


def load_resume_checkpoint(cfg: Config, run_dir: Path, info: DistInfo, log: RunLog) -> Optional[Dict[str, Any]]:
    choice: Any = None  # rank 0's decision, sent to every rank: a path, None, or the refusal
    if info.is_main:
        try:
            found = choose_resume(run_dir, cfg.resume, log.print)
            choice = str(found) if found else None
        except CheckpointError as e:
            choice = e
    choice = broadcast_object(choice, info)
    if isinstance(choice, CheckpointError):
        raise choice
    if choice is None:
        return None
    ckpt = load_checkpoint(Path(choice))
    ckpt["_path"] = choice
    return ckpt


def resume_progress(ckpt: Dict[str, Any], cfg: Config, info: DistInfo, log: RunLog) -> Progress:
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
    log.print(f"resumed from {ckpt['_path']}: epoch {progress.epoch + 1}, batch {progress.batch_in_epoch}, "
              f"step {progress.global_step}, best top1 {progress.best_top1:.2f}")
    return progress


def load_initial_weights(model: torch.nn.Module, path: str, log: RunLog) -> None:
    """--weights when training: start from them; a classifier of another size is left freshly initialised."""
    weights = densenet.load_state_dict_file(path)
    own = model.state_dict()
    skipped = [k for k, v in weights.items() if k in own and v.shape != own[k].shape]
    model.load_state_dict({k: v for k, v in weights.items() if k not in skipped}, strict=not skipped)
    note = f" (not loaded, shapes differ: {', '.join(skipped)})" if skipped else ""
    log.print(f"initial weights from {path}{note}")


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
    code = main()
    if code in (EXIT_OK, EXIT_INTERRUPTED, EXIT_NONFINITE):
        # The run has closed its logs, W&B run and checkpoints: leave without the interpreter's
        # teardown, in which torch's C++ runtime now and then aborts after a completed run.
        exit_without_teardown(code)
    sys.exit(code)
