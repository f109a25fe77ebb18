"""A split's index (the table of files and labels of a folder, or the shard list with its counts),
made once per job: one process reads it and hands it to the others, and the run folder keeps a copy
that a later start of the same run reads instead of listing the tree again.

The copy is used only while the tree is as it was: it records the modification time of every folder
whose entries the index was made from (the split folder and each class folder in it, the data root
and the label files of the raw validation layout) and the size and modification time of every shard
file. Adding, removing or renaming a file changes its folder's time, so a changed tree is listed
again; a file rewritten in place does not, and need not: the index holds names and labels, not
pixels.
"""
from __future__ import annotations

import io
import json
import logging
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .files import atomic_write_bytes
from .layouts import DEVKIT_LABELS, DEVKIT_META, DEVKIT_TARBALL, KAGGLE_LABELS, SampleTable, read_split
from .shard_index import ShardIndex, check_shards, is_shard_dir, read_index

log = logging.getLogger(__name__)

INDEX_FORMAT = 1  # raised when what an index holds, or how it is made, changes
Source = SampleTable | ShardIndex


def read_source(root: str | os.PathLike, split: str, classes: tuple[str, ...] | None = None) -> Source:
    """The split's shard index if ROOT is a folder of shards, else its sample table (any layout);
    ``classes``: the class ids in label order (a model's), instead of the tree's own (folders only)."""
    root = Path(root)
    if not is_shard_dir(root):
        return read_split(root, split, classes)
    index = read_index(root, split)
    # Every evaluation shard is read through (an unreadable one would drop its images unseen); a
    # training shard is opened only, since reading 140 GB at every start would cost minutes.
    check_shards(index, full=split != "train")
    return index


def tree_stamp(root: str | os.PathLike, split: str) -> list[list]:
    """What the index of ``ROOT/<split>`` depends on, as ``[path, mtime_ns, size]`` rows: cheap to
    take (a few thousand stats for ImageNet, not 1.3 million)."""
    root = Path(root)
    paths = [root]
    for folder, every_entry in ((root, True), (root / split, False)):
        try:
            with os.scandir(folder) as entries:
                # the split folder's class folders and shards; not the files of a flat folder
                # (50,000 raw val images): its own time covers them
                paths += [Path(e.path) for e in entries
                          if every_entry or e.is_dir() or e.name.endswith((".tar", ".json"))]
        except (FileNotFoundError, NotADirectoryError):
            pass
    for folder in [root, *list(root.resolve().parents)[:3]]:  # where the raw val layout finds its labels
        for name in (KAGGLE_LABELS, DEVKIT_TARBALL, DEVKIT_LABELS, DEVKIT_META,
                     f"data/{DEVKIT_LABELS}", f"data/{DEVKIT_META}"):
            paths.append(folder / name)
    rows = []
    for path in sorted(set(paths)):
        try:
            st = path.stat()
            rows.append([str(path), st.st_mtime_ns, st.st_size if stat.S_ISREG(st.st_mode) else 0])
        except OSError:
            rows.append([str(path), None, None])  # absent: appearing later changes the stamp too
    return rows


@dataclass(frozen=True)
class SplitIndex:
    """One split's index and where it came from."""

    root: Path  # the data root it was made from
    split: str
    source: Source
    stamp: list  # tree_stamp() when it was made
    cached: bool  # read from a run folder's copy rather than made from the tree now
    seconds: float  # how long it took to get

    def describe(self) -> str:
        how = "read from the run folder's copy (the tree is unchanged)" if self.cached else "listed"
        count = self.source.num_samples if isinstance(self.source, ShardIndex) else len(self.source)
        return f"{self.split} index: {count} samples, {how} in {self.seconds:.1f}s"


class IndexCache:
    """The copies of a run's split indexes, one ``<split>.npz`` file each in ``folder``."""

    def __init__(self, folder: str | os.PathLike | None) -> None:
        self.folder = Path(folder) if folder is not None else None

    @classmethod
    def of_run(cls, run_dir: str | os.PathLike) -> "IndexCache":
        """The copies a run folder keeps, in its data-index/ folder."""
        return cls(Path(run_dir) / "data-index")

    def index(self, root: str | os.PathLike, split: str, classes: tuple[str, ...] | None = None) -> SplitIndex:
        """The split's index: this cache's copy if it matches the tree, else made from the tree
        (with ``classes``, read_source's, always made from the tree)."""
        started = time.perf_counter()
        root = Path(root)
        stamp = tree_stamp(root, split)
        source = self._load(root, split, stamp) if classes is None else None
        cached = source is not None
        if source is None:
            source = read_source(root, split, classes)
        return SplitIndex(root, split, source, stamp, cached, time.perf_counter() - started)

    def keep(self, index: SplitIndex) -> None:
        """Write a copy of a freshly made index (atomically); one read from here is left as it is."""
        if self.folder is None or index.cached:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = {"format": INDEX_FORMAT, "root": str(index.root.resolve()), "split": index.split,
                "stamp": index.stamp}
        source = index.source
        if isinstance(source, ShardIndex):
            meta.update(kind="shards", shard_dir=str(source.shard_dir), classes=list(source.classes),
                        shards=list(source.shards), counts=list(source.counts), counts_from=source.counts_from)
            arrays = {}
        else:
            meta.update(kind="table", table_root=source.root, classes=list(source.classes), layout=source.layout)
            arrays = {"paths": source.paths, "targets": source.targets}
        buf = io.BytesIO()
        np.savez(buf, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)
        atomic_write_bytes(self.folder / f"{index.split}.npz", buf.getvalue())

    def _load(self, root: Path, split: str, stamp: list) -> Source | None:
        if self.folder is None:
            return None
        path = self.folder / f"{split}.npz"
        try:
            with np.load(path, allow_pickle=False) as npz:
                meta = json.loads(npz["meta"].tobytes())
                if (meta.get("format"), meta.get("root"), meta.get("split"), meta.get("stamp")) != \
                        (INDEX_FORMAT, str(root.resolve()), split, stamp):
                    log.info("%s is out of date: listing %s again", path, root / split)
                    return None
                if meta["kind"] == "shards":
                    return ShardIndex(Path(meta["shard_dir"]), split, tuple(meta["classes"]), tuple(meta["shards"]),
                                      tuple(meta["counts"]), meta["counts_from"])
                return SampleTable(meta["table_root"], npz["paths"], npz["targets"], tuple(meta["classes"]),
                                   meta["layout"])
        except FileNotFoundError:
            return None
        except Exception as e:  # a damaged copy is only a slower start: list the tree
            log.warning("ignoring the index copy %s (%s: %s); listing the tree", path, type(e).__name__, e)
            return None
