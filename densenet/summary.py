"""Parameters and multiply-accumulates of every named DenseNet at its default input size.

    python -m densenet.summary                 # all models
    python -m densenet.summary densenet121 --num-classes 100 --image-size 160

Both are computed from the DenseNetSpec (densenet/specs.py), layer by layer, without building a
network or running it (and without importing torch), so the table is immediate. MACs follow the
convention of torchvision's published "GFLOPS" and fvcore: the multiply-accumulates of the
convolutions (stem, every bottleneck's 1x1 and 3x3, every transition's 1x1) and of the classifier's
matrix product, for one image; BN, ReLU, pooling, concatenation and biases are not counted.
tests/test_summary_reuse.py checks both figures against torch's FLOP counter (2 FLOPs per MAC) and
the parameter count of the built model.
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass
from typing import List, Optional, Tuple

from .specs import DenseNetSpec, get_spec, list_models


@dataclass(frozen=True)
class ModelSummary:
    name: str
    input_size: int
    num_classes: int
    params: int
    macs: int


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _conv(h: int, w: int, c_in: int, c_out: int, kernel: int) -> Tuple[int, int]:
    """(MACs, parameters) of a bias-free convolution producing an h x w map."""
    weights = c_in * c_out * kernel * kernel
    return h * w * weights, weights


def count(spec: DenseNetSpec, image_size: int) -> Tuple[int, int]:
    """(MACs for one image_size x image_size image, parameters) of the network `spec` describes,
    walking it as densenet.model.DenseNet builds it."""
    if image_size < 1:
        raise ValueError(f"image size must be positive, got {image_size}")
    macs = params = 0

    def add(counted: Tuple[int, int]) -> None:
        nonlocal macs, params
        macs, params = macs + counted[0], params + counted[1]

    def bn(channels: int) -> None:  # weight and bias; no MACs by the convention
        nonlocal params
        params += 2 * channels

    h = w = image_size
    c = spec.num_init_features
    if spec.stem == "imagenet":  # conv 7x7/2 pad 3, BN, ReLU, max-pool 3x3/2 pad 1
        h, w = _conv_out(h, 7, 2, 3), _conv_out(w, 7, 2, 3)
        add(_conv(h, w, 3, c, 7))
        bn(c)
        h, w = _conv_out(h, 3, 2, 1), _conv_out(w, 3, 2, 1)
    else:  # conv 3x3/1 pad 1
        add(_conv(h, w, 3, c, 3))
    if h < 1 or w < 1:
        raise ValueError(f"{image_size} px is too small for this network's stem")
    width = spec.bn_size * spec.growth_rate
    for i, num_layers in enumerate(spec.block_config):
        for _ in range(num_layers):  # BN-ReLU-conv1x1(bn_size*k)-BN-ReLU-conv3x3(k), same h x w
            bn(c)
            add(_conv(h, w, c, width, 1))
            bn(width)
            add(_conv(h, w, width, spec.growth_rate, 3))
            c += spec.growth_rate
        if i != len(spec.block_config) - 1:  # BN-ReLU-conv1x1(theta*c)-avg-pool 2x2/2
            out = int(c * spec.compression)
            bn(c)
            add(_conv(h, w, c, out, 1))
            c, h, w = out, h // 2, w // 2
            if h < 1 or w < 1:
                raise ValueError(f"{image_size} px is too small: transition {i + 1} pools the map below one pixel")
    bn(c)  # norm5; then ReLU and global average pooling
    macs += c * spec.num_classes
    params += c * spec.num_classes + spec.num_classes
    return macs, params


@functools.lru_cache(maxsize=None)
def summarize(name: str, image_size: Optional[int] = None, num_classes: Optional[int] = None) -> ModelSummary:
    spec = get_spec(name, num_classes=num_classes)
    size = image_size or spec.input_size
    macs, params = count(spec, size)
    return ModelSummary(name, size, spec.num_classes, params, macs)


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
