"""Map-style datasets over a ``SampleTable``: a key in, (pixels, target, bad files) out.

A file that cannot be decoded never kills a worker, and the unreadable paths travel with the batch
so that the main process can report each once; the sample is flagged ``bad``. In training it is
replaced by another one (chosen from the sample's own random key), so every batch stays full. In
evaluation it is not: a replacement would count some other image twice, so the sample stays a
blank placeholder (``UNREADABLE_TARGET``) that the metrics leave out and count as unreadable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .decode import UnreadableImage
from .layouts import DataLayoutError, SampleTable
from .rng import SAMPLE, key_generator
from .transforms import EvalTransform, TrainTransform

if TYPE_CHECKING:
    from .device_decode import EncodedTrainTransform

MAX_REPLACEMENTS = 16
# The target of an evaluation placeholder: not a class, so a loss handed one by mistake raises.
UNREADABLE_TARGET = -1


class Sample(NamedTuple):
    pixels: np.ndarray  # 3xHxW uint8; with decode="device", an EncodedCrop for the device to decode
    target: int
    unreadable: tuple[tuple[str, str], ...]  # (path, reason): files replaced on the way, or a placeholder's own


class TooManyUnreadable(DataLayoutError):
    """MAX_REPLACEMENTS unreadable files in a row: the data, not one file, is broken."""


def too_many_unreadable(failures: list[tuple[str, str]]) -> TooManyUnreadable:
    shown = "; ".join(f"{p} ({r})" for p, r in failures[:2])
    return TooManyUnreadable(f"{len(failures)} unreadable images in a row, e.g. {shown}; the dataset looks "
                             "broken (wrong folder, unfinished copy or unmounted filesystem?)")


def unreadable_placeholder(transform: EvalTransform, err: UnreadableImage) -> Sample:
    """The evaluation sample of an unreadable file: blank pixels of the batch's shape, flagged."""
    pixels = np.zeros((3, transform.size, transform.size), dtype=np.uint8)
    return Sample(pixels, UNREADABLE_TARGET, ((err.path, err.reason),))


class TrainFolderDataset(Dataset):
    """Key (epoch, index): the crop, flip and augmentation come from a generator seeded by
    (seed, epoch, index), so the sample's pixels do not depend on which worker made them."""

    def __init__(self, table: SampleTable, transform: TrainTransform | EncodedTrainTransform, seed: int):
        self.table = table
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, key: tuple[int, int]) -> Sample:
        epoch, index = key
        generator = key_generator(SAMPLE, self.seed, epoch, index)
        failures: list[tuple[str, str]] = []
        while len(failures) < MAX_REPLACEMENTS:
            path = self.table.path(index)
            try:
                pixels = self.transform(path, path, generator)
                return Sample(pixels, int(self.table.targets[index]), tuple(failures))
            except UnreadableImage as err:
                failures.append((err.path, err.reason))
                index = int(torch.randint(len(self.table), (1,), generator=generator))
        raise too_many_unreadable(failures)


class EvalFolderDataset(Dataset):
    def __init__(self, table: SampleTable, transform: EvalTransform):
        self.table = table
        self.transform = transform

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> Sample:
        path = self.table.path(index)
        try:
            return Sample(self.transform(path, path), int(self.table.targets[index]), ())
        except UnreadableImage as err:
            return unreadable_placeholder(self.transform, err)
