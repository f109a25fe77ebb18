"""The run's data loaders, from its config: the data root found on every rank, each split's index
made once per job (data/index.py), then the training and evaluation loaders of this rank."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from data import DataLayoutError, EvalTransform, TrainTransform, build_eval_loader, build_train_loader, resolve_data_root
from data.index import IndexCache, Source, SplitIndex

from .config import Config, ConfigError, eval_crop_size, train_sizes_of
from .distributed import DistInfo, checked_on_every_rank, decided_by_main
from .settings import RunSettings

# What bad data raises: one line that names the problem and the fix, refused by every rank together.
DATA_REFUSALS = (ConfigError, DataLayoutError)


def index_data(cfg: Config, info: DistInfo, splits: Tuple[str, ...], cache: IndexCache,
               classes: Optional[Tuple[str, ...]] = None) -> Dict[str, SplitIndex]:
    """The splits' indexes, made once per job: every rank finds the data root (the demo data is
    made where it is missing); rank 0 alone lists the tree (or reads the run folder's copy of an
    index, while the tree is unchanged) and the others receive what it found."""
    root = checked_on_every_rank(info, lambda: resolve_data_root(cfg.data), DATA_REFUSALS)
    return decided_by_main(info, lambda: {split: cache.index(root, split, classes) for split in splits},
                           DATA_REFUSALS)


def build_loaders(cfg: Config, info: DistInfo, run: RunSettings, indexes: Dict[str, SplitIndex]) -> Tuple[Any, Any]:
    """This rank's training and evaluation loaders; a setting or a layout they cannot take is
    refused on every rank together."""
    def build() -> Tuple[Any, Any]:
        try:
            transform = TrainTransform(cfg.image_size, auto_augment=cfg.auto_augment,
                                       random_erasing=cfg.random_erasing, sizes_by_epoch=train_sizes_of(cfg))
            train_loader = build_train_loader(indexes["train"].source, transform, batch_size=cfg.batch_size,
                                              workers=run.workers, rank=info.rank, world_size=info.world_size,
                                              seed=cfg.seed, pin_memory=run.pin_memory, decode_on=run.decode_on,
                                              aug_repeats=cfg.aug_repeats)
        except ValueError as e:  # an augmentation policy or setting the transforms do not know
            raise ConfigError(str(e)) from None
        return train_loader, eval_loader(cfg, info, run, indexes["val"].source)

    return checked_on_every_rank(info, build, DATA_REFUSALS)


def eval_loader(cfg: Config, info: DistInfo, run: RunSettings, source: Source) -> Any:
    # eval_resize None: EvalTransform's floor(crop / 0.875), 224 -> 256 (timm's rounding; the one place)
    return build_eval_loader(source, EvalTransform(eval_crop_size(cfg), cfg.eval_resize),
                             batch_size=cfg.eval_batch_size or cfg.batch_size, workers=run.workers,
                             rank=info.rank, world_size=info.world_size, pin_memory=run.pin_memory)
