"""The split index made once per job: the run folder's copy is read while the tree is unchanged,
and any change to the tree (a file added, removed or renamed, a class folder added, a label file
or a shard rewritten) makes it list the tree again."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from _data_util import build_imagefolder, copy_sample
from _train_util import TINY, demo_root, run
from data.index import IndexCache, read_source, tree_stamp
from data.shards import convert


def same_table(a, b) -> bool:
    return (a.root, a.classes, a.layout) == (b.root, b.classes, b.layout) and np.array_equal(a.paths, b.paths) \
        and np.array_equal(a.targets, b.targets)


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "tree"
    build_imagefolder(root, num_classes=3, per_class=4, val_per_class=2, short_side=32)
    return root


def test_a_kept_index_is_read_back_while_the_tree_is_unchanged(tree, tmp_path):
    cache = IndexCache(tmp_path / "run" / "data-index")
    first = cache.index(tree, "train")
    assert not first.cached and len(first.source) == 12
    cache.keep(first)
    second = cache.index(tree, "train")
    assert second.cached and same_table(second.source, first.source)
    assert same_table(second.source, read_source(tree, "train"))
    assert "read from the run folder's copy" in second.describe() and "listed" in first.describe()
    cache.keep(second)  # a copy read back is not written again
    assert cache.index(tree, "val").cached is False  # each split has its own copy


@pytest.mark.parametrize("change", ["add", "remove", "rename", "new_class", "touch_root"])
def test_any_change_to_the_tree_lists_it_again(tree, tmp_path, change):
    cache = IndexCache(tmp_path / "copies")
    cache.keep(cache.index(tree, "train"))
    some_class = sorted((tree / "train").iterdir())[0]
    some_file = sorted(some_class.iterdir())[0]
    if change == "add":
        copy_sample(some_class / "extra.JPEG")
    elif change == "remove":
        some_file.unlink()
    elif change == "rename":
        some_file.rename(some_class / "renamed.JPEG")
    elif change == "new_class":
        shutil.copytree(some_class, tree / "train" / "n99999999")
    else:  # a label file (or anything) appearing at the data root
        (tree / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n")
    again = cache.index(tree, "train")
    assert not again.cached
    assert same_table(again.source, read_source(tree, "train"))


def test_a_damaged_or_foreign_copy_is_only_a_slower_start(tree, tmp_path, caplog):
    cache = IndexCache(tmp_path / "copies")
    cache.keep(cache.index(tree, "train"))
    (tmp_path / "copies" / "train.npz").write_bytes(b"not an npz")
    again = cache.index(tree, "train")
    assert not again.cached and len(again.source) == 12
    assert "ignoring the index copy" in caplog.text
    other = tmp_path / "other"
    shutil.copytree(tree, other)
    cache.keep(cache.index(tree, "train"))
    assert not cache.index(other, "train").cached  # another data root: not this copy


def test_shard_indexes_are_kept_and_a_rewritten_shard_is_read_again(tree, tmp_path):
    shards = tmp_path / "shards"
    convert(tree, "train", shards, samples_per_shard=5, show_progress=False)
    cache = IndexCache(tmp_path / "copies")
    first = cache.index(shards, "train")
    cache.keep(first)
    second = cache.index(shards, "train")
    assert second.cached and second.source == first.source and sum(second.source.counts) == 12
    shard = shards / second.source.shards[0]
    stat = shard.stat()
    shard.write_bytes(shard.read_bytes() + b"\0" * 512)  # same name, other size
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert not cache.index(shards, "train").cached


def test_the_stamp_does_not_stat_every_file_of_a_flat_folder(tmp_path):
    flat = tmp_path / "root" / "val"
    flat.mkdir(parents=True)
    for i in range(50):
        (flat / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(b"")
    stamped = {row[0] for row in tree_stamp(tmp_path / "root", "val")}
    assert str(flat) in stamped and not any(p.endswith(".JPEG") for p in stamped)


def test_a_second_start_of_the_same_run_does_not_list_the_tree(tmp_path):
    data = demo_root(tmp_path)
    out = tmp_path / "run"
    args = [*TINY, "--data", str(data), "--batch-size", "50", "--output-dir", str(out)]
    first = run([*args, "--epochs", "1"], nproc=2)
    assert first.returncode == 0, first.stdout
    assert "train index: 500 samples, listed" in first.stdout and "val index: 100 samples, listed" in first.stdout
    assert sorted(p.name for p in (out / "data-index").iterdir()) == ["train.npz", "val.npz"]
    second = run([*args, "--epochs", "2"], nproc=2)
    assert second.returncode == 0, second.stdout
    assert second.stdout.count("read from the run folder's copy") == 2 and " listed" not in second.stdout
    copy_sample(sorted((data / "train").iterdir())[0] / "added.JPEG")  # the tree changes between starts
    third = run([*args, "--epochs", "3"], nproc=2)
    assert third.returncode == 0, third.stdout
    assert "train index: 501 samples, listed" in third.stdout and "val index: 100 samples, read" in third.stdout
