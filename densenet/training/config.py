"""The one typed configuration of a training run.

Values are resolved in this order, each step overriding the previous one:

1. the dataclass defaults below, which are the paper's ImageNet recipe
   (SGD + Nesterov 0.9, lr 0.1 per 256 images, weight decay 1e-4, 90 epochs, lr / 10 at 30 and 60);
2. the built-in recipe named by ``recipe`` (``paper`` changes nothing, ``modern`` is in RECIPES);
3. a flat YAML file given with ``--config FILE`` (a run folder's ``config.yaml`` works as one);
4. command-line flags, spelled like the keys with dashes (``--batch-size`` sets ``batch_size``);
   the spellings of torchvision's reference trainer and timm's train.py work too (ALIASES).

Unknown keys and flags, values of the wrong type or outside their choices are one-line errors that
name the key (and the closest known one). Nothing here imports torch, so ``--help`` and a mistyped
flag are answered at once, before the seconds that importing torch takes on a cold node.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, FrozenSet, List, Mapping, NoReturn, Optional, Sequence, Tuple

import yaml

from data.files import atomic_write_bytes

from ..specs import get_spec, list_models, min_image_size
from .resolution import train_sizes


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names the key and the fix."""


# Flags of torchvision's reference trainer (references/classification/train.py) and timm's train.py
# that mean the same as one of ours, so that the commands people already type work here too.
ALIASES: Dict[str, Tuple[str, ...]] = {
    "arch": ("--model",),
    "data": ("--data-path", "--data-dir"),
    "output_dir": ("--output",),
    "batch_size": ("-b",),
    "eval_batch_size": ("-vb", "--validation-batch-size"),
    "workers": ("-j",),
    "optimizer": ("--opt",),
    "base_lr": ("--lr-base",),
    "lr_scaling": ("--lr-base-scale",),
    "weight_decay": ("--wd",),
    "lr_schedule": ("--sched",),
    "warmup_epochs": ("--lr-warmup-epochs",),
    "min_lr": ("--lr-min",),
    "label_smoothing": ("--smoothing",),
    "mixup": ("--mixup-alpha",),
    "cutmix": ("--cutmix-alpha",),
    "auto_augment": ("--aa",),
    "random_erasing": ("--random-erase", "--reprob"),
    "drop_rate": ("--drop",),
    "grad_clip": ("--clip-grad-norm", "--clip-grad"),
    "accum_steps": ("--grad-accum-steps",),
    "ema": ("--model-ema",),
    "ema_decay": ("--model-ema-decay",),
    "image_size": ("--img-size",),
    "eval_resize": ("--val-resize-size",),
    "pin_memory": ("--pin-mem",),
    "deterministic": ("--use-deterministic-algorithms",),
    "keep_epochs": ("--checkpoint-hist",),
    "log_every": ("--print-freq", "--log-interval"),
    "evaluate": ("--test-only",),
    "weights": ("--initial-checkpoint",),
}


def _opt(default: Any, help: str, choices: Optional[Sequence[str]] = None) -> Any:
    meta = {"help": help, "choices": tuple(choices) if choices else None}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Config:
    # --- what to train, on what, and where the run folder is
    recipe: str = _opt("paper", "built-in recipe applied before --config and flags (docs/training.md, recipes)",
                       ("paper", "modern", "fast", "large-batch"))
    arch: str = _opt("densenet121", "model name: " + ", ".join(list_models()))
    data: str = _opt("", "ImageNet root with train/ and val/, or 'demo' for the built-in demo data")
    output_dir: str = _opt("", "run folder for checkpoints, logs and W&B files (default: runs/<arch>)")
    num_classes: Optional[int] = _opt(None, "classifier size (default: number of classes in the data)")
    drop_rate: float = _opt(0.0, "dropout rate after each dense layer")
    memory_efficient: bool = _opt(False, "recompute concatenations in backward to save memory")

    # --- optimisation (defaults: the paper)
    epochs: int = _opt(90, "number of epochs")
    max_steps: Optional[int] = _opt(None, "stop after this many optimizer steps in total (for quick runs)")
    batch_size: int = _opt(32, "images per process per step (8 processes x 32 = the paper's 256)")
    accum_steps: int = _opt(1, "micro-batches accumulated into one optimizer step")
    base_lr: float = _opt(0.1, "learning rate per 256 images, scaled to the global batch by lr_scaling")
    lr: Optional[float] = _opt(None, "peak learning rate as is (overrides the scaled base_lr)")
    lr_scaling: str = _opt("auto", "how the peak lr grows with the global batch: linear, sqrt, or auto = linear "
                           "for sgd and lars, sqrt for adamw and lamb (timm's rule)", ("auto", "linear", "sqrt"))
    optimizer: str = _opt("sgd", "optimizer: torch's SGD and AdamW, timm's LAMB and LARS (large global batches)",
                          ("sgd", "adamw", "lamb", "lars"))
    momentum: float = _opt(0.9, "SGD momentum")
    nesterov: bool = _opt(True, "Nesterov momentum for SGD")
    weight_decay: float = _opt(1e-4, "weight decay")
    weight_decay_norm_bias: bool = _opt(True, "weight decay on normalisation weights and biases too (the paper)")
    lr_schedule: str = _opt("step", "learning rate schedule over optimizer steps", ("step", "cosine"))
    lr_milestones: List[int] = _opt([30, 60], "epochs at which the step schedule multiplies lr by lr_gamma")
    lr_gamma: float = _opt(0.1, "factor of the step schedule at each milestone")
    warmup_epochs: float = _opt(0.0, "linear warmup from ~0 to the peak lr over this many epochs")
    min_lr: float = _opt(0.0, "final learning rate of the cosine schedule")
    grad_clip: Optional[float] = _opt(None, "clip the global gradient norm to this value")
    label_smoothing: float = _opt(0.0, "label smoothing of the cross-entropy loss")
    mixup: float = _opt(0.0, "mixup alpha (0 = off), timm's Mixup")
    cutmix: float = _opt(0.0, "cutmix alpha (0 = off), timm's Mixup")
    ema: bool = _opt(False, "keep an exponential moving average of the weights (timm) and evaluate it")
    ema_decay: float = _opt(0.9999, "EMA decay per optimizer step")

    # --- data pipeline
    image_size: int = _opt(224, "training crop size (the last one, with progressive resizing) and, unless "
                           "eval_image_size says otherwise, the evaluation centre crop")
    train_size_start: Optional[float] = _opt(None, "progressive resizing: the training crop starts at this fraction "
                                             "of image_size and rises to image_size over train_size_ramp (default: off)")
    train_size_ramp: List[float] = _opt([0.74, 0.86], "progressive resizing: the fractions of the epochs at which the "
                                        "crop starts and stops growing (FFCV's ResNet-50 recipe: epochs 65 and 76 of 88)")
    train_size_multiple: int = _opt(32, "progressive resizing: crop sizes on the ramp are rounded to a multiple of this")
    eval_image_size: Optional[int] = _opt(None, "evaluation centre crop (default: image_size); above the training "
                                          "size scores higher after low-resolution training (FixRes)")
    eval_resize: Optional[int] = _opt(None, "evaluation resize before the centre crop (default: floor(crop / 0.875), 224 -> 256)")
    eval_batch_size: Optional[int] = _opt(None, "images per process per evaluation step (default: batch_size)")
    workers: Optional[int] = _opt(None, "data loader workers per training process (default: its share of the "
                                  "CPUs, at most 8)")
    decode: str = _opt("cpu", "where training JPEGs are decoded: by the loader workers (cpu) or in batches on the "
                       "training device (device: workers only read files; for nodes with few CPU cores per GPU)",
                       ("cpu", "device"))
    auto_augment: Optional[str] = _opt(None, "timm augmentation policy, e.g. rand-m9-mstd0.5")
    random_erasing: float = _opt(0.0, "random erasing probability")
    aug_repeats: int = _opt(1, "repeated augmentation: each training image this many times per epoch, differently "
                            "augmented, on different processes (DeiT's RASampler; 1 = off; image folders only)")

    # --- speed and numerics
    device: str = _opt("auto", "device type: CUDA when available, else the CPU", ("auto", "cuda", "cpu"))
    amp: str = _opt("auto", "mixed precision: auto = bf16 where the GPU supports it, off on the CPU",
                    ("auto", "bf16", "fp16", "off"))
    channels_last: Optional[bool] = _opt(None, "channels-last memory format (default: on for CUDA)")
    compile: bool = _opt(False, "torch.compile the training model once (static shapes; evaluation runs eagerly)")
    compile_backend: str = _opt("inductor", "torch.compile backend (e.g. inductor, aot_eager, cudagraphs)")
    cudnn_benchmark: bool = _opt(True, "let cuDNN time its convolution algorithms for our fixed shapes (CUDA; "
                                 "off under --deterministic)")
    tf32: bool = _opt(True, "TF32 tensor cores for float32 matmuls and convolutions (CUDA, Ampere and later)")
    pin_memory: bool = _opt(True, "page-locked loader batches, copied to the GPU without blocking (CUDA)")
    cpu_keep_memory: bool = _opt(True, "on the CPU, keep freed memory in the process rather than hand it back to "
                                 "the OS and fault it in again at the next step (glibc)")
    optimizer_impl: str = _opt("auto", "optimizer kernels: auto = fused on CUDA, PyTorch's choice elsewhere",
                               ("auto", "fused", "foreach", "loop"))
    sync_bn: bool = _opt(False, "synchronise BatchNorm statistics across processes (CUDA)")
    deterministic: bool = _opt(False, "deterministic algorithms: a resumed run matches an uninterrupted one bitwise")
    dist_timeout: float = _opt(600.0, "seconds a collective waits for the other processes before the run stops "
                               "(a dead, cut-off or frozen host): exit 5, rerun to resume")
    seed: int = _opt(0, "random seed")

    # --- checkpoints, resume, evaluation only
    ckpt_every: int = _opt(1000, "also save last.pt every this many optimizer steps (0 = epoch ends only)")
    keep_epochs: int = _opt(3, "keep the newest K epoch_XXXX.pt checkpoints (0 = none)")
    resume: str = _opt("auto", "'auto' (newest valid checkpoint in the run folder), 'never', or a file")
    evaluate: bool = _opt(False, "only evaluate --weights on the validation set")
    weights: Optional[str] = _opt(None, "weights to start from or evaluate: a checkpoint or a torchvision file")
    results_file: Optional[str] = _opt(None, "--evaluate writes its results as JSON here (default: "
                                       "eval_<weights name>.json in the run folder)")

    # --- logging
    log_every: int = _opt(50, "print and record a training line every this many optimizer steps")
    wandb: str = _opt("auto", "W&B mode: auto = online with credentials, otherwise offline",
                      ("auto", "online", "offline", "disabled"))
    wandb_project: str = _opt("densenet", "W&B project")
    wandb_entity: Optional[str] = _opt(None, "W&B entity (team or user)")
    wandb_name: Optional[str] = _opt(None, "W&B run name (default: the run folder's name)")
    wandb_tags: List[str] = _opt([], "W&B tags")

    def run_dir(self) -> Path:
        return Path(self.output_dir or f"runs/{self.arch}")

    def given(self, key: str) -> bool:
        """Whether the recipe, the config file or a flag set ``key`` (rather than the default)."""
        return key in getattr(self, "_given", frozenset())

    def set_given(self, keys: FrozenSet[str]) -> "Config":
        self._given = keys  # not a field: it is not part of the run's configuration
        return self

    def with_values(self, **changes: Any) -> "Config":
        """A copy with `changes` applied, checked like any value and counted as given."""
        values = {**config_to_dict(self), **changes}
        given = getattr(self, "_given", frozenset()) | frozenset(changes)
        return config_from_dict(values, source="resolved config").set_given(given)


# Built-in recipes: overrides of the paper defaults. ``modern`` follows what recent ImageNet recipes for
# convolutional networks use (cosine + warmup, label smoothing, no decay on norms and biases, EMA,
# mixup/cutmix, RandAugment); it is a starting point, not a tuned result.
RECIPES: Dict[str, Dict[str, Any]] = {
    "paper": {},
    # Fewer epochs to the paper's accuracy: low resolution for most of the run, rising to the full one
    # near the end (FFCV's ImageNet ResNet recipes), label smoothing, a higher peak lr reached in a
    # short warmup, then cosine, no decay on norms and biases. 40 epochs, the crop at 160/224 of
    # --image-size until 74 % of the run, full size from 86 %.
    "fast": {
        "epochs": 40,
        "base_lr": 0.4,
        "lr_schedule": "cosine",
        "warmup_epochs": 2.0,
        "label_smoothing": 0.1,
        "weight_decay": 5e-5,
        "weight_decay_norm_bias": False,
        "train_size_start": 160 / 224,
        "train_size_ramp": [0.74, 0.86],
    },
    # Global batches of 2k-32k images: LAMB (timm) with the square-root lr rule, 5 warmup epochs, cosine,
    # weight decay 0.02 off norms and biases, 100 epochs: timm's ResNet-strikes-back A3 settings
    # (arXiv 2110.00476: lr 8e-3 at 2,048 images, i.e. 8e-3 / sqrt(8) per 256), with label smoothing in
    # place of its binary cross-entropy, mixup and cutmix.
    "large-batch": {
        "optimizer": "lamb",
        "base_lr": 8e-3 / math.sqrt(2048 / 256),
        "weight_decay": 0.02,
        "weight_decay_norm_bias": False,
        "epochs": 100,
        "lr_schedule": "cosine",
        "warmup_epochs": 5.0,
        "label_smoothing": 0.1,
    },
    "modern": {
        "epochs": 150,
        "lr_schedule": "cosine",
        "warmup_epochs": 5.0,
        "label_smoothing": 0.1,
        "weight_decay": 5e-5,
        "weight_decay_norm_bias": False,
        "ema": True,
        "ema_decay": 0.9999,
        "mixup": 0.2,
        "cutmix": 1.0,
        "auto_augment": "rand-m9-mstd0.5",  # not inc1: its posterize reaches 0 bits, which Pillow rejects
        "random_erasing": 0.25,
    },
}

# What LAMB and LARS need to train at all, applied when they are chosen (below any recipe, config file
# or flag, which win): a gradual warmup (Goyal et al., arXiv 1706.02677; You et al., arXiv 1708.03888
# and 1904.00962) and no weight decay on norms and biases, whose trust ratio would otherwise scale
# their updates by their tiny norms. LAMB's decoupled-style decay is larger than SGD's (timm's
# ResNet-strikes-back recipes, arXiv 2110.00476: 0.01-0.02). LARS moves each layer by lr x 0.001 x
# its weight norm, whatever the gradient's size, so its lr is larger than SGD's: SimCLR's 0.3 per
# 256 images, scaled linearly (Chen et al., arXiv 2002.05709: 4.8 at 4,096).
OPTIMIZER_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "lamb": {"warmup_epochs": 5.0, "weight_decay_norm_bias": False, "weight_decay": 0.02},
    "lars": {"warmup_epochs": 5.0, "weight_decay_norm_bias": False, "base_lr": 0.3},
}

_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_TYPES = typing.get_type_hints(Config)


def _type_name(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union:
        return _type_name(args[0]) + " or null"
    if typing.get_origin(tp) in (list, List):
        return f"a list of {_type_name(args[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[tp]


def _coerce(key: str, value: Any, source: str) -> Any:
    """Check one value against the field's type; YAML already gives typed values."""
    tp = _TYPES[key]
    optional = typing.get_origin(tp) is typing.Union
    base = [a for a in typing.get_args(tp) if a is not type(None)][0] if optional else tp

    def bad() -> ConfigError:
        return ConfigError(f"{source}: {key} must be {_type_name(tp)}, got {value!r}")

    if value is None:
        if optional:
            return None
        raise bad()
    if typing.get_origin(base) in (list, List):
        (item_type,) = typing.get_args(base)
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise bad()
        return [_coerce_scalar(key, v, item_type, bad) for v in value]
    return _coerce_scalar(key, value, base, bad)


def _coerce_scalar(key: str, value: Any, tp: type, bad: Any) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if isinstance(value, bool):  # bool is an int in Python; never accept it as a number
        raise bad()
    if tp is int:
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad()
    if tp is float:
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad()
    raise TypeError(f"unsupported config type {tp} for {key}")


def _unknown_key(key: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(_FIELDS), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else "; see python train_dist.py --help"
    return ConfigError(f"{source}: unknown key '{key}'{hint}")


def load_yaml(path: str) -> Dict[str, Any]:
    """Read a flat YAML mapping of config keys (dashes or underscores)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: file not found: {path}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level, got {type(data).__name__}")
    out: Dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key not in _FIELDS:
            raise _unknown_key(str(raw_key), path)
        out[key] = value
    return out


def _parse_cli_value(tp: Any) -> Any:
    """argparse converter for Optional[...] flags: 'none' gives None."""
    optional = typing.get_origin(tp) is typing.Union
    base = [a for a in typing.get_args(tp) if a is not type(None)][0] if optional else tp

    def convert(text: str) -> Any:
        if optional and text.lower() in ("none", "null"):
            return None
        return base(text)

    convert.__name__ = base.__name__  # argparse names the type in its error message
    return convert


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of printing its usage block and exiting."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message}; see python train_dist.py --help")


def _unknown_flag(arg: str, parser: argparse.ArgumentParser) -> ConfigError:
    if not arg.startswith("-"):
        return ConfigError(f"unexpected argument {arg!r}: every value follows its flag, e.g. --data {arg}")
    flag = arg.split("=", 1)[0]
    known = [s for action in parser._actions for s in action.option_strings]
    close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else "; see python train_dist.py --help"
    return ConfigError(f"unknown flag {flag}{hint}")


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: a prefix such as --output must never silently mean another flag.
    parser = _Parser(
        prog="train_dist.py", allow_abbrev=False,
        description="Train or evaluate DenseNet-BC on ImageNet (DDP, AMP, exact resume). "
        "Defaults are the paper's recipe; precedence: defaults < --recipe < --config FILE < flags.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", metavar="FILE", help="flat YAML file of config keys")
    parser.add_argument("--no-resume", dest="resume", action="store_const", const="never",
                        help="start from scratch even if the run folder holds a checkpoint (same as --resume never)")
    for name, f in _FIELDS.items():
        tp = _TYPES[name]
        flags = ["--" + name.replace("_", "-"), *ALIASES.get(name, ())]
        help_text = f.metadata["help"]
        if "default" not in help_text:
            help_text += f" (default: {_default_text(f)})"
        choices = f.metadata["choices"]
        optional = typing.get_origin(tp) is typing.Union
        base = [a for a in typing.get_args(tp) if a is not type(None)][0] if optional else tp
        if base is bool:
            parser.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, help=help_text)
        elif typing.get_origin(base) in (list, List):
            (item,) = typing.get_args(base)
            parser.add_argument(*flags, dest=name, nargs="*", type=item, metavar=name.upper(), help=help_text)
        else:
            parser.add_argument(*flags, dest=name, type=_parse_cli_value(tp), choices=choices,
                                metavar=None if choices else name.upper(), help=help_text)
    return parser


def _default_text(f: dataclasses.Field) -> str:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return str(f.default_factory())  # type: ignore[misc]
    return str(f.default)


def config_from_dict(values: Mapping[str, Any], source: str = "config") -> Config:
    """Build a Config from plain data, checking every key and value."""
    checked: Dict[str, Any] = {}
    for key, value in values.items():
        if key not in _FIELDS:
            raise _unknown_key(key, source)
        checked[key] = _coerce(key, value, source)
    cfg = Config(**checked)
    validate(cfg)
    return cfg


def parse_config(argv: Optional[Sequence[str]] = None) -> Config:
    """Defaults, then the chosen optimizer's needs (OPTIMIZER_DEFAULTS), then the recipe, then
    --config FILE, then command-line flags."""
    parser = build_parser()
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        raise _unknown_flag(unknown[0], parser)
    cli = vars(namespace)
    config_file = cli.pop("config", None)
    from_file = load_yaml(config_file) if config_file else {}
    recipe = cli.get("recipe", from_file.get("recipe", "paper"))
    if recipe not in RECIPES:
        raise ConfigError(f"recipe: unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    optimizer = cli.get("optimizer", from_file.get("optimizer", RECIPES[recipe].get("optimizer", "sgd")))
    values: Dict[str, Any] = dict(OPTIMIZER_DEFAULTS.get(optimizer, {}))
    values.update(RECIPES[recipe])
    values.update(from_file)
    values.update(cli)
    values["recipe"] = recipe
    # A file's values are checked here; flags were already converted by argparse.
    cfg = config_from_dict(values, source=config_file or "command line")
    return cfg.set_given(frozenset(values) - {"recipe"})


def validate(cfg: Config) -> None:
    """Checks that need more than the type: choices, ranges and combinations."""
    if cfg.arch not in list_models():
        close = difflib.get_close_matches(cfg.arch, list_models(), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"arch: unknown model {cfg.arch!r}{hint}; choose one of {', '.join(list_models())}")
    for name, f in _FIELDS.items():
        choices = f.metadata["choices"]
        value = getattr(cfg, name)
        if choices and value not in choices:
            raise ConfigError(f"{name}: {value!r} is not one of {', '.join(choices)}")
    positive = ["epochs", "batch_size", "accum_steps", "image_size", "log_every"]
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name} must be positive, got {getattr(cfg, name)}")
    for name in ["max_steps", "num_classes", "eval_resize", "eval_batch_size", "eval_image_size"]:
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise ConfigError(f"{name} must be positive (or null), got {value}")
    if cfg.aug_repeats < 1:
        raise ConfigError(f"aug_repeats must be at least 1 (1 = each image once per epoch), got {cfg.aug_repeats}")
    if cfg.workers is not None and cfg.workers < 0:
        raise ConfigError(f"workers must not be negative, got {cfg.workers}")
    if cfg.dist_timeout <= 0:
        raise ConfigError(f"dist_timeout must be positive (seconds), got {cfg.dist_timeout}")
    for name in ["ckpt_every", "keep_epochs", "weight_decay", "warmup_epochs", "min_lr",
                 "mixup", "cutmix", "momentum", "seed"]:
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must not be negative, got {getattr(cfg, name)}")
    if cfg.base_lr <= 0 or (cfg.lr is not None and cfg.lr <= 0):
        raise ConfigError(f"lr and base_lr must be positive, got lr={cfg.lr} base_lr={cfg.base_lr}")
    if cfg.grad_clip is not None and cfg.grad_clip <= 0:
        raise ConfigError(f"grad_clip must be positive (or null for no clipping), got {cfg.grad_clip}")
    for name in ["drop_rate", "label_smoothing", "random_erasing"]:
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise ConfigError(f"{name} must be in [0, 1), got {getattr(cfg, name)}")
    if not 0.0 < cfg.ema_decay < 1.0:
        raise ConfigError(f"ema_decay must be in (0, 1), got {cfg.ema_decay}")
    if cfg.lr_milestones != sorted(cfg.lr_milestones) or any(m <= 0 for m in cfg.lr_milestones):
        raise ConfigError(f"lr_milestones must be increasing positive epochs, got {cfg.lr_milestones}")
    if not 0.0 < cfg.lr_gamma <= 1.0:
        raise ConfigError(f"lr_gamma must be in (0, 1], got {cfg.lr_gamma}")
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
        raise ConfigError(f"batch_size must be even with mixup/cutmix (timm mixes pairs), got {cfg.batch_size}")
    smallest = min_image_size(get_spec(cfg.arch))
    for name in ("image_size", "eval_image_size"):
        size = getattr(cfg, name)
        if size is not None and size < smallest:
            raise ConfigError(f"{name}: {size} px is too small for {cfg.arch}, whose stem and transitions need at "
                              f"least {smallest} px; use --{name.replace('_', '-')} {smallest} or more")
    _validate_train_sizes(cfg, smallest)
    if cfg.auto_augment and cfg.auto_augment != "none" and cfg.decode == "device":
        raise ConfigError("auto_augment: augmentation policies work on decoded images in the loader workers, "
                          "which --decode device leaves undecoded; use --decode cpu or drop --auto-augment")
    if not cfg.data:
        raise ConfigError("data: no data given; pass --data /path/to/imagenet (with train/ and val/) or --data demo")
    if cfg.evaluate and not cfg.weights:
        raise ConfigError("evaluate: --evaluate needs --weights FILE (a checkpoint of ours or a torchvision file)")
    if not cfg.compile_backend.strip():
        raise ConfigError("compile_backend must name a torch.compile backend, e.g. inductor")
    if cfg.sync_bn and cfg.memory_efficient:
        raise ConfigError("sync_bn: --sync-bn does not reach the memory-efficient dense layers (they call "
                          "F.batch_norm themselves); drop --memory-efficient or --sync-bn")


def _validate_train_sizes(cfg: Config, smallest: int) -> None:
    if cfg.train_size_multiple <= 0:
        raise ConfigError(f"train_size_multiple must be positive, got {cfg.train_size_multiple}")
    if len(cfg.train_size_ramp) != 2 or not 0.0 <= cfg.train_size_ramp[0] <= cfg.train_size_ramp[1] <= 1.0:
        raise ConfigError(f"train_size_ramp must be two fractions of the epochs, START <= END in [0, 1], "
                          f"got {cfg.train_size_ramp}; e.g. --train-size-ramp 0.74 0.86")
    if cfg.train_size_start is None:
        return
    if not 0.0 < cfg.train_size_start < 1.0:
        raise ConfigError(f"train_size_start must be a fraction of image_size in (0, 1), got {cfg.train_size_start}")
    start = train_sizes_of(cfg)[0]
    if start < smallest:
        raise ConfigError(f"train_size_start: {cfg.train_size_start:g} of {cfg.image_size} px is {start} px, too small "
                          f"for {cfg.arch} (at least {smallest} px); raise --train-size-start or --image-size")
    if start >= cfg.image_size:
        finer = "a smaller --train-size-multiple (e.g. 8), " if cfg.train_size_multiple > 8 else ""
        raise ConfigError(f"train_size_start: {cfg.train_size_start:g} of {cfg.image_size} px rounds to {start} px in "
                          f"steps of {cfg.train_size_multiple} px, so the size would never change; use {finer}"
                          f"a smaller --train-size-start or a larger --image-size")


def train_sizes_of(cfg: Config) -> Tuple[int, ...]:
    """The training crop of every epoch (densenet/training/resolution.py); at least one entry."""
    return train_sizes(cfg.image_size, max(cfg.epochs, 1), cfg.train_size_start, cfg.train_size_ramp,
                       cfg.train_size_multiple)


def eval_crop_size(cfg: Config) -> int:
    """The evaluation centre crop: eval_image_size, else the (last) training size."""
    return cfg.eval_image_size or cfg.image_size


def config_to_dict(cfg: Config) -> Dict[str, Any]:
    """Plain data (str/int/float/bool/None/list) for YAML, checkpoints and W&B."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: Path, derived: Mapping[str, Any]) -> None:
    """Write the resolved config as YAML that --config accepts back; derived values go in comments."""
    header = "".join(f"# {k}: {v}\n" for k, v in derived.items())
    body = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
    text = "# resolved config of this run (usable with --config)\n" + header + body
    atomic_write_bytes(path, text.encode())


# Keys that say where and how a run is driven and logged, not what it computes: a resumed run that
# changes them changes none of its numbers, so they are not reported as config changes.
_LOGISTICS = frozenset({"resume", "output_dir", "evaluate", "weights", "results_file", "workers", "log_every",
                        "dist_timeout",
                        "wandb", "wandb_project", "wandb_entity", "wandb_name", "wandb_tags"})


def config_changes(old: Mapping[str, Any], new: Config) -> List[str]:
    """Human-readable differences that matter between a checkpoint's config and the current one."""
    current = config_to_dict(new)
    changes = []
    for key in sorted((set(old) | set(current)) - _LOGISTICS):
        if old.get(key, "<absent>") != current.get(key, "<absent>"):
            changes.append(f"{key}: {old.get(key, '<absent>')!r} -> {current.get(key, '<absent>')!r}")
    return changes
