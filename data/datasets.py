"""Map-style datasets over a ``SampleTable``: a key in, (pixels, target, bad files) out.

A file that cannot be decoded never kills a worker, and the unreadable paths travel with the batch
so that the main process can report each once; the sample is flagged ``bad``. In training it is
replaced by another one (chosen from the sample's own random key), so every batch stays full. In
evaluation it is not: a replacement would count some other image twice, so the sample stays a
blank placeholder (``UNREADABLE_TARGET``) that the metrics leave out and count as unreadable. The
rules, the ``Sample`` tuple and the transforms' call signatures are in data/sample.py.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from .decode import UnreadableImage
from .layouts import SampleTable
from .rng import SAMPLE, key_generator
from .sample import (MAX_REPLACEMENTS, EvalSampleTransform, Sample, TrainSampleTransform, too_many_unreadable,
                     unreadable_placeholder)


class TrainFolderDataset(Dataset):
    """Key (epoch, index): the crop, flip and augmentation come from a generator seeded by
    (seed, epoch, index), so the sample's pixels do not depend on which worker made them.

    Key (epoch, index, copy), from repeated augmentation: copy c > 0 of an index seeds its generator
    with (seed, epoch, index, c), so the copies of one image in one epoch are augmented differently;
    copy 0 is the sample (epoch, index)."""

    def __init__(self, table: SampleTable, transform: TrainSampleTransform, seed: int):
        self.table = table
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, key: tuple[int, ...]) -> Sample:
        epoch, index, copy = (*key, 0) if len(key) == 2 else key
        generator = key_generator(SAMPLE, self.seed, epoch, index, *((copy,) if copy else ()))
        transform = self.transform.at_epoch(epoch)
        failures: list[tuple[str, str]] = []
        while len(failures) < MAX_REPLACEMENTS:
            path = self.table.path(index)
            try:
                pixels = transform(path, path, generator)
                return Sample(pixels, int(self.table.targets[index]), tuple(failures))
            except UnreadableImage as err:
                failures.append((err.path, err.reason))
                index = int(torch.randint(len(self.table), (1,), generator=generator))
        raise too_many_unreadable(failures)


class EvalFolderDataset(Dataset):
    def __init__(self, table: SampleTable, transform: EvalSampleTransform):
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
