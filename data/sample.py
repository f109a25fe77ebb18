"""What a sample is, and the rules every reader of files (folder datasets, shard streams, the
device-decode workers) shares.

* ``Sample``: (pixels, target, unreadable files) as a reader hands it to the collation.
* ``TrainSampleTransform`` / ``EvalSampleTransform``: how a reader calls its transform, one file at a
  time. Readers depend on these call signatures, not on the concrete transforms (``TrainTransform``
  and ``EvalTransform`` in data/transforms.py, ``EncodedTrainTransform`` in data/device_decode.py).
* Unreadable files: in training a reader replaces one by another sample, at most
  ``MAX_REPLACEMENTS`` in a row before ``too_many_unreadable`` says the data is broken; in
  evaluation it is not replaced but becomes ``unreadable_placeholder``, a blank sample whose target
  ``UNREADABLE_TARGET`` the metrics leave out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import numpy as np

from .decode import Source, UnreadableImage
from .layouts import DataLayoutError

if TYPE_CHECKING:
    import torch

MAX_REPLACEMENTS = 16
# The target of an evaluation placeholder: not a class, so a loss handed one by mistake raises.
UNREADABLE_TARGET = -1


class Sample(NamedTuple):
    pixels: np.ndarray  # 3xHxW uint8; with device decode, an EncodedCrop for the device to decode
    target: int
    unreadable: tuple[tuple[str, str], ...]  # (path, reason): files replaced on the way, or a placeholder's own


class TrainSampleTransform(Protocol):
    """A training transform: one file (a path, bytes or a stream; ``name`` for messages) and the
    sample's generator in, pixels out (or, with device decode, an ``EncodedCrop``); raises
    ``UnreadableImage`` for a file it cannot read. ``at_epoch(epoch)`` is the transform to use for
    the samples of that epoch (progressive resizing changes the output size between epochs)."""

    def __call__(self, source: Source, name: str, generator: torch.Generator) -> Any: ...

    def at_epoch(self, epoch: int) -> "TrainSampleTransform": ...


class EvalSampleTransform(Protocol):
    """An evaluation transform: one file in, 3 x size x size uint8 pixels out; raises
    ``UnreadableImage`` for a file it cannot read."""

    size: int

    def __call__(self, source: Source, name: str) -> np.ndarray: ...


class TooManyUnreadable(DataLayoutError):
    """MAX_REPLACEMENTS unreadable files in a row: the data, not one file, is broken."""


def too_many_unreadable(failures: list[tuple[str, str]]) -> TooManyUnreadable:
    shown = "; ".join(f"{p} ({r})" for p, r in failures[:2])
    return TooManyUnreadable(f"{len(failures)} unreadable images in a row, e.g. {shown}; the dataset looks "
                             "broken (wrong folder, unfinished copy or unmounted filesystem?)")


def unreadable_placeholder(transform: EvalSampleTransform, err: UnreadableImage) -> Sample:
    """The evaluation sample of an unreadable file: blank pixels of the batch's shape, flagged."""
    pixels = np.zeros((3, transform.size, transform.size), dtype=np.uint8)
    return Sample(pixels, UNREADABLE_TARGET, ((err.path, err.reason),))
