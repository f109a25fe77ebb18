"""An unreadable shard is named when the loader is built, in one line, never lost in silence: ours
(checked against the index: every val shard read through, train shards opened) and WebDataset's
(counted, so read through); and a reader slot whose shards all broke later names them too."""

import json
import logging
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

from _data_util import build_imagefolder, folder_samples, write_webdataset

from data import DataLayoutError, EvalTransform, TrainTransform, build_eval_loader, build_train_loader
from data.shard_index import member_key
from data.shards import convert

REPO = Path(__file__).resolve().parents[1]

BREAKS = ["not a tar", "0-byte", "empty tar", "cut between samples", "cut inside a member"]
SAID = {"not a tar": "is not a readable tar", "0-byte": "is a 0-byte file", "empty tar": "is an empty tar",
        "cut between samples": "is truncated: it ends without tar's end-of-archive block",
        "cut inside a member": "is truncated"}


def break_shard(path, how):
    if how == "not a tar":
        path.write_text("<html>404 Not Found</html>\n")
    elif how == "0-byte":
        path.write_bytes(b"")
    elif how == "empty tar":
        tarfile.open(path, "w").close()
    else:
        with tarfile.open(path) as tar:
            first_key = member_key(tar.getmembers()[0].name)[0]
            second_sample = next(m for m in tar.getmembers() if member_key(m.name)[0] != first_key)
        cut = second_sample.offset if how == "cut between samples" else second_sample.offset_data + 10
        path.write_bytes(path.read_bytes()[:cut])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Our shards and WebDataset's of the same images: train 40 in shards of 5, val 20 in shards of 3."""
    source = tmp_path_factory.mktemp("src")
    build_imagefolder(source, num_classes=4, per_class=10, val_per_class=5, short_side=40)
    ours, theirs = tmp_path_factory.mktemp("ours"), tmp_path_factory.mktemp("theirs")
    for split, per_shard in (("train", 5), ("val", 3)):
        convert(source, split, ours, samples_per_shard=per_shard, show_progress=False)
        write_webdataset(folder_samples(source / split), str(theirs / f"{split}-%06d.tar"), maxcount=per_shard)
    return {"ours": ours, "webdataset": theirs}


def build(root, split):
    if split == "train":
        return build_train_loader(root, TrainTransform(32), batch_size=4, workers=0)
    return build_eval_loader(root, EvalTransform(32, 36), batch_size=4, workers=0)


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("kind", ["ours", "webdataset"])
@pytest.mark.parametrize("how", BREAKS)
def test_a_broken_shard_is_named_when_the_loader_is_built(folders, tmp_path, caplog, split, kind, how):
    root = shutil.copytree(folders[kind], tmp_path / kind)
    break_shard(root / f"{split}-000001.tar", how)
    # Our train shards are only opened at the start (a full read of ImageNet's would take minutes):
    # a cut after the first sample is reported by the stream, which goes on.
    if kind == "ours" and split == "train" and how.startswith("cut"):
        caplog.set_level(logging.WARNING, logger="data")
        loader = build(root, split)
        assert len(list(loader)) == len(loader) == 10
        assert any(f"{split}-000001.tar" in r.getMessage() and "unreadable shard" in r.getMessage()
                   for r in caplog.records)
        return
    with pytest.raises(DataLayoutError) as caught:
        build(root, split)
    message = str(caught.value)
    assert "\n" not in message and f"1 of the {8 if split == 'train' else 7} {split} shards in {root}" in message
    assert f"{split}-000001.tar {SAID[how]}" in message
    assert ("rerun the `python -m data.shards" if kind == "ours" else "copy them again") in message


def test_every_bad_shard_is_named_and_counts_are_checked(folders, tmp_path):
    root = shutil.copytree(folders["ours"], tmp_path / "ours")
    for number, how in enumerate(BREAKS):
        break_shard(root / f"val-00000{number}.tar", how)
    with pytest.raises(DataLayoutError, match=r"5 of the 7 val shards .*val-000000.tar is not a readable tar.*"
                                              r"val-000003.tar is truncated.*; and 1 more; rerun"):
        build(root, "val")
    # a shard replaced by a readable one of another size: the index's count decides
    other = shutil.copytree(folders["webdataset"], tmp_path / "theirs")
    shutil.copyfile(other / "val-000006.tar", root / "val-000002.tar")  # 2 samples where 3 are listed
    for number in (0, 1, 3, 4):
        shutil.copyfile(folders["ours"] / f"val-00000{number}.tar", root / f"val-00000{number}.tar")
    with pytest.raises(DataLayoutError, match=r"1 of the 7 .*val-000002.tar holds 2 samples where val-index.json "
                                              r"lists 3 \(truncated or replaced\?\)"):
        build(root, "val")


def test_info_json_counts_are_checked_in_evaluation(folders, tmp_path):
    root = shutil.copytree(folders["webdataset"], tmp_path / "hf")
    names = {split: sorted(p.name for p in root.glob(f"{split}-*.tar")) for split in ("train", "val")}
    lengths = {"train": [5] * 8, "val": [3] * 6 + [3]}  # the last val shard holds 2
    splits = {hf: {"name": hf, "num_samples": sum(lengths[split]), "filenames": names[split],
                   "shard_lengths": lengths[split]} for split, hf in (("train", "train"), ("val", "validation"))}
    (root / "_info.json").write_text(json.dumps({"splits": splits, "num_classes": 4}))
    with pytest.raises(DataLayoutError, match=r"val-000006.tar holds 2 samples where _info.json lists 3 .*; "
                                              r"copy them again"):
        build(root, "val")
    assert len(build(root, "train")) == 10


SLOT_SCRIPT = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from data import DataLayoutError, TrainTransform, build_train_loader
    loader = build_train_loader(sys.argv[2], TrainTransform(32), batch_size=4, workers=int(sys.argv[3]))
    for shard in Path(sys.argv[2]).glob("train-*.tar"):  # after the build's checks
        shard.write_text("<html>404 Not Found</html>")
    loader.set_epoch(0)
    try:
        list(loader)
    except DataLayoutError as err:
        print(err, flush=True)
    # Workers left behind by an epoch that raised ignore SIGTERM, which the interpreter's exit
    # sends them before waiting for them; a run ends without that teardown.
    os._exit(0)
""")


@pytest.mark.parametrize("workers", [0, 2])
def test_a_reader_slot_whose_shards_all_broke_names_them(folders, tmp_path, workers):
    root = shutil.copytree(folders["ours"], tmp_path / "ours")
    run = subprocess.run([sys.executable, "-c", SLOT_SCRIPT, str(REPO), str(root), str(workers)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    message = run.stdout.strip()
    assert "\n" not in message and message.startswith("reader slot 0 of ")
    assert "train-000000.tar" in message and "unreadable shard, rest skipped" in message
    assert "changed or removed after the loader was built" in message
