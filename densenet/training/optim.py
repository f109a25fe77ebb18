"""Optimizer and learning-rate schedule.

The schedule is a pure function of the global optimizer step, so its whole state is that step:
resuming needs nothing else, and a changed --lr or --epochs on resume takes effect as written.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, List, Tuple

import timm.optim
import torch
from torch import nn

from .config import Config, ConfigError

BASE_BATCH = 256  # base_lr is per this many images (Goyal et al.'s linear scaling rule)


def scaling_rule(lr_scaling: str, optimizer: str) -> str:
    """'linear' or 'sqrt': timm's train.py rule for ``auto``: the square root of the batch ratio for
    adaptive optimizers (AdamW, LAMB), linear for SGD and LARS (Goyal et al., arXiv 1706.02677)."""
    if lr_scaling != "auto":
        return lr_scaling
    return "sqrt" if optimizer in ("adamw", "lamb") else "linear"


def lr_scaling_rule(cfg: Config) -> str:
    return scaling_rule(cfg.lr_scaling, cfg.optimizer)


def scaled_lr(base_lr: float, rule: str, global_batch: int) -> float:
    ratio = global_batch / BASE_BATCH
    return base_lr * (math.sqrt(ratio) if rule == "sqrt" else ratio)


def peak_lr(cfg: Config, global_batch: int) -> float:
    return cfg.lr if cfg.lr is not None else scaled_lr(cfg.base_lr, lr_scaling_rule(cfg), global_batch)


def _param_groups(model: nn.Module, weight_decay: float, decay_norm_bias: bool) -> List[Dict]:
    if decay_norm_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            # 1-d tensors are norm scales/shifts and biases: decaying them only fights normalisation.
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def optimizer_kernels(impl: str, device_type: str) -> Dict[str, bool]:
    """Keyword arguments that pick the optimizer's kernels. Fused kernels update every parameter in a
    few launches, which matters on a GPU where DenseNet's ~360 small tensors would otherwise cost
    one launch each per buffer; on the CPU PyTorch's own choice is as fast."""
    if impl == "auto":
        impl = "fused" if device_type == "cuda" else "default"
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}.get(impl, {})


def kernels_in_use(optimizer: torch.optim.Optimizer) -> str:
    """'fused', 'foreach' or 'loop', as PyTorch resolves the optimizer's settings for its parameters."""
    if optimizer.defaults.get("fused"):
        return "fused"
    foreach = optimizer.defaults.get("foreach")
    if foreach is None:  # PyTorch's default: foreach when every parameter is on a GPU
        params = [p for g in optimizer.param_groups for p in g["params"]]
        foreach = bool(params) and all(p.is_cuda for p in params)
    return "foreach" if foreach else "loop"


def build_optimizer(model: nn.Module, cfg: Config, lr: float) -> torch.optim.Optimizer:
    groups = _param_groups(model, cfg.weight_decay, cfg.weight_decay_norm_bias)
    device_type = next(model.parameters()).device.type
    kernels = optimizer_kernels(cfg.optimizer_impl, device_type)
    try:
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                                   **kernels)
        if cfg.optimizer == "lamb":
            # timm's LAMB clips the global gradient norm at 1 itself (its max_grad_norm), as the paper does.
            return timm.optim.Lamb(groups, lr=lr, **kernels)
        if cfg.optimizer == "lars":
            # Parameters without weight decay (norms, biases) get plain momentum SGD: timm's LARS adapts
            # a parameter's step by its trust ratio only where it decays it, as You et al. exclude them.
            return timm.optim.Lars(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                                   **kernels)
        return torch.optim.AdamW(groups, lr=lr, **kernels)
    except (RuntimeError, TypeError, ValueError) as e:
        if cfg.optimizer_impl == "auto":  # an older PyTorch without this fused kernel: the next best
            return build_optimizer(model, dataclasses.replace(cfg, optimizer_impl="foreach"), lr)
        raise ConfigError(f"optimizer_impl: {cfg.optimizer_impl} {cfg.optimizer} is not available on "
                          f"{device_type} with this PyTorch ({e}); use --optimizer-impl auto") from None


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: Dict) -> None:
    """Restore the optimizer's buffers (momentum, Adam moments) but keep this run's hyperparameters,
    so that a config change on resume (say, weight decay) is applied rather than silently undone."""
    current: List[Dict] = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    saved = state["param_groups"]
    if len(saved) == len(current):  # otherwise load_state_dict reports the mismatch
        # Before loading, so that PyTorch places `step` by this run's fused/capturable flags, not the
        # checkpoint's (fused kernels need it as float32 on the parameter's device).
        state = {**state, "param_groups": [{**s, **h} for s, h in zip(saved, current)]}
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        step_on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            buffers = optimizer.state.get(p, {})
            for key, t in buffers.items():
                if not torch.is_tensor(t):
                    continue
                if key == "step" and not step_on_device and t.device.type != "cpu":
                    # Loop/foreach kernels read a device step back with one sync per parameter.
                    buffers[key] = t.cpu()
                elif t.shape == p.shape and t.stride() != p.stride():
                    # load_state_dict keeps the checkpoint's layout (say, channels_last): fused
                    # kernels refuse mismatched strides on CUDA and compute wrong updates on the CPU.
                    buffers[key] = torch.empty_like(p, dtype=t.dtype, memory_format=torch.preserve_format).copy_(t)


@dataclass(frozen=True)
class LRSchedule:
    peak_lr: float
    kind: str  # "step" or "cosine"
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    milestone_steps: Tuple[int, ...]
    gamma: float
    min_lr: float

    @classmethod
    def from_config(cls, cfg: Config, peak: float, steps_per_epoch: int) -> "LRSchedule":
        return cls(peak_lr=peak, kind=cfg.lr_schedule, steps_per_epoch=steps_per_epoch,
                   total_steps=cfg.epochs * steps_per_epoch,
                   warmup_steps=int(round(cfg.warmup_epochs * steps_per_epoch)),
                   milestone_steps=tuple(m * steps_per_epoch for m in cfg.lr_milestones),
                   gamma=cfg.lr_gamma, min_lr=cfg.min_lr)

    def __call__(self, step: int) -> float:
        """Learning rate of optimizer step number `step` (0-based)."""
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        if self.kind == "step":
            return self.peak_lr * self.gamma ** sum(step >= m for m in self.milestone_steps)
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return self.min_lr + 0.5 * (self.peak_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
