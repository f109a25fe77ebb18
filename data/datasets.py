"""Map-style datasets over a ``SampleTable``: a key in, (pixels, target, bad files) out.

A file that cannot be decoded never reaches the training step and never kills a worker: the sample
is replaced by another one (chosen from the sample's own random key for training, the next index
for evaluation), and the unreadable paths travel with the batch so that the main process can log
each once and flag the sample as ``bad``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .decode import UnreadableImage
from .layouts import SampleTable
from .rng import SAMPLE, key_generator
from .transforms import EvalTransform, TrainTransform

if TYPE_CHECKING:
    from .device_decode import EncodedTrainTransform

MAX_REPLACEMENTS = 16


class Sample(NamedTuple):
    pixels: np.ndarray  # 3xHxW uint8; with decode="device", an EncodedCrop for the device to decode
    target: int
    unreadable: tuple[tuple[str, str], ...]  # (path, reason) of files replaced on the way


def too_many_unreadable(failures: list[tuple[str, str]]) -> RuntimeError:
    shown = "; ".join(f"{p} ({r})" for p, r in failures[:4])
    return RuntimeError(f"{len(failures)} unreadable images in a row ({shown}); the dataset looks "
                        "broken (wrong folder, unfinished copy or unmounted filesystem?)")


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
        failures: list[tuple[str, str]] = []
        while len(failures) < MAX_REPLACEMENTS:
            path = self.table.path(index)
            try:
                # The replacement keeps its own label; the ``bad`` flag lets the metrics leave it out.
                return Sample(self.transform(path, path), int(self.table.targets[index]), tuple(failures))
            except UnreadableImage as err:
                failures.append((err.path, err.reason))
                index = (index + 1) % len(self.table)
        raise too_many_unreadable(failures)
