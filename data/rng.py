"""Randomness as a pure function of where a sample sits, never of which process drew it.

Every random choice for a sample (its crop, flip, augmentation, replacement after a bad file)
comes from a generator seeded by a key such as (seed, epoch, index). The same key gives the same
pixels whatever the number of workers, the rank layout or the batch a run resumed at.
"""

from __future__ import annotations

import hashlib
import random
import struct
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch


# Purposes, the first element of every key, so that no two uses of the same seed collide.
PERMUTATION, SAMPLE, WORKERS, SHARD_ORDER, SHARD_STREAM, SHARD_SAMPLE = range(1, 7)


def key_seed(*key: int) -> int:
    """A well-mixed 64-bit seed from non-negative integers below 2**64: BLAKE2b of the key packed
    as fixed-width words (with its length, so that (a, b) and (a, b, 0) differ). A cryptographic
    hash is overkill for mixing but costs about a microsecond, a twentieth of numpy's SeedSequence."""
    try:
        packed = struct.pack(f"<Q{len(key)}Q", len(key), *key)
    except struct.error as err:
        raise ValueError(f"random key {key} must hold integers in [0, 2**64)") from err
    return int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), "little")


def key_generator(*key: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(key_seed(*key))
    return generator


def draw_seed(generator: torch.Generator) -> int:
    """A fresh 63-bit seed drawn from ``generator`` (for libraries that need one)."""
    return int(torch.randint(0, 2**63 - 1, (1,), generator=generator, dtype=torch.int64))


@contextmanager
def isolated_global_rng(seed: int) -> Iterator[None]:
    """Seed Python's, numpy's and torch's global CPU generators for the duration of the block and
    put their previous states back afterwards.

    timm's and torchvision's augmentation policies draw from the global generators; this makes
    them deterministic per sample without disturbing the caller (with workers=0 the caller is the
    training process itself, whose RNG state is part of a checkpoint). Only torch's CPU generator is
    touched: ``torch.manual_seed`` would also reseed every CUDA generator, and costs milliseconds on
    a CUDA build before CUDA is initialised."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    torch_state = torch.default_generator.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.default_generator.set_state(torch_state)
