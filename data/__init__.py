"""Everything between ImageNet files on disk and uint8 batches.

    from data import resolve_data_root, build_train_loader, build_eval_loader, IMAGENET_MEAN, IMAGENET_STD

    root = resolve_data_root("demo")   # or "/datasets/imagenet"
    train = build_train_loader(root, image_size=224, batch_size=64, workers=8, rank=0, world_size=1, seed=0)
    for epoch in range(epochs):
        train.set_epoch(epoch)
        for images, targets, bad in train:    # uint8 [B,3,H,W], int64 [B], bool [B]
            ...

See docs/data.md for layouts, shards, the demo data and the benchmark.
"""

from .classes import class_name, class_names, imagenet_wnids
from .layouts import DataLayoutError
from .loader import EvalLoader, TrainLoader, build_eval_loader, build_train_loader
from .root import resolve_data_root
from .transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DataLayoutError",
    "EvalLoader",
    "TrainLoader",
    "build_eval_loader",
    "build_train_loader",
    "class_name",
    "class_names",
    "imagenet_wnids",
    "resolve_data_root",
]
