"""DenseNet-BC (Huang et al., "Densely Connected Convolutional Networks", arXiv 1608.06993).

Module and parameter names follow torchvision's `torchvision.models.densenet` exactly
(`features.conv0`, `features.denseblock1.denselayer1.norm1`, `features.transition1.conv`,
`features.norm5`, `classifier`), so published torchvision weights load with strict key matching and
our checkpoints load back into torchvision.

Memory-efficient mode recomputes each bottleneck layer (concatenation, both BN-ReLU-conv pairs)
during the backward pass instead of keeping its intermediate activations. That removes the part of
DenseNet's activation memory that grows quadratically with depth (every layer's copy of the
concatenation and its BN/ReLU output) and the 4k-channel bottleneck maps, at the price of one extra
forward pass through the dense layers.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import Tensor

from .specs import DenseNetSpec, get_spec, list_models

__all__ = ["DenseNet", "create_model", "list_models", "densenet121", "densenet169", "densenet201",
           "densenet161", "densenet_bc_100", "densenet_tiny"]


def _defers_statistics(norm: nn.Module) -> bool:
    return norm.training and norm.track_running_stats


def _running_statistics(norm: nn.BatchNorm2d) -> Tuple[Tensor, ...]:
    """Copies of the running averages for a checkpointed `_batch_norm` to start from (none when it
    leaves them alone).

    Taken outside the checkpointed region because the recomputation in the backward pass reads
    them after the buffers have moved. Compiled, a buffer read there would be a graph input saved
    for backward and then written to, which autograd rejects where the backend writes input
    mutations back after the graph (cudagraphs does by default).
    """
    if not _defers_statistics(norm):
        return ()
    return norm.running_mean.clone(), norm.running_var.clone()


def _batch_norm(norm: nn.BatchNorm2d, x: Tensor,
                running: Optional[Tuple[Tensor, ...]]) -> Tuple[Tensor, Tuple[Tensor, ...]]:
    """BatchNorm that, given `running` from `_running_statistics`, returns its running-statistics
    update instead of applying it.

    A checkpointed layer runs its forward twice in training; the recomputation must perform exactly
    the same operations (selective checkpointing matches them one by one) but must not move the
    running averages a second time. So inside the region the update goes to copies, returned as
    outputs of the region and written back once by the caller: a region that wrote to the buffers,
    or to anything else from outside, would be a side effect that torch.compile cannot trace inside
    a checkpoint, breaking the graph at every layer.
    """
    if not running:
        return norm(x), ()
    # Copied again: the region must not write to its own inputs either.
    mean, var = running[0].clone(), running[1].clone()
    momentum = norm.momentum if norm.momentum is not None else 1.0 / float(norm.num_batches_tracked + 1)
    return F.batch_norm(x, mean, var, norm.weight, norm.bias, True, momentum, norm.eps), (mean, var)


def _commit_statistics(norms: Sequence[nn.BatchNorm2d], stats: Sequence[Tensor]) -> None:
    """Write back the (mean, var) pairs `_batch_norm` returned, one per norm that defers, in order."""
    deferring = [norm for norm in norms if _defers_statistics(norm)]
    with torch.no_grad():
        for norm, mean, var in zip(deferring, stats[0::2], stats[1::2]):
            norm.running_mean.copy_(mean)
            norm.running_var.copy_(var)
            norm.num_batches_tracked.add_(1)


def _keep_3x3_output(ctx, op, *args, **kwargs):
    """Selective-checkpoint policy: keep the 3x3 convolution's output, recompute everything else.

    That output is the layer's new features, which the following layers keep alive anyway, so
    keeping it costs no memory; it spares the recomputation the layer's most expensive convolution
    in the early, high-resolution blocks (only its input is needed for its backward pass).
    """
    if op is torch.ops.aten.convolution.default and args[1].shape[-2:] == (3, 3):
        return cp.CheckpointPolicy.MUST_SAVE
    return cp.CheckpointPolicy.PREFER_RECOMPUTE


def _keep_layer_output():
    return cp.create_selective_checkpoint_contexts(_keep_3x3_output)


class _DenseLayer(nn.Module):
    """Bottleneck layer: BN-ReLU-Conv1x1(bn_size*k) - BN-ReLU-Conv3x3(k), fed the concatenation of
    the block input and all earlier layers' outputs."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float,
                 memory_efficient: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = float(drop_rate)
        self.memory_efficient = memory_efficient

    def _compute(self, running1: Optional[Tuple[Tensor, ...]], running2: Optional[Tuple[Tensor, ...]],
                 *prev_features: Tensor) -> Tuple[Tensor, ...]:
        """The new features, followed by the deferred BN statistics (see `_batch_norm`)."""
        # torch.cat keeps channels_last when every input is channels_last, so the layout survives.
        x = torch.cat(prev_features, 1) if len(prev_features) > 1 else prev_features[0]
        x, stats1 = _batch_norm(self.norm1, x, running1)
        x = self.conv1(self.relu1(x))
        x, stats2 = _batch_norm(self.norm2, x, running2)
        return (self.conv2(self.relu2(x)),) + stats1 + stats2

    def forward(self, prev_features: Sequence[Tensor]) -> Tensor:
        if self.memory_efficient and torch.is_grad_enabled() and any(t.requires_grad for t in prev_features):
            if isinstance(self.norm1, nn.SyncBatchNorm) or isinstance(self.norm2, nn.SyncBatchNorm):
                # `_batch_norm` calls F.batch_norm, which would normalise with this process's
                # statistics alone: refuse rather than train silently unsynchronised.
                raise ValueError("SyncBatchNorm does not reach memory-efficient dense layers; "
                                 "convert a model built with memory_efficient=False (or call set_memory_efficient(False))")
            running = (_running_statistics(self.norm1), _running_statistics(self.norm2))
            new, *stats = cp.checkpoint(self._compute, *running, *prev_features, use_reentrant=False,
                                        context_fn=_keep_layer_output)
            _commit_statistics((self.norm1, self.norm2), stats)
        else:
            new = self._compute(None, None, *prev_features)[0]
        if self.drop_rate > 0:
            new = F.dropout(new, p=self.drop_rate, training=self.training)
        return new


class _DenseBlock(nn.ModuleDict):
    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int,
                 drop_rate: float, memory_efficient: bool = False) -> None:
        super().__init__()
        for i in range(num_layers):
            self.add_module(
                f"denselayer{i + 1}",
                _DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size, drop_rate, memory_efficient),
            )

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    """BN-ReLU-Conv1x1 (compression theta) - AvgPool 2x2 between dense blocks."""

    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    """One general DenseNet-BC; the named variants in `densenet.specs` are specs for it."""

    def __init__(self, growth_rate: int = 32, block_config: Sequence[int] = (6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int = 4, compression: float = 0.5,
                 stem: str = "imagenet", num_classes: int = 1000, drop_rate: float = 0.0,
                 memory_efficient: bool = False) -> None:
        super().__init__()
        # Validate through the spec so a direct constructor call gets the same clear errors.
        spec = DenseNetSpec(growth_rate=growth_rate, block_config=tuple(int(n) for n in block_config),
                            num_init_features=num_init_features, bn_size=bn_size, compression=compression,
                            stem=stem, num_classes=num_classes)
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        self.growth_rate = spec.growth_rate
        self.block_config = spec.block_config
        self.drop_rate = float(drop_rate)

        self.features = nn.Sequential()
        if spec.stem == "imagenet":
            self.features.add_module("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False))
            self.features.add_module("norm0", nn.BatchNorm2d(num_init_features))
            self.features.add_module("relu0", nn.ReLU(inplace=True))
            self.features.add_module("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        else:
            # CIFAR DenseNet-BC: a single 3x3 convolution; the first dense layer's BN-ReLU follows it.
            self.features.add_module("conv0", nn.Conv2d(3, num_init_features, kernel_size=3, stride=1, padding=1, bias=False))

        num_features = num_init_features
        for i, num_layers in enumerate(spec.block_config):
            self.features.add_module(
                f"denseblock{i + 1}",
                _DenseBlock(num_layers, num_features, bn_size, growth_rate, drop_rate, memory_efficient),
            )
            num_features += num_layers * growth_rate
            if i != len(spec.block_config) - 1:
                out_features = int(num_features * compression)
                self.features.add_module(f"transition{i + 1}", _Transition(num_features, out_features))
                num_features = out_features
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.num_features = num_features
        self.classifier = nn.Linear(num_features, num_classes)
        self._init_weights()

    # torchvision's initialisation, so a model built here trains like theirs.
    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    @property
    def num_classes(self) -> int:
        return self.classifier.out_features if isinstance(self.classifier, nn.Linear) else 0

    @property
    def memory_efficient(self) -> bool:
        return any(layer.memory_efficient for layer in self.modules() if isinstance(layer, _DenseLayer))

    def set_memory_efficient(self, enabled: bool = True) -> None:
        for layer in self.modules():
            if isinstance(layer, _DenseLayer):
                layer.memory_efficient = enabled

    def forward_features(self, x: Tensor) -> Tensor:
        """The final feature map after the last BN-ReLU: [N, num_features, H/32, W/32] on ImageNet."""
        return F.relu(self.features(x), inplace=True)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier for fine-tuning; 0 classes leaves an identity (pooled features out)."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if num_classes == 0:
            self.classifier = nn.Identity()
            return
        device = self.features.norm5.weight.device
        self.classifier = nn.Linear(self.num_features, num_classes, device=device)
        nn.init.constant_(self.classifier.bias, 0)


def create_model(name: str, num_classes: Optional[int] = None, memory_efficient: bool = False,
                 drop_rate: float = 0.0, **overrides) -> DenseNet:
    """Build a named DenseNet-BC; `overrides` replace spec fields (growth_rate, compression, ...)."""
    spec = get_spec(name, num_classes=num_classes, **overrides)
    return DenseNet(growth_rate=spec.growth_rate, block_config=spec.block_config,
                    num_init_features=spec.num_init_features, bn_size=spec.bn_size,
                    compression=spec.compression, stem=spec.stem, num_classes=spec.num_classes,
                    drop_rate=drop_rate, memory_efficient=memory_efficient)


def densenet121(**kwargs) -> DenseNet:
    return create_model("densenet121", **kwargs)


def densenet169(**kwargs) -> DenseNet:
    return create_model("densenet169", **kwargs)


def densenet201(**kwargs) -> DenseNet:
    return create_model("densenet201", **kwargs)


def densenet161(**kwargs) -> DenseNet:
    return create_model("densenet161", **kwargs)


def densenet_bc_100(**kwargs) -> DenseNet:
    return create_model("densenet_bc_100", **kwargs)


def densenet_tiny(**kwargs) -> DenseNet:
    return create_model("densenet_tiny", **kwargs)
