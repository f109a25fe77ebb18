"""Everything between ImageNet files on disk and uint8 batches.

    from data import (resolve_data_root, build_train_loader, build_eval_loader, TrainTransform, EvalTransform,
                      IMAGENET_MEAN, IMAGENET_STD)

    root = resolve_data_root("demo")   # or "/datasets/imagenet"
    train = build_train_loader(root, TrainTransform(224), batch_size=64, workers=8, rank=0, world_size=1, seed=0)
    val = build_eval_loader(root, EvalTransform(224), batch_size=100, workers=8)  # resize 256 = floor(224 / 0.875)
    for epoch in range(epochs):
        train.set_epoch(epoch)
        for images, targets, bad in train:    # uint8 [B,3,H,W], int64 [B], bool [B]
            ...

``build_train_loader(..., decode_on=torch.device("cuda", local_rank))`` leaves JPEG decoding,
cropping and resizing to the GPU, and its batches arrive there. Settings few callers change (split,
prefetch factor, worker start method, shard shuffle buffer) go in ``LoaderOptions``. See docs/data.md
for layouts, shards, the device-decode mode, the demo data and the benchmark.
"""

from importlib import import_module
from typing import TYPE_CHECKING

# Names are imported on first use, so that `python -m data.demo` or `python -m data.shards` start
# in a fraction of a second instead of first importing torch.
_EXPORTS = {
    "IMAGENET_MEAN": "transforms",
    "IMAGENET_STD": "transforms",
    "DataLayoutError": "layouts",
    "EvalLoader": "loader",
    "EvalTransform": "transforms",
    "LoaderOptions": "loader",
    "TrainLoader": "loader",
    "TrainTransform": "transforms",
    "build_eval_loader": "loader",
    "build_train_loader": "loader",
    "class_name": "classes",
    "class_names": "classes",
    "imagenet_wnids": "classes",
    "resolve_data_root": "root",
}
__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DataLayoutError",
    "EvalLoader",
    "EvalTransform",
    "LoaderOptions",
    "TrainLoader",
    "TrainTransform",
    "build_eval_loader",
    "build_train_loader",
    "class_name",
    "class_names",
    "imagenet_wnids",
    "resolve_data_root",
]

if TYPE_CHECKING:
    from .classes import class_name, class_names, imagenet_wnids
    from .layouts import DataLayoutError
    from .loader import EvalLoader, LoaderOptions, TrainLoader, build_eval_loader, build_train_loader
    from .root import resolve_data_root
    from .transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, TrainTransform


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'data' has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
