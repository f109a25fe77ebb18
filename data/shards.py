"""Tar shards for clusters where a million small files on a shared filesystem are the bottleneck.

    python -m data.shards /datasets/imagenet --split train --out /fast/imagenet-shards
    python -m data.shards /datasets/imagenet --split val --out /fast/imagenet-shards
    python train_dist.py --data /fast/imagenet-shards ...

Format: WebDataset's convention, so other tools (``webdataset``, ``wids``) read the shards too.
``DIR/<split>-000000.tar`` ... each hold about ``--samples-per-shard`` samples, and each sample is two
consecutive members sharing a key: ``<key>.jpg`` (the original file's bytes, never re-encoded) and
``<key>.cls`` (the class index as decimal text). Samples are assigned to shards in one seeded random
order, so every shard mixes all classes and a small shuffle buffer suffices when streaming.
``DIR/<split>-index.json`` lists the classes and every shard with its sample count (read by
data/shard_index.py, which also reads WebDataset folders without one).

Written with the standard ``tarfile`` module: writing and streaming tar members needs nothing more,
it keeps the dependency list short, and owning the reader is what lets it split, shuffle and skip
deterministically for exact resume (see data/shard_stream.py). Each shard is written to a temporary
name and renamed when complete, so an interrupted conversion resumes where it stopped: complete
shards that match the plan are kept.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import sys
import tarfile
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from .files import atomic_write, atomic_write_bytes
from .layouts import DataLayoutError, SampleTable, load_split
# The read side, importable from here too: data.shards.read_index, ShardIndex, is_shard_dir.
from .shard_index import INDEX_FORMAT, ShardIndex, index_path, is_shard_dir, read_index, scan_shard

__all__ = ["ShardIndex", "convert", "index_path", "is_shard_dir", "read_index", "sample_key", "shard_name",
           "write_shard"]

log = logging.getLogger(__name__)


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def sample_key(relative_path: str) -> str:
    """The member name stem: the source path without extension, dots replaced (WebDataset cuts the
    key at the first dot of the file name)."""
    stem = relative_path.rsplit(".", 1)[0]
    return stem.replace(".", "_")


def image_suffix(relative_path: str) -> str:
    ext = relative_path.rsplit(".", 1)[-1].lower()
    return "png" if ext == "png" else "jpg"


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o444
    info.mtime = 0  # identical bytes for identical input
    tar.addfile(info, io.BytesIO(data))


def write_shard(table: SampleTable, indices: np.ndarray, out: Path, progress=None) -> int:
    """Write one shard atomically; returns its sample count. Unreadable source files are copied
    as they are: the loaders replace and count them when they read them."""
    # A fixed temporary name: the next run overwrites what a killed one left.
    with atomic_write(out, temp=out.with_name(f".{out.name}.partial")) as f, \
            tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for index in indices.tolist():
            relative = table.paths[index].decode()
            key = sample_key(relative)
            with open(os.path.join(table.root, relative), "rb") as f:
                _add_member(tar, f"{key}.{image_suffix(relative)}", f.read())
            _add_member(tar, f"{key}.cls", str(int(table.targets[index])).encode())
            if progress is not None:
                progress.update(1)
    return len(indices)


def plan_shards(table: SampleTable, samples_per_shard: int, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(len(table))
    return [order[i:i + samples_per_shard] for i in range(0, len(order), samples_per_shard)]


def plan_fingerprint(table: SampleTable, samples_per_shard: int, seed: int) -> str:
    digest = hashlib.sha256()
    digest.update(f"{samples_per_shard} {seed} {len(table)}\n".encode())
    digest.update("\n".join(table.classes).encode())
    digest.update(table.paths.tobytes())
    digest.update(table.targets.tobytes())
    return digest.hexdigest()[:16]


_job_table: SampleTable | None = None


def _init_job(table: SampleTable) -> None:
    global _job_table
    _job_table = table  # sent once per process, not once per shard


def _write_shard_job(args) -> tuple[int, int]:
    number, indices, out = args
    return number, write_shard(_job_table, indices, out)


def convert(root: str | os.PathLike, split: str, out: str | os.PathLike, *, samples_per_shard: int = 1000,
            seed: int = 0, jobs: int = 1, show_progress: bool = True) -> Path:
    """Write (or finish writing) the shards of ``ROOT/<split>`` into ``out``; returns the index."""
    from tqdm import tqdm

    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
    table = load_split(root, split)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = plan_shards(table, samples_per_shard, seed)
    fingerprint = plan_fingerprint(table, samples_per_shard, seed)
    plan_file = out / f".{split}-plan"
    if plan_file.exists() and plan_file.read_text() != fingerprint:
        raise FileExistsError(f"{out} holds {split} shards written from other files or settings; "
                              "use an empty --out folder (or delete its shards) to start over")
    plan_file.write_text(fingerprint)
    index_path(out, split).unlink(missing_ok=True)  # only a finished conversion has an index

    counts: dict[int, int] = {}
    todo: list[int] = []
    for number, indices in enumerate(plan):
        path = out / shard_name(split, number)
        scan = scan_shard(path)
        if scan.problem is None and scan.samples == len(indices):
            counts[number] = len(indices)
        else:
            todo.append(number)
    if counts:
        log.info("%s: %d of %d shards already complete; writing the other %d", out, len(counts), len(plan), len(todo))
    progress = tqdm(total=len(table), initial=sum(counts.values()), unit="img", disable=not show_progress,
                    desc=f"{split} shards")
    with progress:
        if jobs <= 1:
            for number in todo:
                counts[number] = write_shard(table, plan[number], out / shard_name(split, number), progress)
        else:
            work = [(n, plan[n], out / shard_name(split, n)) for n in todo]
            with get_context("spawn").Pool(jobs, initializer=_init_job, initargs=(table,)) as pool:
                for number, count in pool.imap_unordered(_write_shard_job, work):
                    counts[number] = count
                    progress.update(count)
    index = {
        "format": INDEX_FORMAT,
        "split": split,
        "source": str(Path(table.root).resolve()),
        "layout": table.layout,
        "num_samples": len(table),
        "samples_per_shard": samples_per_shard,
        "seed": seed,
        "classes": list(table.classes),
        "shards": [{"name": shard_name(split, n), "samples": counts[n]} for n in range(len(plan))],
    }
    index_file = index_path(out, split)
    atomic_write_bytes(index_file, json.dumps(index, indent=1).encode(), temp=index_file.with_suffix(".json.partial"))
    return index_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write an ImageNet split as WebDataset-style tar shards.")
    parser.add_argument("root", help="dataset folder (any layout the loaders read)")
    parser.add_argument("--split", default="train", help="split folder to convert (default: train)")
    parser.add_argument("--out", required=True, help="folder for the shards and the index")
    parser.add_argument("--samples-per-shard", type=int, default=1000,
                        help="samples per shard (default 1000, about 110 MB of ImageNet)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the order samples are spread over shards")
    parser.add_argument("--jobs", type=int, default=1, help="shards written in parallel (default 1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = convert(args.root, args.split, args.out, samples_per_shard=args.samples_per_shard,
                       seed=args.seed, jobs=args.jobs)
    except (DataLayoutError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    meta = json.loads(path.read_text())
    print(f"{meta['num_samples']} samples in {len(meta['shards'])} shards; index {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
