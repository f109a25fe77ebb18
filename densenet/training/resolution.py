"""Progressive resizing: the training crop of every epoch, as FFCV's ImageNet recipes schedule it.

The crop stays at ``start`` x image_size for the first part of the run, grows linearly between the
two fractions of the epochs in ``ramp`` (rounded to a multiple of ``multiple`` pixels) and is the full
image_size after. A pure function of the epoch, so a resumed run trains every epoch at the size the
uninterrupted one did, and sizes change only at epoch boundaries. Pure Python: the config checks it.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple


def _round_to(size: float, multiple: int) -> int:
    return max(multiple, int(round(size / multiple)) * multiple)


def train_sizes(image_size: int, epochs: int, start: Optional[float], ramp: Sequence[float],
                multiple: int) -> Tuple[int, ...]:
    """The training crop of each epoch (0-based), ``epochs`` of them; all image_size when ``start`` is None."""
    if start is None:
        return (image_size,) * epochs
    low = _round_to(image_size * start, multiple)
    first, last = ramp[0] * epochs, ramp[1] * epochs
    sizes = []
    for epoch in range(epochs):
        if epoch <= first:
            size = low
        elif epoch >= last:
            size = image_size
        else:
            size = min(image_size, _round_to(low + (image_size - low) * (epoch - first) / (last - first), multiple))
        sizes.append(size)
    return tuple(sizes)


def image_pixels(sizes: Sequence[int], images_per_epoch: int) -> int:
    """Pixels of all training crops over the run: what progressive resizing saves, roughly the compute."""
    return sum(size * size for size in sizes) * images_per_epoch
