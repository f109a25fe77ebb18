"""Reading and writing DenseNet weights: our checkpoints, our exports and torchvision's weight files.

Our parameter names are torchvision's, so the only conversions are the legacy `norm.1`-style keys
of old torchvision files and the `module.` / `_orig_mod.` prefixes that DDP and torch.compile add
when a state_dict is taken from the wrapper instead of the model.

`read_weights(path)` reads any of them into a `WeightsFile`: the state_dict plus what the file
knows about it (architecture, training image size, class count). Every problem with the file (it
is missing, it is not a complete torch file, it holds something other than DenseNet weights, it has
no EMA weights when they were asked for) is a `WeightsError` with a one-line message that names the
file and the problem.

An export is a bare state_dict, so `torchvision.models.densenet121().load_state_dict(torch.load(f))`
takes it as it is; the architecture, image size and class count ride along in the state_dict's
`_metadata` (the attribute `nn.Module.state_dict()` itself uses, which `load_state_dict` reads per
module prefix and so ignores under a name that is no module's), where `read_weights` finds them.

Command line:
    python -m densenet.weights export CHECKPOINT OUT.pth         # a file torchvision's model loads
    python -m densenet.weights export CHECKPOINT OUT.pth --ema   # the EMA weights of a run with --ema
"""

from __future__ import annotations

import argparse
import io
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor

from data.files import atomic_write_bytes

from .specs import MODEL_SPECS, DenseNetSpec

StateDict = Dict[str, Tensor]
PathLike = Union[str, os.PathLike]

# Old torchvision files name dense-layer modules `norm.1`, `conv.2`, ...; dots are no longer allowed
# in module names, so those keys become `norm1`, `conv2`.
_LEGACY_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_LAYER_CONV1 = re.compile(r"^features\.denseblock(\d+)\.denselayer(\d+)\.conv1\.weight$")

# The `_metadata` entry of an exported state_dict that carries what the file knows about itself.
EXPORT_METADATA_KEY = "densenet_dist"
EXPORT_FORMAT = 1
# Keys under which other trainers (timm, DeiT-style scripts) keep the model weights in a dict.
_WRAPPED_KEYS = ("model", "state_dict")
_WRAPPED_EMA_KEYS = ("ema", "model_ema", "state_dict_ema")


class WeightsError(ValueError):
    """A weights file is missing, unreadable, or does not hold what was asked for (one-line message)."""


class WeightsNotFoundError(WeightsError, FileNotFoundError):
    """The weights file does not exist (also a FileNotFoundError, as it always was)."""


@dataclass(frozen=True)
class WeightsFile:
    """What `read_weights` found in one file.

    path:        the file, as given.
    state_dict:  the model weights in torchvision naming (prefixes stripped, legacy keys renamed).
    arch:        the model name the file records (our checkpoints and exports); for other files the
                 named model (densenet.list_models()) whose structure the weights match; else None.
    image_size:  the image size the weights were trained at, where the file records it; else None.
    num_classes: rows of the classifier (0 when the file has no classifier).
    source:      what the file is: "checkpoint" (written by train_dist.py), "export" (written by
                 `python -m densenet.weights export`), "state_dict" (a bare state_dict, such as
                 torchvision's weight files) or "wrapped" (another trainer's dict holding a state_dict
                 under "model" / "state_dict" / "model_ema" ...).
    ema:         whether state_dict holds EMA weights.
    classes:     the class ids (wnids) of the classifier's rows, in order, where the file records
                 them (our checkpoints and exports); else None.
    """

    path: str
    state_dict: StateDict
    arch: Optional[str]
    image_size: Optional[int]
    num_classes: int
    source: str
    ema: bool = False
    classes: Optional[Tuple[str, ...]] = None


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


def _describe(obj: Any) -> str:
    what = type(obj).__name__
    if isinstance(obj, Mapping):
        what += f" with keys {sorted(map(str, obj))[:8]}"
    return what


def _not_densenet(source: str, obj: Any) -> WeightsError:
    return WeightsError(
        f"{source} is not a DenseNet checkpoint: expected a checkpoint written by train_dist.py "
        f"(a dict with a 'model' state_dict), an export of one, or a torchvision DenseNet weight file "
        f"(keys like 'features.conv0.weight', 'features.denseblock1...'), found {_describe(obj)}")


# --- the structure of a state_dict -----------------------------------------------------------------

def _structure_of_weights(sd: Mapping[str, Tensor]) -> Optional[Tuple[Any, ...]]:
    """(stem, stem width, growth rate, bottleneck width, layers per block, transition widths), read
    from the shapes of a normalised state_dict; None where a key it needs is missing."""
    try:
        conv0 = sd["features.conv0.weight"]
        layers: Dict[int, int] = {}
        for key in sd:
            m = _LAYER_CONV1.match(key)
            if m:
                block, layer = int(m.group(1)), int(m.group(2))
                layers[block] = max(layers.get(block, 0), layer)
        blocks = tuple(layers[b] for b in range(1, len(layers) + 1))
        growth = int(sd["features.denseblock1.denselayer1.conv2.weight"].shape[0])
        bottleneck = int(sd["features.denseblock1.denselayer1.conv1.weight"].shape[0])
        transitions = tuple(int(sd[f"features.transition{b}.conv.weight"].shape[0]) for b in range(1, len(blocks)))
    except (KeyError, IndexError, AttributeError):
        return None
    stem = "imagenet" if tuple(conv0.shape[-2:]) == (7, 7) else "cifar"
    return stem, int(conv0.shape[0]), growth, bottleneck, blocks, transitions


def _structure_of_spec(spec: DenseNetSpec) -> Tuple[Any, ...]:
    channels, transitions = spec.num_init_features, []
    for i, n in enumerate(spec.block_config):
        channels += n * spec.growth_rate
        if i != len(spec.block_config) - 1:
            channels = int(channels * spec.compression)  # as the model builds it
            transitions.append(channels)
    return (spec.stem, spec.num_init_features, spec.growth_rate, spec.bn_size * spec.growth_rate,
            tuple(spec.block_config), tuple(transitions))


def infer_arch(state_dict: Mapping[str, Tensor]) -> Optional[str]:
    """The named model (densenet.list_models()) whose layers these weights have, or None. The class
    count is not part of the match: a densenet121 with 10 classes is a densenet121."""
    found = _structure_of_weights(normalize_keys(state_dict))
    if found is None:
        return None
    matches = [name for name, spec in sorted(MODEL_SPECS.items()) if _structure_of_spec(spec) == found]
    return matches[0] if matches else None


def _num_classes(sd: Mapping[str, Tensor]) -> int:
    classifier = sd.get("classifier.weight")
    return int(classifier.shape[0]) if isinstance(classifier, Tensor) and classifier.dim() == 2 else 0


# --- reading ----------------------------------------------------------------------------------------

def _int_or_none(value: Any) -> Optional[int]:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _interpret(obj: Any, source: str, ema: bool = False) -> WeightsFile:
    """The WeightsFile of an object loaded from `source` (a name used in messages)."""
    arch: Optional[str] = None
    image_size: Optional[int] = None
    classes: Any = None
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping) and isinstance(obj.get("arch"), str):
        # A checkpoint of ours: arch and config as plain data, EMA weights under "ema" (or None).
        kind, arch, classes = "checkpoint", obj["arch"], obj.get("classes")
        config = obj.get("config")
        image_size = _int_or_none(config.get("image_size")) if isinstance(config, Mapping) else None
        candidate = obj.get("ema") if ema else obj["model"]
        if ema and not isinstance(candidate, Mapping):
            raise WeightsError(f"{source} has no EMA weights (its run was trained without --ema); "
                               "leave out --ema to use the model weights")
    elif _is_densenet_state_dict(obj):
        meta = getattr(obj, "_metadata", None)
        meta = meta.get(EXPORT_METADATA_KEY) if isinstance(meta, Mapping) else None
        if isinstance(meta, Mapping):
            kind = "export"
            arch = meta.get("arch") if isinstance(meta.get("arch"), str) else None
            image_size = _int_or_none(meta.get("image_size"))
            classes = meta.get("classes")
            if ema and not meta.get("ema"):
                raise WeightsError(f"{source} is an export of a run's model weights, not of its EMA weights; "
                                   "leave out --ema")
            ema = bool(meta.get("ema"))
        else:
            kind = "state_dict"
            if ema:
                raise WeightsError(f"{source} is a bare state_dict (a torchvision-style weight file): it has "
                                   "no EMA weights; leave out --ema")
        candidate = obj
    elif isinstance(obj, Mapping):
        kind = "wrapped"
        keys = _WRAPPED_EMA_KEYS if ema else _WRAPPED_KEYS + _WRAPPED_EMA_KEYS
        candidate = next((obj[k] for k in keys if isinstance(obj.get(k), Mapping)), None)
        if candidate is None and ema and any(isinstance(obj.get(k), Mapping) for k in _WRAPPED_KEYS):
            raise WeightsError(f"{source} has no EMA weights (no {' / '.join(map(repr, _WRAPPED_EMA_KEYS))} "
                               "entry); leave out --ema to use the model weights")
    else:
        candidate = None
    if not isinstance(candidate, Mapping):
        raise _not_densenet(source, obj)
    state_dict = normalize_keys(candidate)
    if not _is_densenet_state_dict(state_dict):
        raise _not_densenet(source, obj if kind == "wrapped" else candidate)
    return WeightsFile(path=source, state_dict=dict(state_dict), arch=arch or infer_arch(state_dict),
                       image_size=image_size, num_classes=_num_classes(state_dict), source=kind, ema=ema,
                       classes=_class_ids(classes, _num_classes(state_dict)))


def _class_ids(classes: Any, num_classes: int) -> Optional[Tuple[str, ...]]:
    """A recorded class list, when it is one and names every row of the classifier."""
    if isinstance(classes, (list, tuple)) and len(classes) == num_classes and all(isinstance(c, str) for c in classes):
        return tuple(classes)
    return None


def serialize(obj: Any) -> bytes:
    """torch.save into bytes: written once, to as many files as need them (atomic_write_bytes)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def load_torch_file(path: PathLike, what: str = "weights file") -> Any:
    """torch.load on the CPU with weights_only=True, the one way this project reads a .pt file;
    WeightsError (WeightsNotFoundError when missing) names the file, the problem and what a good
    ``what`` (a weights file, a checkpoint) is."""
    path = Path(path)
    if not path.exists():
        raise WeightsNotFoundError(f"{what} not found: {path}")
    if not path.is_file():
        raise WeightsError(f"{path} is not a file (a {what} is one .pt/.pth file)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle of arbitrary objects, not a torch file at all
        lines = str(exc).strip().splitlines()
        # torch's own first sentence only: after it, weights_only failures go on to suggest
        # weights_only=False, which is no fix for a file that is not a checkpoint at all.
        detail = lines[0].split(". ")[0][:200] if lines else "no further detail"
        raise WeightsError(
            f"{path} could not be read as a PyTorch {what} ({type(exc).__name__}: {detail}); "
            f"is it a complete .pt/.pth file written by torch.save?"
        ) from None


def read_weights(path: PathLike, *, ema: bool = False) -> WeightsFile:
    """The DenseNet weights in `path` (a checkpoint of ours, an export, a torchvision weight file)
    and what the file records about them; `ema=True` takes a checkpoint's EMA weights instead of the
    model's. Raises WeightsError (WeightsNotFoundError for a missing file)."""
    return _interpret(load_torch_file(path), str(path), ema=ema)


def extract_state_dict(obj: Any, source: str = "<object>") -> StateDict:
    """The model state_dict held by a loaded file: a checkpoint of ours (`{"model": ...}`), a
    timm/torchvision-style `{"state_dict": ...}` wrapper, or a bare state_dict."""
    return _interpret(obj, source).state_dict


def load_state_dict_file(path: PathLike) -> StateDict:
    """The model weights, in our (torchvision) naming, from a checkpoint of ours or a torchvision file."""
    return read_weights(path).state_dict


def load_weights(model: torch.nn.Module, path: PathLike, strict: bool = True) -> None:
    """Load a weight file into `model` (or its DDP/compiled wrapper), with strict key matching."""
    target = getattr(model, "_orig_mod", model)
    target = getattr(target, "module", target)
    state_dict = load_state_dict_file(path)
    try:
        target.load_state_dict(state_dict, strict=strict)
    except RuntimeError as exc:
        raise WeightsError(f"{path} does not fit this model (different architecture or class count?): "
                           f"{str(exc).splitlines()[0]}") from None


# --- writing ----------------------------------------------------------------------------------------

def export_torchvision(src: Union[PathLike, Mapping[str, Any]], out: PathLike, *, ema: bool = False) -> Path:
    """Write a bare state_dict that `torchvision.models.densenetXXX().load_state_dict` accepts, with
    the architecture, image size and class count in its `_metadata` (see the module docstring).

    `src` is a file or an already loaded checkpoint / state_dict; `ema=True` exports a checkpoint's
    EMA weights. The file is written to a temporary name and renamed, so an interrupted export never
    leaves a half-written file under the final name; it gets the permissions a plain open() gives
    (0o666 less the umask).
    """
    found = _interpret(src, "<object>", ema=ema) if isinstance(src, Mapping) else read_weights(src, ema=ema)
    out = Path(out)
    if out.is_dir():
        raise WeightsError(f"{out} is a folder; give the name of the file to write")
    state_dict: "OrderedDict[str, Tensor]" = OrderedDict(
        (k, v.detach().cpu().contiguous()) for k, v in found.state_dict.items())
    state_dict._metadata = OrderedDict({EXPORT_METADATA_KEY: {  # type: ignore[attr-defined]
        "format": EXPORT_FORMAT, "arch": found.arch, "image_size": found.image_size,
        "num_classes": found.num_classes, "ema": found.ema,
        "classes": list(found.classes) if found.classes else None}})
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, serialize(state_dict))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m densenet.weights", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="write a torchvision-loadable state_dict from a checkpoint")
    exp.add_argument("checkpoint", help="a checkpoint written by train_dist.py (or any weights file read_weights reads)")
    exp.add_argument("out", help="the .pth file to write")
    exp.add_argument("--ema", action="store_true",
                     help="export the checkpoint's EMA weights (a run trained with --ema) instead of its model weights")
    args = parser.parse_args(argv)
    try:
        out = export_torchvision(args.checkpoint, args.out, ema=args.ema)
        found = read_weights(out)
    except WeightsError as exc:
        parser.exit(2, f"error: {exc}\n")
    except OSError as exc:  # the output folder is not writable, the disk is full...
        parser.exit(2, f"error: could not write {args.out}: {exc}\n")
    what = f"{found.arch or 'DenseNet'}, {found.num_classes} classes" + (", EMA weights" if found.ema else "")
    print(f"wrote {out} ({what})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
