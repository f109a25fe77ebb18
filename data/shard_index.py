"""Which tar shards a split has, how many samples each holds and what the classes are, for the shard
streams (data/shard_stream.py): from the index ``python -m data.shards`` writes, from a WebDataset
folder's ``_info.json`` (timm's layout), or counted from the tars themselves; and the checks that name
an unreadable shard when a loader is built. What is read and checked is described, for users, in
docs/data.md ("Tar shards").

It imports no torch (``python -m data.shards`` uses it), and a ``ShardIndex`` pickles as it is.
"""

from __future__ import annotations

import functools
import json
import os
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

from .classes import imagenet_wnids, is_wnid
from .layouts import DataLayoutError

INDEX_FORMAT = 1
IMAGE_SUFFIXES = ("jpg", "jpeg", "png")
SPLITS = ("train", "val")
INFO_FILE = "_info.json"
# The names a split goes by in WebDataset folders: Hugging Face's (and timm's) "validation" is our "val".
SPLIT_NAMES = {"val": ("val", "validation")}
IMAGENET_CLASSES = 1000
SCAN_THREADS = 8  # shards counted at once: the work is waiting for the filesystem
NAMED = 4  # bad shards named in a message


def index_path(shard_dir: Path, split: str) -> Path:
    return Path(shard_dir) / f"{split}-index.json"


def split_names(split: str) -> tuple[str, ...]:
    return SPLIT_NAMES.get(split, (split,))


def member_key(name: str) -> tuple[str, str]:
    """(sample key, extension) of a tar member: WebDataset's rule, the key ends at the first dot of
    the file name, and members sharing a key (consecutive ones) form a sample."""
    folder, _, filename = name.rpartition("/")
    stem, _, ext = filename.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


@dataclass(frozen=True)
class ShardIndex:
    """What a loader needs to know about a split's shards. ``shards`` are paths relative to
    ``shard_dir``; ``counts_from`` names the file the counts were read from (``<split>-index.json``,
    ``_info.json``), or is empty where they were counted from the tars."""

    shard_dir: Path
    split: str
    classes: tuple[str, ...]
    shards: tuple[str, ...]
    counts: tuple[int, ...]
    counts_from: str = ""

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    def path(self, shard: int) -> str:
        return str(self.shard_dir / self.shards[shard])


class ShardListing(NamedTuple):
    """A split's shards as a folder lists them, before anything is counted: ``counts`` and
    ``classes`` are None where they must be learnt from the tars."""

    shards: tuple[str, ...]
    counts: tuple[int, ...] | None
    counts_from: str
    classes: tuple[str, ...] | None


class ShardScan(NamedTuple):
    samples: int
    max_label: int  # -1 where no .cls member was read
    problem: str | None  # why the shard cannot be read, or None


# --- finding a split's shards -----------------------------------------------------------------


def _has_our_index(path: Path) -> bool:
    return any(index_path(path, split).is_file() for split in SPLITS)


def _tar_names(folder: Path) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(folder)
                      if e.name.endswith(".tar") and not e.name.startswith(".") and e.is_file())
    except OSError:
        return []


def _holds_shards(folder: Path) -> bool:
    """A split folder of tar shards: .tar files, and no class folders or images (which would make
    it a split of image files, perhaps with its original download lying beside them)."""
    found = per_class = False
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir() or entry.name.rsplit(".", 1)[-1].lower() in IMAGE_SUFFIXES:
                return False
            if entry.name.endswith(".tar"):
                found = True
                per_class = per_class or is_wnid(entry.name[:-4])
    # ImageNet's per-class archives (n01440764.tar ...), not yet extracted: the layout check says so
    return found and not per_class


def _split_folders(path: Path) -> list[Path]:
    return [path / name for split in SPLITS for name in split_names(split) if (path / name).is_dir()]


def is_shard_dir(path: str | os.PathLike) -> bool:
    """Whether ``--data PATH`` is read as tar shards: PATH holds one of our indexes or an
    ``_info.json``; or split folders (train/, val/, validation/) that hold only .tar files; or, with
    no split folder at all, .tar files of its own."""
    path = Path(path)
    if _has_our_index(path) or (path / INFO_FILE).is_file():
        return True
    folders = _split_folders(path)
    if folders:
        return all(_holds_shards(folder) for folder in folders)
    return bool(_tar_names(path))


def _expected(shard_dir: Path, split: str) -> str:
    names = split_names(split)
    return (f"expected {' or '.join(f'{shard_dir}/{n}/*.tar' for n in names)}, .tar files named like "
            f"{names[0]}-000000.tar or imagenet1k-{names[-1]}-0000.tar (the split's name between '-' or '_'), "
            f"an {INFO_FILE} listing the {names[-1]!r} split (timm's wds layout), or a {split}-index.json "
            f"written by `python -m data.shards ROOT --split {split} --out {shard_dir}`")


def _find_shards(shard_dir: Path, split: str) -> tuple[str, ...]:
    """The split's shards where no file lists them: the .tar files of its split folder, else the
    top-level .tar files whose name holds the split's name as a word."""
    for name in split_names(split):
        folder = shard_dir / name
        if folder.is_dir() and _holds_shards(folder):
            return tuple(f"{name}/{tar}" for tar in _tar_names(folder))
    word = re.compile(r"(?:^|[-_])(?:%s)[-_]" % "|".join(map(re.escape, split_names(split))))
    return tuple(name for name in _tar_names(shard_dir) if word.search(name))


def _found_shards(shard_dir: Path, split: str) -> tuple[str, ...]:
    found = _find_shards(shard_dir, split)
    if not found:
        tars = _tar_names(shard_dir)
        seen = f"{len(tars)} .tar files ({', '.join(tars[:3])}{', ...' if len(tars) > 3 else ''})" if tars \
            else "no .tar files"
        raise DataLayoutError(f"{shard_dir} has no {split} shards: found {seen}; {_expected(shard_dir, split)}")
    return found


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataLayoutError(f"{path} cannot be read as JSON ({type(err).__name__}: {err})") from None


def _our_listing(shard_dir: Path, split: str) -> ShardListing:
    path = index_path(shard_dir, split)
    if not path.is_file():
        found = sorted(p.name for p in shard_dir.glob("*-index.json"))
        raise DataLayoutError(
            f"{shard_dir} has no {path.name} (found: {', '.join(found) or 'no index'}); write the "
            f"{split} shards with `python -m data.shards ROOT --split {split} --out {shard_dir}`")
    meta = _read_json(path)
    if meta.get("format") != INDEX_FORMAT:
        raise DataLayoutError(f"{path} has format {meta.get('format')}, this version reads {INDEX_FORMAT}")
    return ShardListing(tuple(s["name"] for s in meta["shards"]), tuple(int(s["samples"]) for s in meta["shards"]),
                        path.name, tuple(meta["classes"]))


def _info_splits(info: dict) -> dict:
    return info["splits"] if isinstance(info.get("splits"), dict) else {}


def _info_name(splits: dict, split: str) -> str | None:
    return next((name for name in split_names(split) if name in splits), None)


def _info_listing(shard_dir: Path, split: str) -> ShardListing:
    """The split as timm's wds reader reads ``_info.json``: ``splits.<name>.filenames`` and
    ``.shard_lengths``; a top-level ``num_classes``, if there, gives the classes."""
    path = shard_dir / INFO_FILE
    info = _read_json(path)
    splits = _info_splits(info)
    name = _info_name(splits, split)
    if name is None:
        raise DataLayoutError(f"{path} has no {' or '.join(map(repr, split_names(split)))} split (it has: "
                              f"{', '.join(map(repr, splits)) or 'none'}); expected \"splits\": "
                              f"{{{split_names(split)[-1]!r}: {{\"filenames\": [...], \"shard_lengths\": [...]}}}}")
    entry = splits[name]
    names, counts = entry.get("filenames"), entry.get("shard_lengths")
    if not names or not isinstance(counts, list) or len(names) != len(counts):
        raise DataLayoutError(f"{path}: split {name!r} needs \"filenames\" and \"shard_lengths\", two lists of "
                              f"equal length (the shard files and their sample counts)")
    classes = class_ids(int(info["num_classes"])) if "num_classes" in info else None
    return ShardListing(tuple(names), tuple(int(c) for c in counts), INFO_FILE, classes)


def list_shards(shard_dir: str | os.PathLike, split: str) -> ShardListing:
    """The split's shards from its index, else from ``_info.json``, else found by name; cheap: no
    shard is opened. A split that is not there, or a listed shard that is missing, is an error
    naming what is expected."""
    shard_dir = Path(shard_dir)
    if _has_our_index(shard_dir):
        listing = _our_listing(shard_dir, split)
    elif (shard_dir / INFO_FILE).is_file():
        listing = _info_listing(shard_dir, split)
    else:
        listing = ShardListing(_found_shards(shard_dir, split), None, "", None)
    missing = [name for name in listing.shards if not (shard_dir / name).is_file()]
    if missing:
        listed = f" listed in {listing.counts_from}" if listing.counts_from else ""
        rerun = " or rerun `python -m data.shards`" if listing.counts_from != INFO_FILE else ""
        raise DataLayoutError(f"{shard_dir} lacks {len(missing)} shards{listed} (e.g. {missing[0]}); "
                              f"copy them{rerun}")
    return listing


def shard_splits(shard_dir: str | os.PathLike) -> tuple[str, ...]:
    """The splits (of ``SPLITS``) a shard folder has, whether or not all their shards are there; cheap."""
    shard_dir = Path(shard_dir)
    if _has_our_index(shard_dir):
        return tuple(split for split in SPLITS if index_path(shard_dir, split).is_file())
    if (shard_dir / INFO_FILE).is_file():
        splits = _info_splits(_read_json(shard_dir / INFO_FILE))
        return tuple(split for split in SPLITS if _info_name(splits, split) is not None)
    return tuple(split for split in SPLITS if _find_shards(shard_dir, split))


# --- reading the shards themselves ------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _scan(path: str, size: int, mtime_ns: int, first_only: bool) -> ShardScan:
    """Keyed by the file's size and modification time, so a shard counted once in a process (the
    training loader's classes need the val labels too) is not read again unless it changed."""
    samples, max_label, key = 0, -1, None
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:  # headers only: the reader seeks over the data
                if member.offset_data + member.size > size:
                    return ShardScan(samples, max_label, f"is truncated: it ends inside {member.name}")
                if not member.isfile():
                    continue
                member_key_, ext = member_key(member.name)
                if member_key_ != key:
                    samples, key = samples + 1, member_key_
                if ext == "cls":
                    max_label = max(max_label, int(tar.extractfile(member).read()))
                if first_only:
                    return ShardScan(samples, max_label, None)
            # tar takes a cut at a member boundary for the end; the end-of-archive block tells them apart
            f.seek(tar.offset)
            end = f.read(tarfile.BLOCKSIZE)
            if len(end) < tarfile.BLOCKSIZE or end.count(0) != tarfile.BLOCKSIZE:
                return ShardScan(samples, max_label, "is truncated: it ends without tar's end-of-archive block")
    except tarfile.ReadError as err:
        if samples:
            return ShardScan(samples, max_label, f"is truncated or damaged after {samples} samples ({err})")
        return ShardScan(samples, max_label, f"is not a readable tar ({err})")
    except (tarfile.TarError, OSError, ValueError) as err:
        return ShardScan(samples, max_label, f"cannot be read ({type(err).__name__}: {err})")
    if samples == 0:
        return ShardScan(0, -1, "is an empty tar (no samples)")
    return ShardScan(samples, max_label, None)


def scan_shard(path: str | os.PathLike, *, first_only: bool = False) -> ShardScan:
    """Count a shard's samples (as data/shard_stream.py groups members) and its largest label,
    reading tar headers and the small .cls members; ``first_only`` stops at the first sample."""
    try:
        stat = os.stat(path)
    except OSError as err:
        return ShardScan(0, -1, f"cannot be opened ({err.strerror})")
    if stat.st_size == 0:
        return ShardScan(0, -1, "is a 0-byte file")
    return _scan(str(path), stat.st_size, stat.st_mtime_ns, first_only)


def _scan_all(paths: Sequence[str], first_only: bool) -> list[ShardScan]:
    if len(paths) <= 1:
        return [scan_shard(p, first_only=first_only) for p in paths]
    with ThreadPoolExecutor(min(SCAN_THREADS, len(paths))) as pool:
        return list(pool.map(functools.partial(scan_shard, first_only=first_only), paths))


def _unreadable(shard_dir: Path, split: str, total: int, problems: list[tuple[str, str]], ours: bool):
    shown = "; ".join(f"{name} {problem}" for name, problem in problems[:NAMED])
    more = f"; and {len(problems) - NAMED} more" if len(problems) > NAMED else ""
    fix = (f"rerun the `python -m data.shards ROOT --split {split} --out {shard_dir}` that wrote them (it "
           "rewrites only the broken shards)" if ours else "copy them again from the dataset's source")
    return DataLayoutError(f"{len(problems)} of the {total} {split} shards in {shard_dir} cannot be read: "
                           f"{shown}{more}; {fix}")


def _counted(shard_dir: Path, split: str, shards: Sequence[str]) -> list[ShardScan]:
    scans = _scan_all([str(shard_dir / name) for name in shards], first_only=False)
    problems = [(name, scan.problem) for name, scan in zip(shards, scans) if scan.problem]
    if problems:
        raise _unreadable(shard_dir, split, len(shards), problems, ours=False)
    return scans


def class_ids(num_classes: int) -> tuple[str, ...]:
    """The classes of integer labels: ImageNet's wnids in their sorted order (the order of the
    ILSVRC-2012 labels that Hugging Face's and timm's shards carry) for 1000, else "0" .. "K-1"."""
    return imagenet_wnids() if num_classes == IMAGENET_CLASSES else tuple(str(i) for i in range(num_classes))


def _label_classes(shard_dir: Path) -> tuple[str, ...]:
    """One class list for every split: from the largest label in any split's shards."""
    largest = -1
    for split in shard_splits(shard_dir):
        scans = _counted(shard_dir, split, list_shards(shard_dir, split).shards)
        largest = max([largest] + [scan.max_label for scan in scans])
    if largest < 0:
        raise DataLayoutError(f"the shards in {shard_dir} hold no .cls members: each sample needs a <key>.cls "
                              f"member holding its class index as decimal text")
    return class_ids(largest + 1)


def read_index(shard_dir: str | os.PathLike, split: str) -> ShardIndex:
    """A split's shards with their sample counts and the classes: read from our index or from
    ``_info.json`` where there is one, else counted (every shard read through; slow on ImageNet, so
    a caller may keep the result, which is valid while the shard files keep their size and mtime)."""
    shard_dir = Path(shard_dir)
    listing = list_shards(shard_dir, split)
    counts = listing.counts
    if counts is None:
        counts = tuple(scan.samples for scan in _counted(shard_dir, split, listing.shards))
    classes = listing.classes if listing.classes is not None else _label_classes(shard_dir)
    return ShardIndex(shard_dir, split, classes, listing.shards, counts, listing.counts_from)


def check_shards(index: ShardIndex, *, full: bool) -> None:
    """Raise a one-line ``DataLayoutError`` naming every shard that cannot be read. ``full``: each
    shard is read through and must hold the samples the index lists; otherwise (cheap) each must be
    a non-empty tar whose first sample can be read."""
    scans = _scan_all([index.path(i) for i in range(len(index.shards))], first_only=not full)
    problems = []
    for name, count, scan in zip(index.shards, index.counts, scans):
        if scan.problem:
            problems.append((name, scan.problem))
        elif full and scan.samples != count:
            problems.append((name, f"holds {scan.samples} samples where "
                                   f"{index.counts_from or 'the index'} lists {count} (truncated or replaced?)"))
    if problems:
        ours = index.counts_from == index_path(index.shard_dir, index.split).name
        raise _unreadable(index.shard_dir, index.split, len(index.shards), problems, ours)
