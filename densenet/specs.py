"""The architecture specs: every named DenseNet-BC, as data.

Every named model is one `DenseNetSpec`; the single general builder in `densenet.model` turns a spec
into a network. Adding a variant means adding a row here, not a class.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Tuple


@dataclass(frozen=True)
class DenseNetSpec:
    """Hyper-parameters of one DenseNet-BC (Huang et al., arXiv 1608.06993).

    growth_rate:       k, the channels each bottleneck layer adds to the running concatenation.
    block_config:      bottleneck layers per dense block.
    num_init_features: channels produced by the stem.
    bn_size:           bottleneck width as a multiple of k (the paper's 4k 1x1 convolution).
    compression:       theta, the fraction of channels a transition keeps (0.5 in DenseNet-BC).
    stem:              "imagenet" (7x7/2 conv, BN, ReLU, 3x3/2 max-pool) or "cifar" (one 3x3 conv).
    num_classes:       default classifier size.
    input_size:        the input side length the model is meant for (summaries, demos).
    """

    growth_rate: int
    block_config: Tuple[int, ...]
    num_init_features: int
    bn_size: int = 4
    compression: float = 0.5
    stem: str = "imagenet"
    num_classes: int = 1000
    input_size: int = 224

    def __post_init__(self) -> None:
        if self.growth_rate < 1:
            raise ValueError(f"growth_rate must be >= 1, got {self.growth_rate}")
        if not self.block_config or any(int(n) < 1 for n in self.block_config):
            raise ValueError(f"block_config needs at least one block of >= 1 layer, got {self.block_config}")
        if self.num_init_features < 1:
            raise ValueError(f"num_init_features must be >= 1, got {self.num_init_features}")
        if self.bn_size < 1:
            raise ValueError(f"bn_size must be >= 1, got {self.bn_size}")
        if not 0.0 < self.compression <= 1.0:
            raise ValueError(f"compression (theta) must be in (0, 1], got {self.compression}")
        if self.stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {self.stem!r}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")


MODEL_SPECS: Dict[str, DenseNetSpec] = {
    # ImageNet DenseNet-BC, as in the paper's Table 1 and torchvision.
    "densenet121": DenseNetSpec(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64),
    "densenet169": DenseNetSpec(growth_rate=32, block_config=(6, 12, 32, 32), num_init_features=64),
    "densenet201": DenseNetSpec(growth_rate=32, block_config=(6, 12, 48, 32), num_init_features=64),
    "densenet161": DenseNetSpec(growth_rate=48, block_config=(6, 12, 36, 24), num_init_features=96),
    # CIFAR DenseNet-BC (L=100, k=12): three blocks of 16 bottleneck layers, 2k stem channels.
    "densenet_bc_100": DenseNetSpec(
        growth_rate=12, block_config=(16, 16, 16), num_init_features=24, stem="cifar",
        num_classes=10, input_size=32,
    ),
    # A very small ImageNet-style network (same stem and block structure) for tests and the demo.
    "densenet_tiny": DenseNetSpec(
        growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16, num_classes=10, input_size=64,
    ),
}


def list_models() -> List[str]:
    """Names accepted by `create_model`, sorted."""
    return sorted(MODEL_SPECS)


def min_image_size(spec: DenseNetSpec) -> int:
    """The smallest input side for which every stage still has at least one pixel.

    The ImageNet stem halves twice (7x7/2 conv, padded 3x3/2 max-pool: n -> ceil(n/2) each), and
    each transition's 2x2 average pool floors a half; below this size a pooling layer fails deep
    inside the first forward.
    """
    side = 2 ** (len(spec.block_config) - 1)  # what the last dense block needs after the stem
    return 4 * side - 3 if spec.stem == "imagenet" else side


def get_spec(name: str, **overrides) -> DenseNetSpec:
    """The spec registered under `name`, with any field overridden (e.g. num_classes)."""
    try:
        spec = MODEL_SPECS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; choose one of: {', '.join(list_models())}"
        ) from None
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(overrides) - set(spec.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown DenseNet option(s) {sorted(unknown)}; known: {sorted(spec.__dataclass_fields__)}")
    return replace(spec, **overrides)
