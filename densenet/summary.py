"""Parameters and multiply-accumulates of every named DenseNet at its default input size.

    python -m densenet.summary                 # all models
    python -m densenet.summary densenet121 --num-classes 100 --image-size 160

MACs are counted by torch's FLOP counter over convolutions and the classifier (the convention
torchvision's published "GFLOPS" use; BN, ReLU and pooling are not counted), for one image.
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from .model import create_model
from .zoo import get_spec, list_models


@dataclass(frozen=True)
class ModelSummary:
    name: str
    input_size: int
    num_classes: int
    params: int
    macs: int


@functools.lru_cache(maxsize=None)
def summarize(name: str, image_size: Optional[int] = None, num_classes: Optional[int] = None) -> ModelSummary:
    spec = get_spec(name, num_classes=num_classes)
    size = image_size or spec.input_size
    model = create_model(name, num_classes=spec.num_classes).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    # The counter reports FLOPs as 2 per multiply-accumulate.
    return ModelSummary(name, size, spec.num_classes, sum(p.numel() for p in model.parameters()),
                        counter.get_total_flops() // 2)


def format_table(rows: List[ModelSummary]) -> str:
    lines = [f"{'model':<16} {'input':>7} {'classes':>7} {'params':>12} {'GMACs':>8}"]
    for r in rows:
        lines.append(f"{r.name:<16} {r.input_size:>7} {r.num_classes:>7} {r.params:>12,} {r.macs / 1e9:>8.3f}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m densenet.summary", description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help=f"default: all ({', '.join(list_models())})")
    parser.add_argument("--image-size", type=int, default=None, help="default: each model's own input size")
    parser.add_argument("--num-classes", type=int, default=None, help="default: each model's own class count")
    args = parser.parse_args(argv)
    names = args.models or list_models()
    try:
        rows = [summarize(n, args.image_size, args.num_classes) for n in names]
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
