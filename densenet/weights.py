"""Reading and writing DenseNet weights: our checkpoints and torchvision's weight files.

Our parameter names are torchvision's, so the only conversions are the legacy `norm.1`-style keys
of old torchvision files and the `module.` / `_orig_mod.` prefixes that DDP and torch.compile add
when a state_dict is taken from the wrapper instead of the model.

Command line:
    python -m densenet.weights export CHECKPOINT OUT.pth   # a file torchvision's model loads
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping, Union

import torch
from torch import Tensor

StateDict = Dict[str, Tensor]

# Old torchvision files name dense-layer modules `norm.1`, `conv.2`, ...; dots are no longer allowed
# in module names, so those keys become `norm1`, `conv2`.
_LEGACY_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def normalize_keys(state_dict: Mapping[str, Tensor]) -> StateDict:
    """torchvision-style keys: legacy names renamed, DDP / compile prefixes removed."""
    out: StateDict = {}
    for key, value in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        match = _LEGACY_KEY.match(key)
        if match:
            key = match.group(1) + match.group(2)
        out[key] = value
    return out


def _is_densenet_state_dict(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
            and any(k.endswith("features.conv0.weight") for k in obj)
            and any("denseblock1." in k for k in obj))


def extract_state_dict(obj: Any, source: str = "<object>") -> StateDict:
    """The model state_dict held by a loaded file: a checkpoint of ours (`{"model": ...}`), a
    timm/torchvision-style `{"state_dict": ...}` wrapper, or a bare state_dict."""
    candidate = obj
    if isinstance(obj, Mapping) and not _is_densenet_state_dict(obj):
        for key in ("model", "state_dict", "model_ema", "state_dict_ema"):
            if key in obj and isinstance(obj[key], Mapping):
                candidate = obj[key]
                break
    if isinstance(candidate, Mapping):
        candidate = normalize_keys(candidate)
    if not _is_densenet_state_dict(candidate):
        what = type(obj).__name__
        if isinstance(obj, Mapping):
            what += f" with keys {sorted(map(str, obj))[:8]}"
        raise ValueError(
            f"{source} is not a DenseNet checkpoint: expected a checkpoint written by train_dist.py "
            f"(a dict with a 'model' state_dict) or a torchvision DenseNet weight file "
            f"(keys like 'features.conv0.weight', 'features.denseblock1...'), found {what}"
        )
    return dict(candidate)


def load_checkpoint_file(path: Union[str, os.PathLike]) -> Any:
    """torch.load with weights_only=True and errors that name the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle of arbitrary objects, not a torch file at all
        detail = str(exc).splitlines()[0] if str(exc) else "no further detail"
        raise ValueError(
            f"{path} could not be read as a PyTorch weights file ({type(exc).__name__}: {detail}); "
            f"is it a complete .pt/.pth file written by torch.save?"
        ) from exc


def load_state_dict_file(path: Union[str, os.PathLike]) -> StateDict:
    """The model weights, in our (torchvision) naming, from a checkpoint of ours or a torchvision file."""
    return extract_state_dict(load_checkpoint_file(path), source=str(path))


def load_weights(model: torch.nn.Module, path: Union[str, os.PathLike], strict: bool = True) -> None:
    """Load a weight file into `model` (or its DDP/compiled wrapper), with strict key matching."""
    target = getattr(model, "_orig_mod", model)
    target = getattr(target, "module", target)
    state_dict = load_state_dict_file(path)
    try:
        target.load_state_dict(state_dict, strict=strict)
    except RuntimeError as exc:
        raise ValueError(f"{path} does not fit this model (different architecture or class count?): {exc}") from exc


def export_torchvision(src: Union[str, os.PathLike, Mapping[str, Tensor]], out: Union[str, os.PathLike]) -> Path:
    """Write a bare state_dict that `torchvision.models.densenetXXX().load_state_dict` accepts.

    The file is written to a temporary name and renamed, so an interrupted export never leaves a
    half-written file under the final name.
    """
    state_dict = load_state_dict_file(src) if not isinstance(src, Mapping) else extract_state_dict(src)
    state_dict = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state_dict, tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m densenet.weights", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="write a torchvision-loadable state_dict from a checkpoint")
    exp.add_argument("checkpoint")
    exp.add_argument("out")
    args = parser.parse_args(argv)
    try:
        out = export_torchvision(args.checkpoint, args.out)
    except (ValueError, FileNotFoundError) as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
