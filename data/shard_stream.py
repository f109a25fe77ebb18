"""Reading tar shards as a stream: split over reader slots (rank x worker), shuffled through a
buffer, with the same number of batches on every rank so that DDP never waits for a rank that ran
dry. What the order is, what a resume replays and what exactness it gives are described once, for
users, in docs/data.md ("Tar shards"); the code below is the reference for the details.
"""

from __future__ import annotations

import functools
import itertools
import os
import tarfile
from typing import Iterator, NamedTuple

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .decode import UnreadableImage
from .layouts import DataLayoutError
from .rng import SHARD_ORDER, SHARD_SAMPLE, SHARD_STREAM, key_generator
from .sample import (MAX_REPLACEMENTS, EvalSampleTransform, Sample, TrainSampleTransform, too_many_unreadable,
                     unreadable_placeholder)
from .samplers import check_rank
from .shard_index import IMAGE_SUFFIXES, ShardIndex, member_key


class RawSample(NamedTuple):
    name: str  # shard path and key, for messages
    image: bytes | None
    target: int | None


def iter_shard(path: str, reports: list[tuple[str, str]], expected: int | None = None) -> Iterator[RawSample]:
    """Samples of one tar shard in stored order; members sharing a key form a sample. A shard that
    ends early is reported: with a read error, or, when cut at a member boundary (which tar cannot
    tell from a proper end), by holding fewer samples than the index says."""
    key, image, target = None, None, None
    count = 0
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                sample_key, ext = member_key(member.name)
                if sample_key != key:
                    if key is not None:
                        count += 1
                        yield RawSample(f"{path}:{key}", image, target)
                    key, image, target = sample_key, None, None
                data = tar.extractfile(member).read()
                if ext.lower() in IMAGE_SUFFIXES:
                    image = data
                elif ext == "cls":
                    target = int(data)
    except (tarfile.TarError, OSError, ValueError) as err:
        reports.append((path, f"unreadable shard, rest skipped: {type(err).__name__}: {err}"))
        expected = None
    if key is not None:
        count += 1
        yield RawSample(f"{path}:{key}", image, target)
    if expected is not None and count < expected:
        reports.append((path, f"unreadable shard: {count} of its {expected} samples read; is it truncated?"))


class StreamBuffer:
    """The shuffle buffer over a sample stream. Its contents double as the pool replacements come from."""

    def __init__(self, stream: Iterator[RawSample], size: int, generator: torch.Generator):
        self.stream = stream
        self.size = max(1, size)
        self.generator = generator
        self.items: list[RawSample] = []

    def _pick(self, n: int) -> int:
        return int(torch.randint(n, (1,), generator=self.generator))

    def __iter__(self) -> Iterator[RawSample]:
        items = self.items
        for sample in self.stream:
            if len(items) < self.size:
                items.append(sample)
                continue
            j = self._pick(len(items))
            yield items[j]
            items[j] = sample
        while items:
            j = self._pick(len(items))
            items[j], items[-1] = items[-1], items[j]
            yield items.pop()


class PassBuffers:
    """Shuffle-buffered passes, one after another: a pass is drained before the next one is read,
    so a slot that needs a single pass sees every sample of it exactly once."""

    def __init__(self, passes: Iterator[Iterator[RawSample]], size: int, generator: torch.Generator):
        self.passes = passes
        self.size = size
        self.generator = generator
        self.items: list[RawSample] = []

    def __iter__(self) -> Iterator[RawSample]:
        for one_pass in self.passes:
            buffer = StreamBuffer(one_pass, self.size, self.generator)
            self.items = buffer.items
            yield from buffer


def random_buffered(items, generator: torch.Generator) -> Iterator[RawSample]:
    """Replacement candidates for training: random members of the shuffle buffer."""
    for _ in range(MAX_REPLACEMENTS):
        if not items:
            return
        yield items[int(torch.randint(len(items), (1,), generator=generator))]


def decode_sample(raw: RawSample, decode) -> Sample:
    if raw.image is None or raw.target is None:
        raise UnreadableImage(raw.name, "incomplete sample: no image or no .cls member")
    return Sample(decode(raw.image, raw.name), raw.target, ())


def decode_or_replace(raw: RawSample, decode, candidates, fallback: RawSample | None) -> tuple[Sample, RawSample]:
    """Decode ``raw``; if it is unreadable, decode replacements drawn from ``candidates`` (an
    iterator of buffered samples), then ``fallback``. Returns the sample and the raw one it came from."""
    failures: list[tuple[str, str]] = []
    for attempt in itertools.chain((raw,), candidates, (fallback,)):  # lazily: candidates draw randomness
        if attempt is None or len(failures) >= MAX_REPLACEMENTS:
            break
        try:
            sample = decode_sample(attempt, decode)
            return sample._replace(unreadable=tuple(failures)), attempt
        except UnreadableImage as err:
            failures.append((err.path, err.reason))
    raise too_many_unreadable(failures)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class ShardEpoch:
    """``set_epoch`` for a stream: the state lives in shared memory, so persistent workers (which
    hold their own copy of the dataset) read the new epoch when the next pass starts."""

    def __init__(self, num_batches: int):
        self.num_batches = num_batches
        self.state = torch.zeros(2, dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch {start_batch} is outside the epoch's {self.num_batches} batches")
        self.state[0] = epoch
        self.state[1] = start_batch


def slot_samples(index: ShardIndex, shard_order: list[int], slot: int, slots: int,
                 reports: list[tuple[str, str]]) -> Iterator[RawSample]:
    """One pass of a reader slot over its part of the shards: whole shards dealt round robin, or,
    with fewer shards than slots, every ``slots``-th sample of all of them."""
    dealt = len(shard_order) >= slots
    shards = shard_order[slot::slots] if dealt else shard_order
    stream = itertools.chain.from_iterable(iter_shard(index.path(s), reports, index.counts[s]) for s in shards)
    if not dealt:
        stream = itertools.islice(stream, slot, None, slots)
    found = False
    for sample in stream:
        found = True
        yield sample
    if not found:
        raise no_samples(index, [index.shards[s] for s in shards], slot, slots, reports)


def no_samples(index: ShardIndex, names: list[str], slot: int, slots: int,
               reports: list[tuple[str, str]]) -> DataLayoutError:
    """A slot that found nothing to read (its shards were readable when the loader was built)."""
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    said = "; ".join(f"{os.path.basename(path)}: {reason}" for path, reason in reports[-2:])
    return DataLayoutError(f"reader slot {slot} of {slots} (rank x worker) read no samples from its {index.split} "
                           f"shards in {index.shard_dir}: {shown} ({said or 'no sample in them'}); were they "
                           "changed or removed after the loader was built?")


class ShardTrainStream(IterableDataset):
    """Yields this worker's whole collated batches of the epoch set in ``epoch``."""

    def __init__(self, index: ShardIndex, transform: TrainSampleTransform, *, batch_size: int, rank: int,
                 world_size: int, seed: int, shuffle_buffer: int, epoch: ShardEpoch, collate):
        check_rank(rank, world_size)
        self.index = index
        self.transform = transform
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.epoch = epoch
        self.collate = collate

    @staticmethod
    def _decode(data: bytes, name: str, generator: torch.Generator, transform: TrainSampleTransform):
        return transform(data, name, generator)

    def _passes(self, epoch: int, slot: int, slots: int, reports) -> Iterator[Iterator[RawSample]]:
        """Passes over the slot's shards, each in a fresh shard order; as many as the epoch needs."""
        shard_count = len(self.index.shards)
        for pass_number in range(2**31):
            order = torch.randperm(shard_count, generator=key_generator(SHARD_ORDER, self.seed, epoch, pass_number))
            yield slot_samples(self.index, order.tolist(), slot, slots, reports)

    def __iter__(self) -> Iterator[tuple]:
        worker, workers = _worker()
        epoch, start_batch = (int(v) for v in self.epoch.state.tolist())
        # Worker i plays the role of the worker that owns batch start_batch + i in an uninterrupted
        # pass, because DataLoader's round robin always starts with worker 0.
        role = (worker + start_batch) % workers
        batches = range(role, len(self.epoch), workers)
        skip = sum(1 for b in batches if b < start_batch)
        slot, slots = self.rank * workers + role, self.world_size * workers
        reports: list[tuple[str, str]] = []
        buffer = PassBuffers(self._passes(epoch, slot, slots, reports), self.shuffle_buffer,
                             key_generator(SHARD_STREAM, self.seed, epoch, slot, slots))
        stream = iter(buffer)
        transform = self.transform.at_epoch(epoch)
        for _ in range(skip * self.batch_size):
            next(stream)
        position = skip * self.batch_size
        last_good: RawSample | None = None
        for _ in range(len(batches) - skip):
            samples = []
            for _ in range(self.batch_size):
                generator = key_generator(SHARD_SAMPLE, self.seed, epoch, slot, slots, position)
                position += 1
                raw = next(stream)
                decode = functools.partial(self._decode, generator=generator, transform=transform)
                candidates = random_buffered(buffer.items, generator)
                sample, last_good = decode_or_replace(raw, decode, candidates, last_good)
                samples.append(sample)
            batch = self.collate(samples)
            batch[3].extend(reports)
            reports.clear()
            yield batch


class ShardEvalStream(IterableDataset):
    """Yields this worker's batches of its shards in stored order; the last one may be short."""

    def __init__(self, index: ShardIndex, transform: EvalSampleTransform, *, batch_size: int, rank: int,
                 world_size: int, collate):
        check_rank(rank, world_size)
        self.index = index
        self.transform = transform
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.collate = collate

    def worker_shards(self, worker: int, workers: int) -> list[int]:
        slots = self.world_size * workers
        return list(range(len(self.index.shards)))[self.rank * workers + worker::slots]

    def rank_counts(self, workers: int) -> list[int]:
        """Samples per worker of this rank (workers=0 counts as one)."""
        workers = max(1, workers)
        return [sum(self.index.counts[s] for s in self.worker_shards(w, workers)) for w in range(workers)]

    def __iter__(self) -> Iterator[tuple]:
        worker, workers = _worker()
        reports: list[tuple[str, str]] = []
        samples: list[Sample] = []
        for shard in self.worker_shards(worker, workers):
            for sample in self._shard_samples(shard, reports):
                samples.append(sample)
                if len(samples) == self.batch_size:
                    yield self._batch(samples, reports)
                    samples = []
        if samples:
            yield self._batch(samples, reports)

    def _shard_samples(self, shard: int, reports: list[tuple[str, str]]) -> Iterator[Sample]:
        """Every sample the index lists for the shard: the ones it holds, then a placeholder for each
        one a truncated shard lost, carrying the shard's report (the last thing ``iter_shard`` says
        when it reads fewer samples than the index lists)."""
        path, expected = self.index.path(shard), self.index.counts[shard]
        shard_reports: list[tuple[str, str]] = []
        read = 0
        for raw in iter_shard(path, shard_reports, expected):
            read += 1
            yield self._decode(raw)
        reports.extend(shard_reports)
        for _ in range(expected - read):
            yield unreadable_placeholder(self.transform, UnreadableImage(*shard_reports[-1]))

    def _decode(self, raw: RawSample) -> Sample:
        try:
            return decode_sample(raw, self.transform)
        except UnreadableImage as err:
            return unreadable_placeholder(self.transform, err)

    def _batch(self, samples, reports):
        batch = self.collate(samples)
        batch[3].extend(reports)
        reports.clear()
        return batch
