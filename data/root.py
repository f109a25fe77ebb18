"""``resolve_data_root``: turn the trainer's ``--data`` value into a checked dataset folder."""

from __future__ import annotations

import os
from pathlib import Path

from .demo import build_demo
from .layouts import EXPECTED_LAYOUTS, DataLayoutError, check_split, dataset_root, describe_dir
from .shard_index import is_shard_dir, list_shards, shard_splits


def resolve_data_root(data: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """``"demo"`` -> the built-in demo tree (written under ``cache_dir``, default ./.cache/demo-data,
    on first use; safe when several ranks call it at once). Anything else is a dataset folder,
    checked now so that a wrong path fails in the first second with a message naming what was found
    rather than inside a DataLoader worker. The check is cheap: it does not list every image."""
    if str(data) == "demo":
        return build_demo(cache_dir)
    root = dataset_root(data)
    if is_shard_dir(root):
        for split in shard_splits(root) or ("train",):  # with no split there, the error says what is expected
            list_shards(root, split)
        return root
    splits = [split for split in ("train", "val") if (root / split).is_dir()]
    if not splits:
        raise DataLayoutError(f"{root} has neither train/ nor val/; found {describe_dir(root)}; "
                              f"{EXPECTED_LAYOUTS}")
    for split in splits:
        check_split(root, split)
    return root
