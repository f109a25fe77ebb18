"""Feature reuse in a trained DenseNet: the heat maps of the paper's Figure 5.

For every dense block, cell (s, l) is the mean absolute weight of target layer l's first
convolution over the input channels that source s contributed to the concatenation (s = 0 is the
block's input, s >= 1 the output of layer s). Taking the mean instead of the sum is the paper's
normalisation "by the number of input feature-maps": the block input (many channels) and a layer
(k channels) are compared per channel. One more target column shows the transition layer after the
block (its 1x1 convolution) or, after the last block, the classifier (over the pooled channels).
Each block's map is coloured from 0 to its own maximum, as in the paper.

    python -m densenet.reuse runs/densenet121/best.pt --out reuse.png   # also writes reuse.json
    python -m densenet.reuse densenet121-a639ec97.pth --out tv121.png     # a torchvision weight file

Only the weights are read; the blocks, growth rate and widths of the maps come from their shapes.
The architecture name and image size that label the figure and reuse.json come from the file where
it records them (our checkpoints and exports; a torchvision file is named by the model its layers
match) unless --arch / --image-size give them; an --arch that is not what the file holds is an
error. The image size only labels the result: the maps are of weights, which do not depend on it.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

from torch import Tensor

from .weights import WeightsError, WeightsFile, read_weights
from .specs import get_spec, list_models

_LAYER_KEY = re.compile(r"^features\.denseblock(\d+)\.denselayer(\d+)\.conv1\.weight$")


@dataclass
class BlockReuse:
    block: int
    num_layers: int
    growth_rate: int
    input_channels: int
    target: str  # what the extra last column is: "transition" or "classifier"
    # matrix[s][l-1] for source s in 0..L and target l in 1..L+1 (L+1: transition/classifier);
    # NaN where s >= l (a layer cannot read a later layer's output).
    matrix: List[List[float]]


def _group_means(weight: Tensor, input_channels: int, growth_rate: int, num_sources: int) -> List[float]:
    """Mean |w| over each source's slice of the input channels (dim 1)."""
    w = weight.detach().float().abs()
    out = []
    for s in range(num_sources):
        lo = 0 if s == 0 else input_channels + (s - 1) * growth_rate
        hi = input_channels if s == 0 else lo + growth_rate
        out.append(w[:, lo:hi].mean().item())
    return out


def feature_reuse(state_dict: Mapping[str, Tensor]) -> List[BlockReuse]:
    """The per-block reuse matrices of a DenseNet state_dict (torchvision naming)."""
    layers: Dict[int, Dict[int, Tensor]] = {}
    for key, value in state_dict.items():
        m = _LAYER_KEY.match(key)
        if m:
            layers.setdefault(int(m.group(1)), {})[int(m.group(2))] = value
    if not layers:
        raise ValueError("no dense layers found (expected keys like "
                         "'features.denseblock1.denselayer1.conv1.weight')")
    blocks = []
    last_block = max(layers)
    for b in sorted(layers):
        convs = layers[b]
        num_layers = max(convs)
        if sorted(convs) != list(range(1, num_layers + 1)):
            raise ValueError(f"dense block {b} has gaps in its layer numbering: {sorted(convs)}")
        growth = state_dict[f"features.denseblock{b}.denselayer1.conv2.weight"].shape[0]
        c0 = convs[1].shape[1]
        for l in range(1, num_layers + 1):
            expected = c0 + (l - 1) * growth
            if convs[l].shape[1] != expected:
                raise ValueError(f"block {b} layer {l} reads {convs[l].shape[1]} channels, expected "
                                 f"{expected} for a dense block with k={growth}")
        nan = float("nan")
        matrix = [[nan] * (num_layers + 1) for _ in range(num_layers + 1)]
        for l in range(1, num_layers + 1):
            for s, v in enumerate(_group_means(convs[l], c0, growth, l)):
                matrix[s][l - 1] = v
        if b != last_block:
            target, weight = "transition", state_dict.get(f"features.transition{b}.conv.weight")
        else:
            target, weight = "classifier", state_dict.get("classifier.weight")
        if weight is not None and weight.shape[1] == c0 + num_layers * growth:
            for s, v in enumerate(_group_means(weight, c0, growth, num_layers + 1)):
                matrix[s][num_layers] = v
        blocks.append(BlockReuse(b, num_layers, growth, c0, target, matrix))
    return blocks


def plot(blocks: List[BlockReuse], out: Path, title: Optional[str] = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(blocks), figsize=(4.2 * len(blocks), 4.4), squeeze=False)
    for ax, blk in zip(axes[0], blocks):
        data = np.array(blk.matrix, dtype=float)
        vmax = np.nanmax(data) if np.isfinite(data).any() else 1.0
        cmap = plt.get_cmap("jet").with_extremes(bad="white")
        im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=0.0, vmax=vmax, origin="upper",
                       interpolation="nearest", aspect="auto")
        L = blk.num_layers
        # Outline the transition / classifier column, as the paper does.
        ax.add_patch(plt.Rectangle((L - 0.5, -0.5), 1, L + 1, fill=False, edgecolor="black", linewidth=1.5))
        ax.set_title(f"Dense block {blk.block}  (k={blk.growth_rate}, {L} layers)", fontsize=10)
        ax.set_xlabel(f"Target layer (l); last column: {blk.target}")
        ax.set_ylabel("Source layer (s)")
        step = max(1, math.ceil((L + 1) / 8))
        ax.set_xticks(range(0, L + 1, step), [str(i + 1) for i in range(0, L + 1, step)])
        ax.set_yticks(range(0, L + 1, step), [str(i) for i in range(0, L + 1, step)])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="mean |w|")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def to_json(blocks: List[BlockReuse], source: str, arch: Optional[str] = None,
            image_size: Optional[int] = None) -> dict:
    def clean(v: float) -> Optional[float]:
        return None if math.isnan(v) else v

    return {
        "source": source,
        "arch": arch,
        "image_size": image_size,
        "definition": "cell [s][l-1] = mean |weight| of target layer l's first convolution over the input "
                      "channels from source s (s=0: block input); last column: transition or classifier; "
                      "null where s >= l",
        "blocks": [{"block": b.block, "num_layers": b.num_layers, "growth_rate": b.growth_rate,
                    "input_channels": b.input_channels, "last_column": b.target,
                    "matrix": [[clean(v) for v in row] for row in b.matrix]} for b in blocks],
    }


def resolve_arch_and_size(weights: WeightsFile, arch: Optional[str],
                          image_size: Optional[int]) -> Tuple[Optional[str], Optional[int]]:
    """The flags where given, else what the file records: the architecture (for a torchvision file,
    the named model its layers match) and the image size (else the architecture's own input size).
    WeightsError when --arch is not the network the file holds."""
    if arch is not None:
        get_spec(arch)  # a ValueError naming the known models
        if weights.arch is None:
            raise WeightsError(f"--arch {arch} does not fit {weights.path}: its layers are those of no named "
                               f"model ({', '.join(list_models())})")
        if weights.arch != arch:
            how = "was trained as" if weights.source in ("checkpoint", "export") else "has the layers of"
            raise WeightsError(f"--arch {arch} does not fit {weights.path}, which {how} a {weights.arch}; "
                               f"drop --arch or pass --arch {weights.arch}")
    arch = arch or weights.arch
    if image_size is None:
        image_size = weights.image_size or (get_spec(arch).input_size if arch in list_models() else None)
    return arch, image_size


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m densenet.reuse", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint written by train_dist.py, an export of one, or a "
                        "torchvision DenseNet weight file")
    parser.add_argument("--out", default="reuse.png", help="the PNG to write (default: reuse.png)")
    parser.add_argument("--json", default=None, help="the matrices as JSON (default: --out with .json)")
    parser.add_argument("--arch", default=None, choices=list_models(), metavar="ARCH",
                        help="the model name for the labels (default: the one the file records or matches); "
                        "an error when the file holds another")
    parser.add_argument("--image-size", type=int, default=None,
                        help="the training image size for the labels (default: the one the checkpoint records, "
                        "else the model's own input size)")
    args = parser.parse_args(argv)
    if args.image_size is not None and args.image_size < 1:
        parser.exit(2, f"error: --image-size must be positive, got {args.image_size}\n")
    try:
        weights = read_weights(args.checkpoint)
        arch, image_size = resolve_arch_and_size(weights, args.arch, args.image_size)
        blocks = feature_reuse(weights.state_dict)
    except ValueError as exc:  # WeightsError, or weights whose dense blocks do not add up
        parser.exit(2, f"error: {exc}\n")
    out = Path(args.out)
    json_path = Path(args.json) if args.json else out.with_suffix(".json")
    label = ", ".join(x for x in (arch, f"{image_size} px" if image_size else None) if x)
    plot(blocks, out, title=f"Feature reuse: {Path(args.checkpoint).name}" + (f" ({label})" if label else ""))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(to_json(blocks, str(args.checkpoint), arch, image_size), indent=1))
    print(f"wrote {out} and {json_path} ({label + ', ' if label else ''}{len(blocks)} dense blocks)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
