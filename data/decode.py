"""Decoding one image file into RGB pixels with PIL, robust to ImageNet's quirks.

* Greyscale, CMYK (about 22 ImageNet JPEGs), palette and alpha images are converted to RGB.
* The format is sniffed from the content, not the name, so the PNG saved as n02105855_2933.JPEG reads.
* ``Image.draft`` lets libjpeg decode at 1/2, 1/4 or 1/8 scale through its DCT, which is several
  times cheaper; callers ask for it only when the region they keep is still at least the output
  size after the reduction (so it only kicks in for images at least twice the target size).
* Anything that cannot be decoded (truncated, zero-byte, not an image) raises ``UnreadableImage``
  naming the file, which the datasets turn into a replacement sample and a ``bad`` flag.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import BinaryIO, Union

import numpy as np
from PIL import Image

# ImageNet holds a few JPEGs whose EXIF block PIL finds odd; the pixels are fine.
warnings.filterwarnings("ignore", message="(Possibly )?corrupt EXIF", category=UserWarning)
warnings.filterwarnings("ignore", message="Metadata Warning", category=UserWarning)

Source = Union[str, os.PathLike, bytes, BinaryIO]


class UnreadableImage(Exception):
    """A file that is not a decodable image; ``path`` names it, ``reason`` says why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def open_image(source: Source, name: str) -> Image.Image:
    """Read the header only (size, mode); pixels are decoded later, after an optional draft."""
    try:
        if isinstance(source, bytes):
            source = io.BytesIO(source)
        return Image.open(source)
    except Exception as err:  # PIL raises many types for broken headers; all mean "unreadable"
        raise UnreadableImage(name, f"{type(err).__name__}: {err}") from err


def draft_factor(region_w: float, region_h: float, out_w: int, out_h: int) -> int:
    """Largest JPEG DCT reduction (1, 2, 4, 8) that keeps the region at least the output size."""
    for factor in (8, 4, 2):
        if region_w >= out_w * factor and region_h >= out_h * factor:
            return factor
    return 1


def apply_draft(image: Image.Image, factor: int) -> float:
    """Ask libjpeg to decode at 1/factor scale; returns the scale actually applied (1.0 for
    non-JPEG images, where draft does nothing)."""
    if factor <= 1 or image.format != "JPEG":
        return 1.0
    width, height = image.size
    result = image.draft(None, (width // factor, height // factor))
    if result is None:
        return 1.0
    _, box = result
    return width / box[2]


def to_rgb_array(image: Image.Image, name: str, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Decode the pixels (of ``box`` = (left, top, right, bottom) only, if given) into an HxWx3
    uint8 array. Exporting just the crop saves most of the export copy for a typical random crop.
    The array is read-only: numpy wraps the one copy pillow makes when exporting."""
    try:
        if image.mode != "RGB":
            # Alpha is dropped, as torchvision's and timm's loaders do (convert("RGB")).
            image = image.convert("RGB")
        else:
            image.load()
        if box is not None and box != (0, 0, *image.size):
            image = image.crop(box)
        return np.asarray(image)
    except Exception as err:  # truncated data, bad Huffman tables, decompression bombs, ...
        raise UnreadableImage(name, f"{type(err).__name__}: {err}") from err


def decode_rgb(source: Source, name: str | None = None) -> np.ndarray:
    """Full-resolution decode to an HxWx3 uint8 array (read-only)."""
    name = name or (str(source) if isinstance(source, (str, os.PathLike)) else "<bytes>")
    with open_image(source, name) as image:
        return to_rgb_array(image, name)
