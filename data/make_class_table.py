"""Regenerate ``imagenet_classes.tsv``, the ImageNet-1k wnid -> class name table.

The table is derived once, when the package is built, from two tables that ship with the libraries
we already depend on: timm's sorted list of the 1000 ILSVRC2012 wnids and torchvision's list of
class names in the same order (the names its published weights report, deduplicated so that e.g.
the two "crane" classes differ). Nothing reads either library's private files at run time.

    python -m data.make_class_table            # rewrites data/imagenet_classes.tsv
    python -m data.make_class_table --check    # exits 1 if the shipped table is out of date
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

TABLE_PATH = Path(__file__).with_name("imagenet_classes.tsv")


def derive_table() -> str:
    import timm
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    synsets = Path(os.path.dirname(timm.__file__), "data", "_info", "imagenet_synsets.txt")
    wnids = synsets.read_text().split()
    if len(wnids) != 1000 or wnids != sorted(wnids):
        raise RuntimeError(f"{synsets} is not the sorted list of 1000 ImageNet-1k wnids")
    if len(_IMAGENET_CATEGORIES) != 1000 or len(set(_IMAGENET_CATEGORIES)) != 1000:
        raise RuntimeError("torchvision's ImageNet category list is not 1000 unique names")
    lines = [f"{wnid}\t{name}" for wnid, name in zip(wnids, _IMAGENET_CATEGORIES)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    table = derive_table()
    if args.check:
        same = TABLE_PATH.exists() and TABLE_PATH.read_text() == table
        print(f"{TABLE_PATH}: {'up to date' if same else 'OUT OF DATE'}")
        return 0 if same else 1
    TABLE_PATH.write_text(table)
    print(f"wrote {TABLE_PATH} (1000 classes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
