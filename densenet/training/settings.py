"""What a run's settings come to on this process, decided once after distributed init.

The config says what the user asked for ("auto", "on for CUDA", "null: the default"); what that
means depends on the device and the launcher. ``resolve_settings`` turns it into one frozen
``RunSettings`` that every part reads, so no part decides again (and no two parts decide
differently). ``configure_backends`` and ``seed_all`` set the process-wide state that follows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .config import Config, ConfigError
from .distributed import DistInfo, default_workers


@dataclass(frozen=True)
class RunSettings:
    device: torch.device
    amp_dtype: Optional[torch.dtype]  # the autocast dtype, None for full precision
    channels_last: bool  # the model and its inputs in NHWC
    workers: int  # data-loader workers of this process
    pin_memory: bool  # page-locked host batches (CUDA only)
    decode_on: Optional[torch.device]  # where JPEGs are decoded when not in the loader workers
    rank_seed: int  # this rank's seed once the (identical) initial weights are built


def resolve_settings(cfg: Config, info: DistInfo) -> RunSettings:
    """ConfigError for settings this device cannot honour, else what they mean here."""
    cuda = info.device.type == "cuda"
    if cfg.sync_bn and not cuda:
        raise ConfigError("sync_bn: SyncBatchNorm needs CUDA; drop --sync-bn on the CPU")
    return RunSettings(
        device=info.device,
        amp_dtype=resolve_amp(cfg.amp, info.device),
        channels_last=cfg.channels_last if cfg.channels_last is not None else cuda,
        workers=cfg.workers if cfg.workers is not None else default_workers(info),
        pin_memory=cfg.pin_memory and cuda,
        decode_on=info.device if cfg.decode == "device" else None,
        rank_seed=cfg.seed + 1000 * info.rank,
    )


def resolve_amp(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of --amp on this device, or None for full precision."""
    if amp == "auto":
        if device.type != "cuda":
            return None
        return auto_amp_dtype(native_bf16(device))
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("amp: fp16 needs CUDA (it relies on a CUDA GradScaler); "
                          "use --amp bf16 or --amp off on the CPU")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def native_bf16(device: torch.device) -> bool:
    """Whether the GPU computes in bfloat16 natively. Plain ``is_bf16_supported()`` also says yes
    where bf16 is only emulated (Volta, Turing), which would run every layer several times slower."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # a torch without the argument: ask the hardware
        return torch.cuda.get_device_capability(device) >= (8, 0)


def auto_amp_dtype(bf16_is_native: bool) -> torch.dtype:
    """--amp auto on CUDA: bf16 where it is native (no loss scaling needed), else fp16."""
    return torch.bfloat16 if bf16_is_native else torch.float16


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process, as a caching allocator would; True if
    it accepted. By default glibc returns every large freed block to the OS, so each CPU training
    step faults its activations in again (measured in docs/training.md, on the CPU). Other C libraries
    (musl, macOS) are left alone."""
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    # A threshold of -1 reaches glibc as the largest size_t: the heap top is never trimmed.
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, -1))


def configure_backends(cfg: Config, device: torch.device) -> None:
    if device.type == "cpu" and cfg.cpu_keep_memory:
        keep_freed_memory()
    if cfg.deterministic:
        # Exact on the CPU. On CUDA a few backward kernels (adaptive average pooling among them) have no
        # deterministic version: warn about them rather than refuse to train.
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark  # fixed input sizes: autotuning pays off at once
    if device.type == "cuda":
        # TF32 for the float32 work (fp32 runs, and what autocast keeps in float32). PyTorch allows it
        # for cuDNN convolutions but not for matmuls by default; one switch sets both.
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32


def seed_all(seed: int) -> None:
    """Seed torch (all devices), numpy and random; numpy's global RNG drives timm's Mixup."""
    import random

    import numpy as np

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
