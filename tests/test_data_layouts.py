"""Layouts read as users have them: ImageFolder, the raw ILSVRC2012 val folder labelled by the
devkit (meta.mat class order -> wnids) or by Kaggle's LOC_val_solution.csv, and the Kaggle tree."""

import csv
import io
import logging
import shutil
import subprocess
import tarfile

import numpy as np
import pytest
import torch
from scipy.io import savemat

from _data_util import build_imagefolder, sample_files, sample_wnid, small_jpeg

from data import DataLayoutError, EvalTransform, build_eval_loader, imagenet_wnids, resolve_data_root
from data.layouts import load_split

WNIDS = imagenet_wnids()


def write_raw_val(val_dir, wnids_of_images):
    """ILSVRC2012_val_00000001.JPEG ... from real photos; returns {number: wnid}."""
    files = sample_files()
    labels = {}
    for number, wnid in enumerate(wnids_of_images, start=1):
        photo = next(f for f in files if sample_wnid(f) == wnid)
        small_jpeg(photo, val_dir / f"ILSVRC2012_val_{number:08d}.JPEG", short_side=40)
        labels[number] = wnid
    return labels


def write_kaggle_csv(path, labels):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageId", "PredictionString"])
        for number, wnid in sorted(labels.items(), reverse=True):  # Kaggle's file is not sorted
            writer.writerow([f"ILSVRC2012_val_{number:08d}", f"{wnid} 10 20 30 40 {wnid} 1 2 3 4 "])


def devkit_ids():
    """A class order unlike the sorted one, as in the real devkit (ILSVRC2012_ID 1 = n02119789)."""
    order = np.random.default_rng(0).permutation(len(WNIDS))
    return {WNIDS[i]: rank + 1 for rank, i in enumerate(order)}


def devkit_files(labels):
    ids = devkit_ids()
    ground_truth = "".join(f"{ids[labels[n]]}\n" for n in sorted(labels)).encode()
    leaves = [(ids[w], w, "words", "gloss", 0) for w in WNIDS]
    inner = [(1001, "n00001740", "entity", "the root", 4), (1002, "n00002684", "object", "a thing", 7)]
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"), ("num_children", "O")]
    synsets = np.array(sorted(leaves, key=lambda s: s[0]) + inner, dtype=dtype).reshape(-1, 1)
    buffer = io.BytesIO()
    savemat(buffer, {"synsets": synsets})
    return ground_truth, buffer.getvalue()


def image_wnids():
    wnids = [sample_wnid(f) for f in sample_files()]
    return [wnids[i] for i in (3, 0, 2, 3, 1, 0, 2, 1)]


def expected_targets(labels, classes):
    return [classes.index(labels[n]) for n in sorted(labels)]


def test_imagefolder_classes_are_sorted_wnids(tmp_path):
    wnids = build_imagefolder(tmp_path, num_classes=4, per_class=2, val_per_class=1)
    table = load_split(tmp_path, "train")
    assert table.layout == "imagefolder" and table.classes == tuple(sorted(wnids))
    assert table.targets.dtype == np.int64 and table.paths.dtype.kind == "S"
    assert [table.classes[t] for t in table.targets] == [p.decode().split("/")[0] for p in table.paths]


@pytest.mark.parametrize("where", ["root", "split"])
def test_raw_val_with_kaggle_csv(tmp_path, where):
    build_imagefolder(tmp_path, num_classes=4, per_class=1, val_per_class=0)
    (tmp_path / "val").mkdir(exist_ok=True)
    labels = write_raw_val(tmp_path / "val", image_wnids())
    write_kaggle_csv((tmp_path if where == "root" else tmp_path / "val") / "LOC_val_solution.csv", labels)
    assert resolve_data_root(str(tmp_path)) == tmp_path
    table = load_split(tmp_path, "val")
    assert table.layout == "ilsvrc-val" and len(table) == 8
    assert table.targets.tolist() == expected_targets(labels, list(table.classes))


@pytest.mark.parametrize("packed", [False, True])
def test_raw_val_with_devkit_ground_truth_and_meta(tmp_path, packed):
    (tmp_path / "val").mkdir()
    labels = write_raw_val(tmp_path / "val", image_wnids())
    ground_truth, meta = devkit_files(labels)
    if packed:
        with tarfile.open(tmp_path / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
            for name, data in (("ILSVRC2012_validation_ground_truth.txt", ground_truth), ("meta.mat", meta)):
                info = tarfile.TarInfo(f"ILSVRC2012_devkit_t12/data/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    else:
        data_dir = tmp_path / "ILSVRC2012_devkit_t12" / "data"
        data_dir.mkdir(parents=True)
        (data_dir / "ILSVRC2012_validation_ground_truth.txt").write_bytes(ground_truth)
        (data_dir / "meta.mat").write_bytes(meta)
    # no train split: classes are all 1000 wnids in sorted order, as published weights expect
    loader = build_eval_loader(tmp_path, EvalTransform(32, 36), batch_size=3, workers=0)
    assert loader.num_classes == 1000 and loader.class_names[0] == "tench"
    targets = torch.cat([y for _, y, _ in loader]).tolist()
    assert targets == expected_targets(labels, list(WNIDS))
    assert loader.num_samples == 8


def test_kaggle_download_root_is_understood(tmp_path):
    cls_loc = tmp_path / "ILSVRC" / "Data" / "CLS-LOC"
    build_imagefolder(cls_loc, num_classes=4, per_class=1, val_per_class=0)
    (cls_loc / "val").mkdir(exist_ok=True)
    labels = write_raw_val(cls_loc / "val", image_wnids())
    write_kaggle_csv(tmp_path / "LOC_val_solution.csv", labels)
    root = resolve_data_root(str(tmp_path))
    assert root == cls_loc
    table = load_split(tmp_path, "val")
    assert table.targets.tolist() == expected_targets(labels, sorted(set(image_wnids())))
    # the loaders take the resolved root as it is, and say which folder to pass instead of the top
    assert build_eval_loader(root, EvalTransform(32, 36), batch_size=4, workers=0).num_samples == 8
    with pytest.raises(DataLayoutError, match=r"is a Kaggle download .*: pass .*CLS-LOC"):
        build_eval_loader(tmp_path, EvalTransform(32, 36), batch_size=4, workers=0)


def test_val_images_of_classes_missing_from_train_are_skipped(tmp_path, caplog):
    wnids = image_wnids()
    build_imagefolder(tmp_path, num_classes=3, per_class=1, val_per_class=0)  # lacks wnids[0]'s class
    (tmp_path / "val").mkdir(exist_ok=True)
    labels = write_raw_val(tmp_path / "val", wnids)
    write_kaggle_csv(tmp_path / "LOC_val_solution.csv", labels)
    with caplog.at_level(logging.WARNING, logger="data"):
        table = load_split(tmp_path, "val")
    assert len(table) == 8 - wnids.count(wnids[0])
    assert "skipping 2 images" in caplog.text


def test_raw_val_without_labels_says_where_it_looked(tmp_path):
    (tmp_path / "val").mkdir()
    write_raw_val(tmp_path / "val", image_wnids()[:2])
    with pytest.raises(DataLayoutError, match="no labels were found: looked for LOC_val_solution.csv"):
        resolve_data_root(str(tmp_path))


def test_labels_that_miss_images_are_an_error(tmp_path):
    (tmp_path / "val").mkdir()
    labels = write_raw_val(tmp_path / "val", image_wnids()[:3])
    del labels[2]
    write_kaggle_csv(tmp_path / "LOC_val_solution.csv", labels)
    with pytest.raises(DataLayoutError, match="no label for 1 images"):
        load_split(tmp_path, "val")


def test_stray_loose_files_and_mixed_layouts_are_refused(tmp_path):
    build_imagefolder(tmp_path, num_classes=2, per_class=1, val_per_class=1)
    small_jpeg(sample_files()[0], tmp_path / "val" / "holiday.jpg")
    with pytest.raises(DataLayoutError, match="mixes class folders and loose images"):
        resolve_data_root(str(tmp_path))
    other = tmp_path / "other"
    small_jpeg(sample_files()[0], other / "val" / "holiday.jpg")
    with pytest.raises(DataLayoutError, match=r"not ILSVRC2012_val_XXXXXXXX.JPEG files \(holiday.jpg\)"):
        resolve_data_root(str(other))


def refused_alike(root, split, match):
    """The quick check (resolve_data_root) and the full read (load_split) refuse with the same one line."""
    with pytest.raises(DataLayoutError, match=match) as quick:
        resolve_data_root(str(root))
    with pytest.raises(DataLayoutError, match=match) as full:
        load_split(root, split)
    assert str(quick.value) == str(full.value) and "\n" not in str(full.value)
    return str(full.value)


def test_val_folders_of_imagenet_wnids_alone_get_the_1000_class_order(tmp_path):
    wnids = build_imagefolder(tmp_path, num_classes=4, per_class=0, val_per_class=2)
    assert wnids == sorted(wnids) and WNIDS.index(wnids[-1]) > 3  # the subset's own order would differ
    table = load_split(tmp_path, "val")
    assert table.classes == WNIDS
    assert table.targets.tolist() == [WNIDS.index(w) for w in wnids for _ in range(2)]


def test_a_train_subset_of_wnids_keeps_its_own_classes_for_train_and_val(tmp_path):
    wnids = build_imagefolder(tmp_path, num_classes=3, per_class=1, val_per_class=1)
    for split in ("train", "val"):
        table = load_split(tmp_path, split)
        assert table.classes == tuple(wnids) and table.targets.tolist() == [0, 1, 2]


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_stray_folder_among_wnid_class_folders_is_refused(tmp_path, split):
    build_imagefolder(tmp_path, num_classes=3, per_class=1, val_per_class=1)
    if split == "val":  # a validation-only tree: its folders decide the classes
        shutil.rmtree(tmp_path / "train")
    small_jpeg(sample_files()[0], tmp_path / split / ".ipynb_checkpoints" / "a.JPEG")  # hidden: not read
    assert len(load_split(tmp_path, split)) == 3
    small_jpeg(sample_files()[0], tmp_path / split / "backup" / "a.JPEG")
    message = refused_alike(tmp_path, split, r"not ImageNet class folders \(backup\) next to 3 wnid class folders")
    assert message.endswith(f"move them out of {tmp_path / split}")


def test_unextracted_per_class_archives_get_the_command_that_extracts_them(tmp_path):
    wnids = build_imagefolder(tmp_path, num_classes=3, per_class=2, val_per_class=1)
    for wnid in wnids:  # as ILSVRC2012_img_train.tar holds them: one tar of JPEGs per class
        with tarfile.open(tmp_path / "train" / f"{wnid}.tar", "w") as tar:
            for jpeg in sorted((tmp_path / "train" / wnid).iterdir()):
                tar.add(jpeg, arcname=jpeg.name)
        shutil.rmtree(tmp_path / "train" / wnid)
    message = refused_alike(tmp_path, "train", r"holds 3 unextracted per-class archives \(n\d{8}.tar, ")
    # --data takes the same path: per-class archives are not taken for WebDataset shards
    from data.index import read_source
    from data.shard_index import is_shard_dir
    assert not is_shard_dir(tmp_path)
    with pytest.raises(DataLayoutError, match="unextracted per-class archives"):
        read_source(tmp_path, "train")
    assert "for f in n*.tar; do" in message
    # the suggested loop, run as printed, gives a tree that reads
    subprocess.run(message.split("remove it: ", 1)[1], shell=True, check=True)
    assert len(load_split(tmp_path, "train")) == 6 and not list((tmp_path / "train").glob("*.tar"))
    # half extracted: the archives left would be classes missing from the data
    with tarfile.open(tmp_path / "train" / f"{wnids[0]}.tar", "w"):
        pass
    refused_alike(tmp_path, "train", r"holds 1 unextracted per-class archives")


def test_devkit_ground_truth_without_meta_mat_says_meta_mat_is_missing(tmp_path):
    (tmp_path / "val").mkdir()
    labels = write_raw_val(tmp_path / "val", image_wnids()[:2])
    ground_truth, _ = devkit_files(labels)
    (tmp_path / "ILSVRC2012_validation_ground_truth.txt").write_bytes(ground_truth)
    refused_alike(tmp_path, "val", r"ground_truth.txt was found but no meta.mat next to it: .* copy meta.mat")
