"""WebDataset shards we did not write, read through the same loaders with the same guarantees: the
``webdataset`` library's own (no index: found by name and counted) and Hugging Face's
timm/imagenet-1k-wds layout (``_info.json``); and our shards read by ``webdataset`` and by timm."""

import hashlib
import io
import json
from collections import Counter

import pytest
import torch
import webdataset as wds
from PIL import Image

from _data_util import build_imagefolder, folder_samples, write_webdataset

from data import (DataLayoutError, EvalTransform, LoaderOptions, TrainTransform, build_eval_loader,
                  build_train_loader, imagenet_wnids, resolve_data_root)
from data.shard_stream import iter_shard
from data.shards import convert, read_index


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    build_imagefolder(root, num_classes=4, per_class=10, val_per_class=5, short_side=40)
    return root  # 40 train images, 20 val images


@pytest.fixture(scope="module")
def wds_dir(source, tmp_path_factory):
    """DIR/train-000000.tar ... (8 shards of 5) and DIR/val-000000.tar ... (7 shards, 3 or 2)."""
    out = tmp_path_factory.mktemp("wds")
    write_webdataset(folder_samples(source / "train"), str(out / "train-%06d.tar"), maxcount=5)
    write_webdataset(folder_samples(source / "val"), str(out / "val-%06d.tar"), maxcount=3)
    return out


def write_hf_folder(source, out, *, relabel=None, **info):
    """Hugging Face's timm/imagenet-1k-wds layout: imagenet1k-{train,validation}-NNNN.tar shards
    with <key>.jpg, <key>.cls (the ILSVRC-2012 label) and <key>.json members, and an _info.json in
    the structure timm's wds reader reads. ``relabel``: {key: label} overrides."""
    wnids = imagenet_wnids()
    splits = {}
    for split, hf_split, per_shard in (("train", "train", 16), ("val", "validation", 8)):
        samples = folder_samples(source / split, label_of=wnids.index)
        for sample in samples:
            sample["cls"] = (relabel or {}).get(sample["__key__"], sample["cls"])
            sample["json"] = {"filename": sample["__key__"].split("/")[-1] + ".JPEG", "label": sample["cls"]}
        paths = write_webdataset(samples, str(out / f"imagenet1k-{hf_split}-%04d.tar"), maxcount=per_shard)
        lengths = [min(per_shard, len(samples) - i) for i in range(0, len(samples), per_shard)]
        splits[hf_split] = {"name": hf_split, "num_samples": len(samples), "filenames": [p.name for p in paths],
                            "shard_lengths": lengths}
    (out / "_info.json").write_text(json.dumps({"name": "imagenet-1k", "splits": splits, **info}))
    return out


def eval_seen(root, *, world_size=1, workers=0):
    """(pixel hash, target) of every evaluation sample over all ranks, and the last rank's loader."""
    seen = Counter()
    for rank in range(world_size):
        loader = build_eval_loader(root, EvalTransform(32, 36), batch_size=4, workers=workers, rank=rank,
                                   world_size=world_size)
        batches = list(loader)
        assert len(batches) == len(loader) and sum(len(y) for _, y, _ in batches) == loader.rank_num_samples
        seen.update((hashlib.sha1(x.numpy().tobytes()).hexdigest(), int(t))
                    for images, targets, _ in batches for x, t in zip(images, targets))
    return seen, loader


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for p, q in zip(a, b) for x, y in zip(p, q))


def test_webdataset_shards_are_found_and_counted_without_writing_anything(wds_dir):
    before = sorted(p.name for p in wds_dir.iterdir())
    assert resolve_data_root(str(wds_dir)) == wds_dir
    train, val = read_index(wds_dir, "train"), read_index(wds_dir, "val")
    assert train.shards == tuple(f"train-{i:06d}.tar" for i in range(8)) and train.counts == (5,) * 8
    assert val.counts == (3,) * 6 + (2,) and val.num_samples == 20
    assert train.classes == val.classes == ("0", "1", "2", "3") and train.counts_from == ""
    assert sorted(p.name for p in wds_dir.iterdir()) == before


@pytest.mark.parametrize("world_size,workers", [(1, 0), (2, 0), (2, 2)])
def test_every_val_sample_comes_once_over_ranks_and_workers(source, wds_dir, world_size, workers):
    expected, _ = eval_seen(source)  # the same files read from the image folder
    seen, loader = eval_seen(wds_dir, world_size=world_size, workers=workers)
    assert seen == expected and loader.num_samples == 20 and loader.classes == ["0", "1", "2", "3"]


@pytest.mark.parametrize("workers,rank,world_size", [(0, 0, 1), (2, 1, 2)])
def test_training_resumes_bitwise_mid_epoch(wds_dir, workers, rank, world_size):
    def epoch_from(start):
        loader = build_train_loader(wds_dir, TrainTransform(32), batch_size=4, workers=workers, rank=rank,
                                    world_size=world_size, seed=3, options=LoaderOptions(shuffle_buffer=8))
        loader.set_epoch(1, start_batch=start)
        return loader, list(loader)

    loader, whole = epoch_from(0)
    assert len(whole) == len(loader) == 40 // (4 * world_size) and loader.num_classes == 4
    for start in (2, len(whole) - 1):
        assert same(whole[start:], epoch_from(start)[1])


def test_split_folders_of_shards(source, tmp_path):
    write_webdataset(folder_samples(source / "train"), str(tmp_path / "train" / "part-%04d.tar"), maxcount=16)
    write_webdataset(folder_samples(source / "val"), str(tmp_path / "validation" / "part-%04d.tar"), maxcount=16)
    assert read_index(tmp_path, "train").shards == tuple(f"train/part-{i:04d}.tar" for i in range(3))
    val = read_index(tmp_path, "val")
    assert val.shards == ("validation/part-0000.tar", "validation/part-0001.tar") and val.counts == (16, 4)
    assert sum(len(y) for _, y, _ in build_eval_loader(tmp_path, EvalTransform(32, 36), batch_size=8, workers=0)) == 20


def test_hugging_face_layout_reads_info_json(source, wds_dir, tmp_path):
    hf = write_hf_folder(source, tmp_path, num_classes=1000)
    index = read_index(hf, "val")  # our "val" is HF's "validation"
    info = json.loads((hf / "_info.json").read_text())["splits"]["validation"]
    assert index.shards == tuple(info["filenames"]) and index.counts == (8, 8, 4) and index.counts_from == "_info.json"
    assert index.classes == imagenet_wnids()
    seen, loader = eval_seen(hf, world_size=2, workers=2)
    assert loader.num_classes == 1000 and sum(seen.values()) == 20
    expected, folder = eval_seen(source)
    # the same images, and each label names the image's own ImageNet class
    assert Counter({(h, imagenet_wnids().index(folder.classes[t])): n for (h, t), n in expected.items()}) == seen
    train = build_train_loader(hf, TrainTransform(32), batch_size=8, workers=0)
    assert train.classes == loader.classes and len(train) == 5


def test_classes_come_from_the_labels_of_every_split_without_num_classes(source, tmp_path):
    few = write_hf_folder(source, tmp_path / "few")  # labels 0, 10, 20, 30: the classes are "0" .. "30"
    assert read_index(few, "val").classes == tuple(str(i) for i in range(31))
    some_key = folder_samples(source / "train")[0]["__key__"]
    full = write_hf_folder(source, tmp_path / "full", relabel={some_key: 999})  # a train label of 999
    assert read_index(full, "val").classes == read_index(full, "train").classes == imagenet_wnids()


def test_missing_split_or_shards_name_what_is_expected(source, tmp_path):
    samples = folder_samples(source / "val")
    write_webdataset(samples, str(tmp_path / "anon" / "shard-%06d.tar"), maxcount=8)
    with pytest.raises(DataLayoutError, match=r"has no train shards: found 3 .tar files \(shard-000000.tar, .*"
                                              r"named like train-000000.tar or imagenet1k-train-0000.tar"):
        resolve_data_root(str(tmp_path / "anon"))
    with pytest.raises(DataLayoutError, match=r"val/\*.tar or .*validation/\*.tar"):
        build_eval_loader(tmp_path / "anon", EvalTransform(32, 36), batch_size=4, workers=0)
    only_train = write_hf_folder(source, tmp_path / "hf")
    info = json.loads((only_train / "_info.json").read_text())
    del info["splits"]["validation"]
    (only_train / "_info.json").write_text(json.dumps(info))
    assert resolve_data_root(str(only_train)) == only_train
    with pytest.raises(DataLayoutError, match=r"_info.json has no 'val' or 'validation' split \(it has: 'train'\)"):
        build_eval_loader(only_train, EvalTransform(32, 36), batch_size=4, workers=0)


def test_our_shards_read_with_webdataset_and_timm(source, tmp_path):
    convert(source, "val", tmp_path, samples_per_shard=6, show_progress=False)
    index = read_index(tmp_path, "val")
    assert index.counts == (6, 6, 6, 2)
    ours = [(raw.name.split(":", 1)[1], raw.image, raw.target)
            for shard in range(len(index.shards)) for raw in iter_shard(index.path(shard), [])]
    urls = str(tmp_path / "val-{000000..000003}.tar")
    theirs = [(s["__key__"], s["jpg"], int(s["cls"])) for s in wds.WebDataset(urls, shardshuffle=False)]
    assert theirs == ours and len(ours) == 20

    from timm.data import create_dataset

    dataset = create_dataset("wds/ours", root=str(tmp_path), split="val-{000000..000003}.tar|20", is_training=False)
    images, targets = zip(*dataset)
    assert list(targets) == [target for _, _, target in ours]
    assert [image.size for image in images] == [Image.open(io.BytesIO(data)).size for _, data, _ in ours]
