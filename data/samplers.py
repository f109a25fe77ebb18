"""Which samples each rank reads, batch by batch.

Training: one permutation of the whole dataset per epoch, a pure function of (seed, epoch). Global
batch g is permutation[g*W*B : (g+1)*W*B] and rank r takes the r-th slice of B of it, so every rank
gets the same number of full batches (the incomplete tail is dropped, as with drop_last) and the
batches do not depend on the number of workers. ``set_epoch(epoch, start_batch)`` starts the next
pass at any batch, which is how a run resumes mid-epoch.

Repeated augmentation (``RepeatAugBatchSampler``): the sampling of DeiT's RASampler and timm's
RepeatAugSampler, with our permutation. Each index comes R times in a row in the epoch's stream,
rank r takes positions r, r+W, r+2W, ... of it (so the copies of one image go to different ranks
when R <= W), and each rank's epoch is cut to about N / W samples as DeiT's is. The keys are
(epoch, index, copy): the dataset folds the copy number into the sample's random key, so the copies
of one image are augmented differently.

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


class _EpochBatches:
    """What both training samplers share: the layout, and the (epoch, start_batch) of the next pass."""

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, seed: int):
        check_rank(rank, world_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0
        self.start_batch = 0

    def __len__(self) -> int:
        raise NotImplementedError

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} is outside the epoch's {len(self)} batches")
        self.epoch = epoch
        self.start_batch = start_batch


class TrainBatchSampler(_EpochBatches):
    """Yields lists of (epoch, index) keys; the epoch travels with every index so that persistent
    workers, which hold their own copy of the dataset, know which epoch's randomness to use."""

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, seed: int):
        super().__init__(num_samples, batch_size, rank, world_size, seed)
        if num_samples < batch_size * world_size:
            raise ValueError(
                f"{num_samples} training images are fewer than one global batch "
                f"({world_size} ranks x {batch_size}); lower the batch size or add data")

    def __len__(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

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


# DeiT's RASampler keeps, per rank, floor(N // 256 * 256 / W) samples of an epoch (timm: selected_round).
REPEAT_AUG_ROUND = 256


def repeat_aug_rank_samples(num_samples: int, repeats: int, world_size: int) -> int:
    """Samples each rank draws per epoch under repeated augmentation, as DeiT and timm count them:
    floor((N // 256 * 256) / W), or ceil(N / W) for a dataset of fewer than 256 images (where the
    rounding would leave nothing), never more than the rank's share ceil(N * R / W) of the repeated
    stream. An epoch thus costs about as many samples as a plain one, and sees about N / R images."""
    if num_samples >= REPEAT_AUG_ROUND:
        selected = num_samples // REPEAT_AUG_ROUND * REPEAT_AUG_ROUND // world_size
    else:
        selected = -(-num_samples // world_size)
    return min(selected, -(-num_samples * repeats // world_size))


class RepeatAugBatchSampler(_EpochBatches):
    """Repeated augmentation: yields lists of (epoch, index, copy) keys, ``copy`` in [0, repeats)
    telling the copies of one index apart (copy 0 gets the same pixels as the plain sampler's
    (epoch, index)).

    The epoch's stream is the permutation of the N indices with each index repeated ``repeats``
    times in a row, padded by wrapping around to a multiple of W; rank r takes its positions r, r+W,
    r+2W, ..., the first ``repeat_aug_rank_samples`` of them, in batches of B (an incomplete last
    batch is dropped). Batch k of all ranks together is positions [k*W*B, (k+1)*W*B) of the stream.
    A padded position repeats an earlier index with a copy number of its own (>= repeats)."""

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, seed: int, repeats: int):
        super().__init__(num_samples, batch_size, rank, world_size, seed)
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        if num_samples < 1:
            raise ValueError("no training images")
        self.repeats = repeats
        self.rank_samples = repeat_aug_rank_samples(num_samples, repeats, world_size)
        if self.rank_samples < batch_size:
            raise ValueError(
                f"{num_samples} training images give each of {world_size} ranks {self.rank_samples} samples "
                f"per epoch with repeated augmentation, fewer than one batch of {batch_size}; lower the "
                f"batch size or add data")

    def __len__(self) -> int:
        return self.rank_samples // self.batch_size

    def stream_keys(self, order: torch.Tensor, positions: torch.Tensor) -> list[tuple[int, int]]:
        """(index, copy) at ``positions`` of the stream of the epoch whose permutation is ``order``."""
        repeated = self.num_samples * self.repeats
        wrapped = positions % repeated
        indices = order[wrapped // self.repeats]
        copies = wrapped % self.repeats + self.repeats * (positions // repeated)
        return list(zip(indices.tolist(), copies.tolist()))

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        epoch = self.epoch
        order = epoch_permutation(self.num_samples, self.seed, epoch)
        for batch in range(self.start_batch, len(self)):
            steps = torch.arange(batch * self.batch_size, (batch + 1) * self.batch_size)
            positions = self.rank + self.world_size * steps
            yield [(epoch, index, copy) for index, copy in self.stream_keys(order, positions)]


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
