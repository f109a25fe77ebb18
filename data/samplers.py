"""Which samples each rank reads, batch by batch.

Training: one permutation of the whole dataset per epoch, a pure function of (seed, epoch). Global
batch g is permutation[g*W*B : (g+1)*W*B] and rank r takes the r-th slice of B of it, so every rank
gets the same number of full batches (the incomplete tail is dropped, as with drop_last) and the
batches do not depend on the number of workers. ``set_epoch(epoch, start_batch)`` starts the next
pass at any batch, which is how a run resumes mid-epoch.

Evaluation: every index exactly once over all ranks, as contiguous, nearly equal ranges (no
padding with duplicates, unlike DistributedSampler); the last batch of a rank may be short.
"""

from __future__ import annotations

from typing import Iterator

import torch

from .rng import PERMUTATION, key_generator


def check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(num_samples, generator=key_generator(PERMUTATION, seed, epoch))


class TrainBatchSampler:
    """Yields lists of (epoch, index) keys; the epoch travels with every index so that persistent
    workers, which hold their own copy of the dataset, know which epoch's randomness to use."""

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, seed: int):
        check_rank(rank, world_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if num_samples < batch_size * world_size:
            raise ValueError(
                f"{num_samples} training images are fewer than one global batch "
                f"({world_size} ranks x {batch_size}); lower the batch size or add data")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0
        self.start_batch = 0

    def __len__(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} is outside the epoch's {len(self)} batches")
        self.epoch = epoch
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        # Iterating does not advance the epoch (DataLoader may call iter() more than once per pass);
        # like DistributedSampler, the caller sets it before every pass.
        epoch = self.epoch
        order = epoch_permutation(self.num_samples, self.seed, epoch)
        global_batch = self.batch_size * self.world_size
        offset = self.rank * self.batch_size
        for batch in range(self.start_batch, len(self)):
            start = batch * global_batch + offset
            yield [(epoch, i) for i in order[start:start + self.batch_size].tolist()]


def eval_range(num_samples: int, rank: int, world_size: int) -> range:
    """This rank's share of ``range(num_samples)``; the shares tile it exactly."""
    check_rank(rank, world_size)
    return range(rank * num_samples // world_size, (rank + 1) * num_samples // world_size)


class EvalBatchSampler:
    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.indices = eval_range(num_samples, rank, world_size)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(0, len(self.indices), self.batch_size):
            yield list(self.indices[start:start + self.batch_size])
