"""One pass over the validation set: top-1, top-5 and loss, every readable image counted once
across ranks, the unreadable ones counted apart."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from torch import nn

from .distributed import DistInfo, all_reduce
from .inputs import DeviceNormalize


@dataclass
class EvalResult:
    top1: float
    top5: float
    loss: float
    count: int  # the images evaluated: the readable ones
    unreadable: int = 0  # validation files that could not be decoded, left out of everything above

    def as_dict(self, prefix: str = "") -> Dict[str, float]:
        return {f"{prefix}top1": self.top1, f"{prefix}top5": self.top5, f"{prefix}loss": self.loss,
                f"{prefix}count": self.count, f"{prefix}unreadable": self.unreadable}


@torch.no_grad()
def average_batchnorm_statistics(model: nn.Module, info: DistInfo) -> None:
    """Give every rank the mean of the ranks' BN running statistics.

    Each rank updates its running averages from its own batches (DDP only broadcasts rank 0's
    buffers before each training forward), so without this every rank would evaluate a slightly
    different network, and none of them exactly the one rank 0 then writes to the checkpoint.
    """
    if not info.is_distributed:
        return
    stats = [b for name, b in model.named_buffers() if name.endswith(("running_mean", "running_var"))]
    if not stats:
        return
    flat = torch.cat([b.reshape(-1).float() for b in stats])
    all_reduce(flat, info).div_(info.world_size)
    for b, mean in zip(stats, flat.split([b.numel() for b in stats])):
        b.copy_(mean.view_as(b))


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, *, info: DistInfo, normalize: DeviceNormalize,
             amp_dtype: Optional[torch.dtype]) -> EvalResult:
    """Top-1/top-5 and loss over the readable images of the validation set, each counted once across
    ranks; unreadable ones (flagged ``bad`` by the loader) are left out and counted apart.

    Runs the plain module, not the DDP wrapper: ranks may have different numbers of batches,
    and DDP's forward would wait for collectives the other ranks never join.
    """
    device = info.device
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # top1, top5, loss
    count = unreadable = 0  # counted on the host, from host tensors: no copy to the device per batch
    criterion = nn.CrossEntropyLoss(reduction="sum")
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    for images, targets, bad_mask in loader:
        batch_unreadable = int(bad_mask.sum())
        if batch_unreadable:
            # Dropped on the host, before the copy: the model never sees a placeholder, and the
            # batches without one (nearly all) pay nothing.
            unreadable += batch_unreadable
            images, targets = images[~bad_mask], targets[~bad_mask]
            if not len(targets):
                continue
        x = normalize(images)
        y = targets.to(device, non_blocking=True)
        with autocast:
            logits = model(x)
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top.eq(y.unsqueeze(1))
        sums += torch.cat([torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()]).double(),
                           criterion(logits, y).double().view(1)])
        count += targets.numel()
    model.train(was_training)
    totals = torch.cat([sums, torch.tensor([float(count), float(unreadable)], dtype=torch.float64, device=device)])
    top1, top5, loss, count, unreadable = all_reduce(totals, info).tolist()
    count, unreadable = int(count), int(unreadable)
    if count + unreadable != loader.num_samples:
        raise RuntimeError(f"evaluation saw {count} readable and {unreadable} unreadable images across ranks, "
                           f"{count + unreadable} in all, but the validation set has {loader.num_samples}; "
                           "the evaluation loader must visit every image exactly once")
    if count == 0 and unreadable:
        raise RuntimeError(f"none of the {unreadable} validation images could be read; the dataset looks broken "
                           "(wrong folder, unfinished copy or unmounted filesystem?)")
    n = max(count, 1)
    return EvalResult(top1=100.0 * top1 / n, top5=100.0 * top5 / n, loss=loss / n, count=count,
                      unreadable=unreadable)
