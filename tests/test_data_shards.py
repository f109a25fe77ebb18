"""Tar shards: the converter (progress, index, resumable, deterministic) and the streamed loaders
(equal batches per rank, exact resume, every eval sample once, broken samples and shards survived)."""

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from _data_util import build_imagefolder, write_cmyk, write_zero_byte

from data import (DataLayoutError, EvalTransform, LoaderOptions, TrainTransform, build_eval_loader,
                  build_train_loader, resolve_data_root)
from data.shards import convert, read_index

REPO = Path(__file__).resolve().parents[1]


def shard_cli(*args):
    return subprocess.run([sys.executable, "-m", "data.shards", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    build_imagefolder(root, num_classes=4, per_class=10, val_per_class=5, short_side=40)
    write_cmyk(root / "train" / sorted(os.listdir(root / "train"))[0] / "cmyk.JPEG")
    write_zero_byte(root / "train" / sorted(os.listdir(root / "train"))[1] / "empty.JPEG")
    return root  # 42 train images (one broken), 20 val images


@pytest.fixture(scope="module")
def shards(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    convert(source, "train", out, samples_per_shard=5, show_progress=False)
    convert(source, "val", out, samples_per_shard=3, show_progress=False)
    return out


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_cli_writes_indexed_webdataset_style_shards(source, tmp_path):
    run = shard_cli(source, "--split", "train", "--out", tmp_path, "--samples-per-shard", "8")
    assert run.returncode == 0, run.stderr
    assert "42 samples in 6 shards" in run.stdout and "train shards" in run.stderr  # the progress bar
    index = json.loads((tmp_path / "train-index.json").read_text())
    assert [s["samples"] for s in index["shards"]] == [8, 8, 8, 8, 8, 2] and index["num_samples"] == 42
    assert index["classes"] == sorted(os.listdir(source / "train"))
    labels = Counter()
    for shard in index["shards"]:
        with tarfile.open(tmp_path / shard["name"]) as tar:
            names = tar.getnames()
            assert len(names) == 2 * shard["samples"]
            for image, cls in zip(names[::2], names[1::2]):
                assert image.rsplit(".", 1)[0] == cls.rsplit(".", 1)[0] and cls.endswith(".cls")
                assert image.endswith(".jpg") and "." not in image.rsplit("/", 1)[-1][:-4]
                labels[int(tar.extractfile(cls).read())] += 1
    assert labels == Counter({0: 11, 1: 11, 2: 10, 3: 10})
    first = tmp_path / index["shards"][0]["name"]
    with tarfile.open(first) as tar:
        assert len({int(tar.extractfile(n).read()) for n in tar.getnames()[1::2]}) > 1  # classes mixed


def test_conversion_resumes_and_is_deterministic(source, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    convert(source, "train", a, samples_per_shard=8, show_progress=False)
    convert(source, "train", b, samples_per_shard=8, show_progress=False)
    names = sorted(p.name for p in a.glob("*.tar"))
    assert {n: digest(a / n) for n in names} == {n: digest(b / n) for n in names}
    # an interruption: one shard missing, one cut short, a temporary file left behind
    (b / names[1]).unlink()
    data = (b / names[2]).read_bytes()
    (b / names[2]).write_bytes(data[: len(data) // 2])
    (b / f".{names[3]}.partial").write_bytes(b"junk")
    (b / "train-index.json").unlink()
    untouched = os.stat(b / names[0]).st_mtime_ns
    run = shard_cli(source, "--split", "train", "--out", b, "--samples-per-shard", "8")
    assert run.returncode == 0, run.stderr
    assert "4 of 6 shards already complete" in run.stderr
    assert os.stat(b / names[0]).st_mtime_ns == untouched
    assert {n: digest(a / n) for n in names} == {n: digest(b / n) for n in names}
    assert (a / "train-index.json").read_text() == (b / "train-index.json").read_text()
    clash = shard_cli(source, "--split", "train", "--out", b, "--samples-per-shard", "5")
    assert clash.returncode == 2 and "written from other files or settings" in clash.stderr


def batches_of(shards, *, workers, epoch=0, start_batch=0, rank=0, world_size=1, batch_size=4, buffer=8):
    loader = build_train_loader(shards, TrainTransform(32), batch_size=batch_size, workers=workers, rank=rank,
                                world_size=world_size, seed=5, options=LoaderOptions(shuffle_buffer=buffer))
    loader.set_epoch(epoch, start_batch)
    return loader, list(loader)


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for p, q in zip(a, b) for x, y in zip(p, q))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_rank_gets_the_same_number_of_full_batches(shards, world_size):
    for rank in range(world_size):
        loader, batches = batches_of(shards, workers=2 if rank == 0 else 0, rank=rank, world_size=world_size)
        assert len(loader) == len(batches) == 42 // (4 * world_size)
        assert all(x.shape == (4, 3, 32, 32) and x.dtype == torch.uint8 for x, _, _ in batches)
        assert loader.num_samples == 42 and loader.num_classes == 4


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_is_reproducible_and_resumes_exactly(shards, workers):
    _, whole = batches_of(shards, workers=workers, epoch=2)
    _, again = batches_of(shards, workers=workers, epoch=2)
    assert same(whole, again)
    for start in (1, 4, 7):
        _, resumed = batches_of(shards, workers=workers, epoch=2, start_batch=start)
        assert same(whole[start:], resumed)
    _, other_epoch = batches_of(shards, workers=workers, epoch=3)
    assert not same(whole, other_epoch)


def test_an_epoch_covers_the_data_without_class_starvation(shards):
    _, batches = batches_of(shards, workers=0, batch_size=6, buffer=20)
    counts = Counter(torch.cat([y for _, y, _ in batches]).tolist())
    assert sum(counts.values()) == 42 and set(counts) == {0, 1, 2, 3}


def test_more_reader_slots_than_shards_still_splits_the_stream(source, tmp_path):
    few = tmp_path / "few"
    convert(source, "train", few, samples_per_shard=40, show_progress=False)
    assert len(read_index(few, "train").shards) == 2
    totals = [len(batches_of(few, workers=2, rank=r, world_size=2, batch_size=3)[1]) for r in range(2)]
    assert totals == [42 // 6, 42 // 6]


def test_eval_over_shards_sees_every_image_once(shards, source):
    folder = build_eval_loader(source, EvalTransform(32, 36), batch_size=4, workers=0)
    expected = Counter(hashlib.sha1(x.numpy().tobytes()).hexdigest() for b, _, _ in folder for x in b)
    for world_size, workers in ((1, 0), (2, 2), (3, 0), (9, 0)):
        seen = Counter()
        for rank in range(world_size):
            loader = build_eval_loader(shards, EvalTransform(32, 36), batch_size=4, workers=workers,
                                       rank=rank, world_size=world_size)
            batches = list(loader)
            assert len(batches) == len(loader)
            assert sum(len(y) for _, y, _ in batches) == loader.rank_num_samples
            seen.update(hashlib.sha1(x.numpy().tobytes()).hexdigest() for b, _, _ in batches for x in b)
        assert seen == expected and loader.num_samples == 20


def test_broken_sample_is_replaced_flagged_and_logged_once(shards, caplog):
    caplog.set_level(logging.WARNING, logger="data")
    for workers, batch_size in ((0, 42), (2, 21)):
        caplog.clear()
        loader = build_train_loader(shards, TrainTransform(32), batch_size=batch_size, workers=workers, seed=5,
                                    options=LoaderOptions(shuffle_buffer=50))
        flagged = []
        for epoch in range(3):
            loader.set_epoch(epoch)
            flagged.append(sum(int(bad.sum()) for _, _, bad in loader))
        if workers == 0:  # one reader, one batch: exactly one pass over the 42 samples
            assert flagged == [1, 1, 1]
        else:  # two readers dealt whole shards: each trims or tops up its half, so 0-2 times
            assert sum(flagged) >= 1 and max(flagged) <= 2
        logged = [r.getMessage() for r in caplog.records if "unreadable image" in r.getMessage()]
        assert len(logged) == 1 and "/empty (" in logged[0] and str(shards) in logged[0]


@pytest.mark.parametrize("cut", ["inside a member", "between samples"])
def test_truncated_shard_is_reported_and_the_stream_goes_on(source, tmp_path, caplog, cut):
    out = tmp_path / "cut"
    convert(source, "train", out, samples_per_shard=5, show_progress=False)
    victim = out / "train-000003.tar"
    with tarfile.open(victim) as tar:
        second_sample = tar.getmembers()[2].offset  # tar cannot tell a cut here from a proper end
    victim.write_bytes(victim.read_bytes()[:second_sample + (700 if cut == "inside a member" else 0)])
    caplog.set_level(logging.WARNING, logger="data")
    loader, batches = batches_of(out, workers=0, batch_size=4)
    assert len(batches) == len(loader) == 10
    assert any("train-000003.tar" in r.getMessage() and "unreadable shard" in r.getMessage() for r in caplog.records)


def test_shard_dir_errors_name_the_fix(shards, source, tmp_path):
    assert resolve_data_root(str(shards)) == shards
    broken = tmp_path / "broken"
    broken.mkdir()
    meta = json.loads((shards / "train-index.json").read_text())
    (broken / "train-index.json").write_text(json.dumps(meta))
    for val_file in shards.glob("val-*"):  # a complete val split does not hide the train split's gaps
        shutil.copyfile(val_file, broken / val_file.name)
    with pytest.raises(DataLayoutError, match="lacks 9 shards listed in train-index.json"):
        resolve_data_root(str(broken))
    only_train = tmp_path / "only_train"
    convert(source, "train", only_train, samples_per_shard=20, show_progress=False)
    with pytest.raises(DataLayoutError, match="--split val --out"):
        build_eval_loader(only_train, EvalTransform(), batch_size=4, workers=0)
