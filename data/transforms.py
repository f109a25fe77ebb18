"""Per-sample pixel pipelines: file -> 3xHxW uint8 numpy array (the batch layout). Normalisation
happens on the device.

Train: RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3, as in the paper and torchvision), horizontal
flip, optional RandAugment / TrivialAugment / AutoAugment / AugMix (torchvision or timm policies) and
random erasing. The crop is chosen from the JPEG header before any pixel is decoded, so libjpeg can
decode at a reduced scale when the crop is large (``Image.draft``), and only the crop is resized.

Eval: resize the shorter side to ``resize_size`` (by default floor(size / 0.875)) then center-crop
``size``, bit-identical to torchvision's reference eval preset (Resize(256, bilinear, antialias) +
CenterCrop(224)).

Train resizing: pillow's resampler without SIMD is several times slower than torch's antialiased
uint8 kernel (which rounds within 2/255 of pillow), so that is the default; with pillow-simd
installed, its resampler is faster still and is used instead.

Layout changes and copies go through numpy: torch's strided uint8 copies are several times slower
on one thread and far slower when intra-op threads compete for busy cores.
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache
from importlib import metadata
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .decode import Source, UnreadableImage, apply_draft, draft_factor, open_image, to_rgb_array
from .rng import draw_seed, isolated_global_rng

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
RESIZE_BACKENDS = ("auto", "torch", "pil")


@lru_cache(maxsize=1)
def pillow_simd_installed() -> bool:
    try:
        metadata.version("pillow-simd")
        return True
    except metadata.PackageNotFoundError:
        return False


def choose_backend(backend: str) -> str:
    if backend not in RESIZE_BACKENDS:
        raise ValueError(f"resize backend {backend!r} is not one of {RESIZE_BACKENDS}")
    if backend == "auto":
        return "pil" if pillow_simd_installed() else "torch"
    return backend


def check_interpolation(interpolation: str) -> str:
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation {interpolation!r} is not one of {tuple(INTERPOLATIONS)}")
    return interpolation


def random_resized_crop_params(
    width: int,
    height: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(top, left, crop_height, crop_width) by torchvision's RandomResizedCrop rule (10 tries of a
    random area and log-uniform aspect ratio, then a center crop), drawn from an explicit generator
    instead of the global one so that it is a pure function of the sample's key."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    draws = torch.rand(10, 4, generator=generator, dtype=torch.float64).tolist()
    for u_area, u_ratio, u_top, u_left in draws:
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u_ratio)
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = min(int(u_top * (height - crop_h + 1)), height - crop_h)
            left = min(int(u_left * (width - crop_w + 1)), width - crop_w)
            return top, left, crop_h, crop_w
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_w, crop_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_w, crop_h = int(round(height * max(ratio))), height
    else:
        crop_w, crop_h = width, height
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def resize_torch(crop: np.ndarray, out_h: int, out_w: int, interpolation: str, flip: bool = False) -> np.ndarray:
    """Resize an HxWx3 uint8 array with torch's antialiased uint8 kernel, mirrored if ``flip``;
    returns 3 x out_h x out_w."""
    if crop.shape[:2] == (out_h, out_w):
        return np.ascontiguousarray(crop[:, ::-1].transpose(2, 0, 1) if flip else crop.transpose(2, 0, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only input is fine: interpolate only reads it
        nchw = torch.from_numpy(crop).permute(2, 0, 1).unsqueeze(0)
    # An HWC array seen as NCHW is channels-last, which takes torch's vectorised uint8 path; its
    # output is plain NCHW, the batch layout, so no further copy is needed.
    out = F.interpolate(nchw, size=(out_h, out_w), mode=interpolation, antialias=True, align_corners=False)[0]
    return (out.flip(-1) if flip else out).numpy()


def whole_pixels(box: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
    return tuple(int(round(v)) for v in box)  # type: ignore[return-value]


def resize_pil(image: Image.Image, box: tuple[float, float, float, float], out_h: int, out_w: int,
               interpolation: str, name: str) -> np.ndarray:
    """Crop ``box`` (rounded to whole pixels) and resize it with pillow; returns HxWx3 uint8 (read
    only). Cropping first, as torchvision's resized_crop does, keeps the filter inside the crop;
    pillow's ``resize(box=...)`` would reach outside it and round differently."""
    left, top, right, bottom = whole_pixels(box)
    try:
        if image.mode != "RGB":
            image = image.convert("RGB")
        if (left, top, right, bottom) != (0, 0, *image.size):
            image = image.crop((left, top, right, bottom))
        if image.size != (out_w, out_h):
            image = image.resize((out_w, out_h), INTERPOLATIONS[interpolation])
        return np.asarray(image)
    except Exception as err:  # decoding happens lazily inside crop/resize; see decode.to_rgb_array
        raise UnreadableImage(name, f"{type(err).__name__}: {err}") from err


def to_chw(hwc: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(hwc.transpose(2, 0, 1))


def build_augment(auto_augment: str | None, size: int, interpolation: str) -> Callable | None:
    """A PIL -> PIL augmentation policy from a torchvision name (``ra``, ``ta_wide``, ``augmix``,
    ``imagenet``/``cifar10``/``svhn`` AutoAugment) or a timm config string (``rand-m9-mstd0.5-inc1``,
    ``augmix-m5-w4-d2``, ``original``, ``v0``, ``3a``)."""
    if not auto_augment or auto_augment == "none":
        return None
    from torchvision import transforms as T

    tv_interp = T.InterpolationMode(interpolation)
    if auto_augment in ("ra", "randaugment"):
        return T.RandAugment(interpolation=tv_interp)
    if auto_augment in ("ta_wide", "trivialaugment"):
        return T.TrivialAugmentWide(interpolation=tv_interp)
    if auto_augment == "augmix":
        return T.AugMix(interpolation=tv_interp)
    if auto_augment in ("imagenet", "cifar10", "svhn"):
        return T.AutoAugment(T.AutoAugmentPolicy(auto_augment), interpolation=tv_interp)
    from timm.data import auto_augment as timm_aa

    hparams = dict(translate_const=int(size * 0.45), img_mean=tuple(round(255 * m) for m in IMAGENET_MEAN),
                   interpolation=INTERPOLATIONS[interpolation])
    try:
        if auto_augment.startswith("rand"):
            policy = timm_aa.rand_augment_transform(auto_augment, hparams)
        elif auto_augment.startswith("augmix"):
            policy = timm_aa.augment_and_mix_transform(auto_augment, hparams)
        else:
            policy = timm_aa.auto_augment_transform(auto_augment, hparams)
    except Exception as err:
        raise ValueError(
            f"auto_augment {auto_augment!r} is neither a torchvision policy (ra, ta_wide, augmix, "
            f"imagenet) nor a timm config string (rand-m9-mstd0.5, augmix-m5-w4-d2, original): {err}"
        ) from err
    replace_posterize(policy, timm_aa.posterize)
    return policy


def posterize_any_bits(image: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize for every bit count its policies produce. The ``inc1`` policies (and ``mmax``
    above 10) ask to keep 0 or fewer bits at the top magnitudes, which current Pillow refuses with a
    ValueError (killing the worker). Older Pillow masked every bit away and returned a black image;
    doing the same keeps the results those recipes were tuned with."""
    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return image.point([0] * 256 * len(image.getbands()))
    return ImageOps.posterize(image, bits_to_keep)


def replace_posterize(policy, timm_posterize: Callable) -> None:
    """Point every posterize op of a timm policy (RandAugment and AugMix keep ``ops``, AutoAugment
    keeps ``policy``, a list of sub-policies) at ``posterize_any_bits``."""
    ops = list(getattr(policy, "ops", []))
    for sub_policy in getattr(policy, "policy", []):
        ops.extend(sub_policy)
    for op in ops:
        if getattr(op, "aug_fn", None) is timm_posterize:
            op.aug_fn = posterize_any_bits


class Erasure(NamedTuple):
    """A rectangle of an output image and the uint8 noise that replaces it."""
    top: int
    left: int
    noise: np.ndarray  # 3 x h x w uint8

    def paste(self, chw: np.ndarray) -> None:
        """Write the noise into a 3xHxW array, in place."""
        _, h, w = self.noise.shape
        chw[:, self.top:self.top + h, self.left:self.left + w] = self.noise


def draw_erasure(height: int, width: int, generator: torch.Generator, scale=(0.02, 1 / 3), ratio=(0.3, 3.3),
                 attempts: int = 10) -> Erasure | None:
    """One random rectangle by torchvision's RandomErasing region rule, filled with per-pixel noise
    that becomes N(0, 1) after the device's normalisation (timm's 'pixel' mode); None when no try
    fits. It needs only the output size, so the device-decode workers draw it without pixels."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for u_area, u_ratio, u_top, u_left in torch.rand(attempts, 4, generator=generator, dtype=torch.float64).tolist():
        target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u_ratio)
        h = int(round(math.sqrt(target * aspect)))
        w = int(round(math.sqrt(target / aspect)))
        if 0 < h < height and 0 < w < width:
            top, left = int(u_top * (height - h + 1)), int(u_left * (width - w + 1))
            noise = torch.randn(3, h, w, generator=generator).numpy()
            noise = noise * (np.array(IMAGENET_STD)[:, None, None] * 255) + np.array(IMAGENET_MEAN)[:, None, None] * 255
            return Erasure(top, left, np.clip(np.rint(noise), 0, 255).astype(np.uint8))
    return None


class TrainTransform:
    """File -> random crop, resized to ``size`` x ``size``, as a 3xHxW uint8 array. All randomness
    comes from the generator passed in.

    ``sizes_by_epoch`` (progressive resizing, densenet/training/resolution.py): the output size of
    each epoch; ``at_epoch(epoch)`` is the transform of that epoch (this one when the size is
    ``size``), which every reader asks for with the epoch its sample keys carry."""

    def __init__(self, size: int, *, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: float = 0.5,
                 interpolation: str = "bilinear", auto_augment: str | None = None,
                 random_erasing: float = 0.0, backend: str = "auto", draft: bool = True,
                 sizes_by_epoch: Sequence[int] | None = None):
        self._settings = dict(scale=scale, ratio=ratio, hflip=hflip, interpolation=interpolation,
                              auto_augment=auto_augment, random_erasing=random_erasing, backend=backend, draft=draft)
        self.sizes_by_epoch = tuple(sizes_by_epoch) if sizes_by_epoch else None
        if self.sizes_by_epoch and min(self.sizes_by_epoch) < 1:
            raise ValueError(f"sizes_by_epoch must be positive sizes, got {self.sizes_by_epoch}")
        self._by_size: dict[int, TrainTransform] = {}
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"crop scale {scale} must satisfy 0 < min <= max <= 1")
        if not 0 <= random_erasing <= 1:
            raise ValueError(f"random_erasing {random_erasing} is a probability in [0, 1]")
        self.size = size
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.hflip = hflip
        self.interpolation = check_interpolation(interpolation)
        self.augment = build_augment(auto_augment, size, interpolation)
        self.random_erasing = random_erasing
        self.backend = choose_backend(backend)
        self.draft = draft

    def size_at(self, epoch: int) -> int:
        """The output size in epoch ``epoch`` (0-based); the last scheduled size after the schedule."""
        if not self.sizes_by_epoch:
            return self.size
        return self.sizes_by_epoch[min(epoch, len(self.sizes_by_epoch) - 1)]

    def at_epoch(self, epoch: int) -> "TrainTransform":
        """The transform of epoch ``epoch``: the same settings at that epoch's size."""
        return self.at_size(self.size_at(epoch))

    def at_size(self, size: int) -> "TrainTransform":
        """The same settings at output size ``size`` (this transform when it is ``size``)."""
        if size == self.size:
            return self
        if size not in self._by_size:
            self._by_size[size] = TrainTransform(size, **self._settings)
        return self._by_size[size]

    def crop(self, width: int, height: int, generator: torch.Generator) -> tuple[tuple[int, int, int, int], bool]:
        """Crop box (top, left, height, width) and flip for an image of this size: all a decoder
        needs to know."""
        box = random_resized_crop_params(width, height, generator, self.scale, self.ratio)
        flip = float(torch.rand(1, generator=generator)) < self.hflip
        return box, flip

    def erasure(self, generator: torch.Generator) -> Erasure | None:
        """The random-erasing draw that follows the crop (and the augmentation policy, if any)."""
        if self.random_erasing and float(torch.rand(1, generator=generator)) < self.random_erasing:
            return draw_erasure(self.size, self.size, generator)
        return None

    def resized_crop(self, image: Image.Image, crop: tuple[int, int, int, int], flip: bool, name: str) -> np.ndarray:
        """Decode ``crop`` = (top, left, height, width) of an opened image, resized to the output
        size and mirrored if ``flip``: 3 x size x size uint8."""
        top, left, crop_h, crop_w = crop
        factor = draft_factor(crop_w, crop_h, self.size, self.size) if self.draft else 1
        scale = apply_draft(image, factor)
        box = (left / scale, top / scale, (left + crop_w) / scale, (top + crop_h) / scale)
        if self.backend == "pil":
            out = resize_pil(image, box, self.size, self.size, self.interpolation, name)
            return to_chw(out[:, ::-1] if flip else out)
        pixels = to_rgb_array(image, name, whole_pixels(box))
        return resize_torch(pixels, self.size, self.size, self.interpolation, flip)

    def __call__(self, source: Source, name: str, generator: torch.Generator) -> np.ndarray:
        with open_image(source, name) as image:
            crop, flip = self.crop(*image.size, generator)
            out = self.resized_crop(image, crop, flip, name)
        if self.augment is not None:
            with isolated_global_rng(draw_seed(generator)):
                augmented = self.augment(Image.fromarray(np.ascontiguousarray(out.transpose(1, 2, 0))))
            out = to_chw(np.asarray(augmented.convert("RGB")))
        erasure = self.erasure(generator)
        if erasure is not None:
            erasure.paste(out)
        return out


# The crop's share of the resized image when no resize is given: 224 / 256, the ImageNet convention.
DEFAULT_CROP_FRACTION = 0.875


class EvalTransform:
    """File -> resize shorter side to ``resize_size``, center crop ``size``, 3xHxW uint8 array.

    ``resize_size`` defaults to ``floor(size / crop_fraction)`` (timm's rounding), with
    ``crop_fraction`` 0.875 unless given (e.g. timm's ``crop_pct``): 224 -> 256, 32 -> 36. Give one
    of the two, not both. This is the one place the evaluation resize is worked out.

    Pillow resizes the whole image, exactly as torchvision's preset does: the result is bit-identical
    to it. (Resizing only the crop's source box, or using torch's kernel, is a little cheaper but
    rounds differently by up to 1-2/255, and evaluation is where published numbers are compared.)"""

    def __init__(self, size: int = 224, resize_size: int | None = None, *, crop_fraction: float | None = None,
                 interpolation: str = "bilinear"):
        if resize_size is None:
            crop_fraction = DEFAULT_CROP_FRACTION if crop_fraction is None else crop_fraction
            if not 0 < crop_fraction <= 1:
                raise ValueError(f"crop_fraction {crop_fraction} must be in (0, 1]")
            resize_size = math.floor(size / crop_fraction)
        elif crop_fraction is not None:
            raise ValueError(f"eval resize_size {resize_size} and crop_fraction {crop_fraction} both given; "
                             "give one of them")
        if resize_size < size:
            raise ValueError(f"eval resize_size {resize_size} is smaller than the crop {size}; "
                             "use resize_size >= image_size (224/256 = crop fraction 0.875)")
        self.size = size
        self.resize_size = resize_size
        self.interpolation = check_interpolation(interpolation)

    def resized_shape(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after torchvision's Resize(int): shorter side = resize_size, the longer
        one scaled and truncated."""
        if width <= height:
            return self.resize_size, int(self.resize_size * height / width)
        return int(self.resize_size * width / height), self.resize_size

    def __call__(self, source: Source, name: str) -> np.ndarray:
        size = self.size
        with open_image(source, name) as image:
            width, height = image.size
            new_w, new_h = self.resized_shape(width, height)
            resized = resize_pil(image, (0, 0, width, height), new_h, new_w, self.interpolation, name)
        top = int(round((new_h - size) / 2.0))
        left = int(round((new_w - size) / 2.0))
        return to_chw(resized[top:top + size, left:left + size])
