"""The trainer's and the evaluation's inputs: uint8 host batches made normalised device batches."""
from __future__ import annotations

from typing import Sequence

import torch


class DeviceNormalize:
    """uint8 NCHW batch on the host -> normalised float batch on the device."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device, channels_last: bool):
        self.device = device
        self.channels_last = channels_last
        # Folding the 1/255 into mean and std saves one full pass over the batch.
        self.mean = torch.tensor([255.0 * m for m in mean], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor([255.0 * s for s in std], device=device).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return (x.float() - self.mean) / self.std
