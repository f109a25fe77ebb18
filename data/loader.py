"""The two loaders the trainer uses: ``build_train_loader`` and ``build_eval_loader``.

Both yield ``(images, targets, bad)``: images uint8 [B, 3, H, W] (contiguous NCHW; normalise on the
device with IMAGENET_MEAN/STD), targets int64 [B], bad bool [B] (True where a file was unreadable:
in training the sample is another one that replaced it, in evaluation a blank placeholder with
target -1 that the metrics must leave out). Layout problems are raised here, before any worker starts.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from .classes import class_names
from .datasets import EvalFolderDataset, TrainFolderDataset
from .device_decode import (DecodeAhead, DeviceDecoder, EncodedTrainTransform, check_decode_on, collate_encoded,
                            resolve_device)
from .index import Source, read_source
from .layouts import DataLayoutError, SampleTable
from .rng import WORKERS, key_seed
from .sample import Sample
from .samplers import EvalBatchSampler, RepeatAugBatchSampler, TrainBatchSampler
from .shard_stream import ShardEpoch, ShardEvalStream, ShardTrainStream
from .shard_index import ShardIndex
from .transforms import EvalTransform, TrainTransform

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def collate(samples: Sequence[Sample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
    images = torch.from_numpy(np.stack([s.pixels for s in samples]))
    targets = torch.tensor([s.target for s in samples], dtype=torch.int64)
    bad = torch.tensor([bool(s.unreadable) for s in samples], dtype=torch.bool)
    unreadable = [report for s in samples for report in s.unreadable]
    return images, targets, bad, unreadable


def _one_line(text: str) -> str:
    """A tab or line break inside a path or a complaint would break the list's line format."""
    return text.replace("\t", " ").replace("\n", " ").replace("\r", " ")


class UnreadableList:
    """A run's list of unreadable files, ``path<TAB>reason`` a line, each path once over all ranks
    and all attempts (resumes) of the run.

    Every rank appends the files it meets itself, so the loader needs no collective: ranks read
    different files and, in evaluation, different numbers of batches, so no batch is one that every
    rank reaches (gathering at rank 0 would need the trainer to call in at such a point). Each line
    is one ``os.write`` to an ``O_APPEND`` descriptor, which the kernel puts at the end of the file
    whole, so lines of several ranks never interleave (on a node's own disks, Lustre and GPFS; NFS
    does not make O_APPEND atomic across hosts). Before a path is added the lines written since the
    last look are read, so a path that another rank or an earlier attempt listed is not repeated; two
    ranks that meet the same new file at the same instant may still both list it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.listed: set[str] = set()
        self._read_upto = 0  # bytes of the file already in ``listed``

    def add(self, path: str, reason: str) -> bool:
        """List ``path`` unless it is listed already; True if this call listed it."""
        path = _one_line(path)
        self._catch_up()
        if path in self.listed:
            return False
        self.listed.add(path)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, os.fsencode(f"{path}\t{_one_line(reason)}\n"))
        finally:
            os.close(fd)
        return True

    def _catch_up(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._read_upto)
                new = f.read()
        except FileNotFoundError:
            return
        new = new[:new.rfind(b"\n") + 1]  # a line still being written is read next time
        self._read_upto += len(new)
        self.listed.update(os.fsdecode(line.split(b"\t", 1)[0]) for line in new.splitlines())


class UnreadableFiles:
    """Reports each unreadable file once, with its path and the decoder's complaint: by default a
    warning per process; with a ``listing``, a line in it, and a warning only when the line is added."""

    def __init__(self, fate: str) -> None:
        self.fate = fate  # what became of the sample, for the warning
        self.seen: set[str] = set()
        self.listing: UnreadableList | None = None

    def report(self, path: str, reason: str) -> None:
        if path in self.seen:
            return
        self.seen.add(path)
        if self.listing is None:
            log.warning("unreadable image %s: %s (%s)", self.fate, path, reason)
        elif self.listing.add(path, reason):
            log.warning("unreadable image %s: %s (%s); listed in %s", self.fate, path, reason, self.listing.path)


@dataclass(frozen=True)
class LoaderOptions:
    """The settings few callers change, for either factory.

    ``split``: the split to read (default: ``"train"`` for the training loader, ``"val"`` for the
    evaluation loader). ``prefetch_factor``: batches each worker keeps ready. ``multiprocessing_context``:
    how the workers start (DataLoader's; default: the platform's). ``shuffle_buffer``: samples a
    training worker shuffles among when it streams shards."""

    split: str | None = None
    prefetch_factor: int = 4
    multiprocessing_context: Any = None
    shuffle_buffer: int = 2000


def _check_args(transform, expected: type, batch_size: int, workers: int) -> None:
    if not isinstance(transform, expected):
        raise TypeError(f"transform must be a data.transforms.{expected.__name__}, got {type(transform).__name__}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")


def _source_of(data: Source | str | os.PathLike, split: str | None, default_split: str) -> Source:
    """An index made already (data.index: once per job), or the index of ``data``'s split, read now."""
    if isinstance(data, (SampleTable, ShardIndex)):
        return data
    return read_source(data, split or default_split)


def _already_batched(batch):
    return batch


# The training process's stop signals (densenet/training/signals.py). Launchers send them to every process
# they can reach: torchrun to each rank's whole process group, SLURM to every process of the step.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def _ignore_stop_signals(worker_id: int) -> None:
    """A loader worker's first act: ignore the stop signals. The training process handles them and
    shuts its workers down when it is done; a worker that died of SIGTERM (torch's own handler lets
    only the parent's SIGTERM end a worker quietly) would make the training process raise "DataLoader
    worker is killed by signal" in the middle of its step, before it could save its checkpoint. A
    worker whose training process is gone ends by itself (torch's watchdog, within seconds)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _dataloader(dataset, options: LoaderOptions, *, workers: int, pin_memory: bool, seed: int, rank: int,
                batch_sampler=None, collate_fn: Callable = collate) -> DataLoader:
    """A map-style dataset with our batch sampler, or (batch_sampler None) an iterable dataset whose
    workers yield whole collated batches."""
    extra = {}
    if workers > 0:
        extra = dict(persistent_workers=True, prefetch_factor=options.prefetch_factor,
                     multiprocessing_context=options.multiprocessing_context)
    # An explicit generator seeds the workers reproducibly (torch, random and numpy per worker) and
    # keeps DataLoader from drawing its base seed from the training process's global RNG.
    generator = torch.Generator()
    generator.manual_seed(key_seed(WORKERS, seed, rank))
    if batch_sampler is not None:
        extra.update(batch_sampler=batch_sampler, collate_fn=collate_fn)
    else:
        extra.update(batch_size=None, collate_fn=_already_batched)
    return DataLoader(dataset, num_workers=workers, pin_memory=pin_memory and torch.cuda.is_available(),
                      generator=generator, worker_init_fn=_ignore_stop_signals if workers > 0 else None, **extra)


class _Loader:
    """What both loaders share: class metadata and the bad-file bookkeeping of the main process.
    ``decoder``, if given, turns each worker batch into its final form on the device, a few batches
    ahead of the consumer (``DecodeAhead``)."""

    unreadable_fate: str  # what becomes of an unreadable file's sample, said in its warning

    def __init__(self, dataloader: DataLoader, classes: Sequence[str], num_batches: int,
                 decoder: DeviceDecoder | None = None):
        self.dataloader = dataloader
        self.classes = list(classes)
        self.class_names = class_names(self.classes)
        self.num_classes = len(self.classes)
        self.num_batches = num_batches
        self.unreadable = UnreadableFiles(self.unreadable_fate)
        self.decoder = decoder

    def __len__(self) -> int:
        return self.num_batches

    def record_unreadable_to(self, path: str | os.PathLike) -> None:
        """From now on, list each unreadable file this loader meets in the file ``path`` (the run
        folder's ``unreadable.txt``) once per run, instead of warning about it in every process;
        the console still gets one line when a file is first listed. See ``UnreadableList``."""
        self.unreadable.listing = UnreadableList(Path(path))

    def _batches(self) -> Iterator[Batch]:
        batches = iter(self.dataloader)
        if self.decoder is not None:
            batches = DecodeAhead(batches, self.decoder)
        try:
            for images, targets, bad, unreadable in batches:
                for path, reason in unreadable:
                    self.unreadable.report(path, reason)
                yield images, targets, bad
        except DataLayoutError as e:  # TooManyUnreadable, or a shard stream's slot that found nothing
            # From a worker it comes back as the text of the worker's traceback, whose last line
            # is the one-line message: say that line, not the worker's traceback.
            lines = str(e).strip().splitlines()
            if len(lines) > 1:
                raise type(e)(lines[-1].split(f"{type(e).__name__}: ", 1)[-1]) from None
            raise
        finally:  # an epoch left early stops its decode thread before the next one starts
            if isinstance(batches, DecodeAhead):
                batches.close()


class TrainLoader(_Loader):
    """Batches of one epoch on this rank. ``set_epoch(epoch, start_batch)`` before each pass. From
    folders the batches are a pure function of (seed, epoch, batch index), whatever ``workers`` is;
    from shards also of the worker count and world size (see data/shard_stream.py). With
    ``decode_on`` set, ``decoder`` is the ``DeviceDecoder`` (its ``counts`` say where images were
    decoded) and the images arrive on its device. ``rank_samples``: the samples this rank draws per
    epoch before they are cut into batches; ``aug_repeats``: the copies of each image in an epoch's
    stream (1: none)."""

    unreadable_fate = "replaced by another sample"

    def __init__(self, dataloader: DataLoader, sampler, classes: Sequence[str], num_samples: int,
                 batch_size: int, transform: TrainTransform, decoder: DeviceDecoder | None = None, *,
                 rank_samples: int, aug_repeats: int = 1):
        super().__init__(dataloader, classes, len(sampler), decoder)
        self.sampler = sampler
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.transform = transform
        self.rank_samples = rank_samples
        self.aug_repeats = aug_repeats

    def size_at(self, epoch: int) -> int:
        """The image size of epoch ``epoch``'s batches (it changes between epochs with progressive resizing)."""
        return self.transform.size_at(epoch)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch)

    def __iter__(self) -> Iterator[Batch]:
        return self._batches()


class EvalLoader(_Loader):
    """This rank's share of the validation set; over all ranks every image comes exactly once.
    ``num_samples`` counts all ranks, ``rank_num_samples`` this one; unreadable files among them
    come as placeholders flagged ``bad`` (target -1), to be left out of the metrics and counted."""

    unreadable_fate = "left out of the evaluation"

    def __init__(self, dataloader: DataLoader, classes: Sequence[str], num_samples: int,
                 rank_num_samples: int, num_batches: int):
        super().__init__(dataloader, classes, num_batches)
        self.num_samples = num_samples
        self.rank_num_samples = rank_num_samples

    def __iter__(self) -> Iterator[Batch]:
        return self._batches()


def build_train_loader(
    data: Source | str | os.PathLike,
    transform: TrainTransform,
    *,
    batch_size: int,
    workers: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    pin_memory: bool = False,
    decode_on: torch.device | str | None = None,
    aug_repeats: int = 1,
    options: LoaderOptions | None = None,
) -> TrainLoader:
    """The training loader for a dataset folder (any layout ``data.layouts`` reads) or a folder of
    tar shards, ours or WebDataset's (see docs/data.md; streamed through ``options.shuffle_buffer``).
    ``data`` is the folder as ``resolve_data_root`` returns it (not resolved again), or its split's
    index made already (``data.index``; then ``options.split`` is not used).

        build_train_loader(root, TrainTransform(224, auto_augment="rand-m9-mstd0.5"), batch_size=64,
                           workers=8, rank=rank, world_size=world_size, seed=0, pin_memory=True,
                           decode_on=None, options=LoaderOptions(split="train"))

    ``transform`` (a ``TrainTransform``: size, crop scale, interpolation, augmentation, random
    erasing, resize backend) makes each sample; each rank's batches hold ``batch_size`` of them.
    ``decode_on=None``: the workers decode, crop and resize; images arrive as CPU tensors.
    ``decode_on=`` a device (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a ``torch.device``, or ``"auto"``
    for the current CUDA device, else the CPU): the workers only read the files and draw the crops,
    that device decodes and resizes each batch, and the images arrive there (see
    data/device_decode.py). ``aug_repeats=R`` > 1: repeated augmentation, each image R times per
    epoch, differently augmented, on R different ranks (``RepeatAugBatchSampler``: DeiT's and timm's
    sampling and epoch length; folders only). ``options``: ``LoaderOptions``, the settings few
    callers change."""
    options = options or LoaderOptions()
    _check_args(transform, TrainTransform, batch_size, workers)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if isinstance(aug_repeats, bool) or not isinstance(aug_repeats, int) or aug_repeats < 1:
        raise ValueError(f"aug_repeats must be an integer >= 1 (1: no repeats), got {aug_repeats!r}")
    check_decode_on(decode_on)
    worker_transform, collate_fn = transform, collate
    if decode_on is not None:
        worker_transform, collate_fn = EncodedTrainTransform(transform), collate_encoded
    source = _source_of(data, options.split, "train")
    workers_on = dict(workers=workers, pin_memory=pin_memory, seed=seed, rank=rank)
    if isinstance(source, ShardIndex):
        if aug_repeats > 1:
            raise ValueError(f"aug_repeats: repeated augmentation ({aug_repeats}) needs an image folder; tar "
                             f"shards are streamed in their own order, so their copies of an image cannot be "
                             f"dealt to different ranks; use --aug-repeats 1 or train from the unpacked folder")
        epoch = ShardEpoch(source.num_samples // (batch_size * world_size))
        if len(epoch) == 0:
            raise ValueError(f"{source.num_samples} training samples are fewer than one global batch "
                             f"({world_size} ranks x {batch_size}); lower the batch size or add data")
        stream = ShardTrainStream(source, worker_transform, batch_size=batch_size, rank=rank,
                                  world_size=world_size, seed=seed, shuffle_buffer=options.shuffle_buffer,
                                  epoch=epoch, collate=collate_fn)
        dataloader = _dataloader(stream, options, **workers_on)
        sampler, num_samples, rank_samples = epoch, source.num_samples, source.num_samples // world_size
    else:
        if aug_repeats > 1:
            sampler = RepeatAugBatchSampler(len(source), batch_size, rank, world_size, seed, aug_repeats)
            rank_samples = sampler.rank_samples
        else:
            sampler = TrainBatchSampler(len(source), batch_size, rank, world_size, seed)
            rank_samples = len(source) // world_size
        dataloader = _dataloader(TrainFolderDataset(source, worker_transform, seed), options, batch_sampler=sampler,
                                 collate_fn=collate_fn, **workers_on)
        num_samples = len(source)
    # Built after the layout checks and before any worker starts: a device that cannot decode fails here.
    decoder = None if decode_on is None else DeviceDecoder(transform, resolve_device(decode_on))
    return TrainLoader(dataloader, sampler, source.classes, num_samples, batch_size, transform, decoder,
                       rank_samples=rank_samples, aug_repeats=aug_repeats)


def build_eval_loader(
    data: Source | str | os.PathLike,
    transform: EvalTransform,
    *,
    batch_size: int,
    workers: int,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    options: LoaderOptions | None = None,
) -> EvalLoader:
    """The evaluation loader: every image of ``ROOT/<split>`` (or of its shards) once over all ranks,
    made by ``transform`` (an ``EvalTransform``: resize the shorter side, center crop; its resize
    defaults to floor(size / 0.875)). ``data``: the folder as ``resolve_data_root`` returns it, or
    its split's index made already (``data.index``). ``options``: ``LoaderOptions``, the settings few callers change (``split`` defaults to "val").

        build_eval_loader(root, EvalTransform(224), batch_size=100, workers=8, rank=rank,
                          world_size=world_size, pin_memory=True, options=LoaderOptions(split="val"))"""
    options = options or LoaderOptions()
    _check_args(transform, EvalTransform, batch_size, workers)
    source = _source_of(data, options.split, "val")
    workers_on = dict(workers=workers, pin_memory=pin_memory, seed=0, rank=rank)
    if isinstance(source, ShardIndex):
        stream = ShardEvalStream(source, transform, batch_size=batch_size, rank=rank, world_size=world_size,
                                 collate=collate)
        counts = stream.rank_counts(workers)
        num_batches = sum(-(-count // batch_size) for count in counts)
        return EvalLoader(_dataloader(stream, options, **workers_on), source.classes, source.num_samples,
                          sum(counts), num_batches)
    sampler = EvalBatchSampler(len(source), batch_size, rank, world_size)
    dataloader = _dataloader(EvalFolderDataset(source, transform), options, batch_sampler=sampler, **workers_on)
    return EvalLoader(dataloader, source.classes, len(source), len(sampler.indices), len(sampler))
