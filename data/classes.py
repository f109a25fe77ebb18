"""ImageNet-1k class identity: wnids in sorted order (the class indices torchvision's and timm's
published weights use: n01440764 -> 0, ..., n15075141 -> 999) and their human-readable names."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources


TABLE = "imagenet_classes.tsv"


@lru_cache(maxsize=1)
def _table() -> tuple[tuple[str, ...], dict[str, str]]:
    try:
        text = resources.files(__package__).joinpath(TABLE).read_text()
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"the class table {TABLE} is missing from the installed 'data' package; it must be "
            "listed as package data (or regenerate it with `python -m data.make_class_table`)") from err
    pairs = [line.split("\t") for line in text.splitlines() if line]
    wnids = tuple(wnid for wnid, _ in pairs)
    return wnids, dict(pairs)


def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ILSVRC2012 wnids, sorted; position = class index."""
    return _table()[0]


def class_name(wnid: str) -> str:
    """Human name of an ImageNet wnid ('n01440764' -> 'tench'); any other folder name is its own
    name, so subsets and custom datasets still get readable labels."""
    return _table()[1].get(wnid, wnid)


def class_names(wnids: list[str] | tuple[str, ...]) -> list[str]:
    return [class_name(w) for w in wnids]


def is_wnid(name: str) -> bool:
    return len(name) == 9 and name[0] == "n" and name[1:].isdigit()
