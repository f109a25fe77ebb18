"""Evaluation counts real images only: an unreadable validation file is left out of top-1, top-5,
loss and the image count, counted apart, and listed once in the run folder however often the set is
evaluated or the run resumed; from image folders and from tar shards, on one rank and on two."""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import textwrap

import pytest
import torch
from torch import nn

from _data_util import write_not_an_image, write_truncated

from data import (IMAGENET_MEAN, IMAGENET_STD, DataLayoutError, EvalTransform, TrainTransform, build_eval_loader,
                  build_train_loader)
from data.shards import convert
from densenet.training.distributed import DistInfo
from densenet.training.evaluation import evaluate
from densenet.training.inputs import DeviceNormalize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = DistInfo(0, 1, 0, torch.device("cpu"), None, "single")


def classifier(num_classes=4):
    torch.manual_seed(0)
    return nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, num_classes))


def evaluate_on(loader):
    normalize = DeviceNormalize(IMAGENET_MEAN, IMAGENET_STD, CPU.device, channels_last=False)
    return evaluate(classifier(), loader, info=CPU, normalize=normalize, amp_dtype=None)


def run_eval(root, workers=0, record_to=None, **kw):
    loader = build_eval_loader(root, EvalTransform(32, 36), batch_size=2, workers=workers, **kw)
    if record_to is not None:
        loader.record_unreadable_to(record_to)
    return evaluate_on(loader)


def with_broken_val_files(photos, dest, count=1):
    """The photos tree (4 readable val images, one per class) plus broken val files: a truncated
    JPEG, then a page of HTML saved as .JPEG."""
    shutil.copytree(photos, dest)
    classes = sorted(os.listdir(dest / "val"))
    writers = [write_truncated, write_not_an_image]
    return dest, [writers[i](dest / "val" / classes[-i] / "zz_broken.JPEG") for i in range(count)]


def listed(path):
    return [line.split("\t") for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def clean(photos):
    return run_eval(photos)


@pytest.mark.parametrize("workers", [0, 2])
def test_an_unreadable_val_file_is_left_out_and_counted(photos, tmp_path, clean, workers):
    root, (broken,) = with_broken_val_files(photos, tmp_path / "tree")
    result = run_eval(root, workers)
    assert (clean.count, clean.unreadable) == (4, 0)
    assert (result.count, result.unreadable) == (4, 1)
    # the same four images give the same metrics: the placeholder never reached them
    assert (result.top1, result.top5) == (clean.top1, clean.top5)
    assert result.loss == pytest.approx(clean.loss, rel=1e-6)
    assert result.as_dict("val_")["val_unreadable"] == 1 and result.as_dict("val_")["val_count"] == 4


def test_eval_batches_flag_the_placeholder_with_target_minus_one(photos, tmp_path):
    root, _ = with_broken_val_files(photos, tmp_path / "tree")
    loader = build_eval_loader(root, EvalTransform(32, 36), batch_size=8, workers=0)
    (images, targets, bad), = list(loader)
    assert bad.tolist() == [False, True, False, False, False]  # the first class's second file
    assert targets[1] == -1 and not images[1].any() and targets[bad.logical_not()].min() >= 0


def test_shards_leave_unreadable_and_lost_samples_out(photos, tmp_path, clean):
    root, _ = with_broken_val_files(photos, tmp_path / "tree")
    shards = tmp_path / "shards"
    convert(root, "val", shards, samples_per_shard=2, show_progress=False)
    for workers in (0, 2):
        result = run_eval(shards, workers)
        assert (result.count, result.unreadable) == (4, 1)
        assert (result.top1, result.top5) == (clean.top1, clean.top5)
        assert result.loss == pytest.approx(clean.loss, rel=1e-6)
    # a shard cut after its first sample: refused when the loader is built, naming the shard
    victim = shards / "val-000000.tar"
    whole = victim.read_bytes()
    with tarfile.open(victim) as tar:
        second = [m for m in tar.getmembers() if m.isfile()][2].offset
    victim.write_bytes(whole[:second])
    with pytest.raises(DataLayoutError, match=r"1 of the 3 val shards .* val-000000.tar is truncated"):
        run_eval(shards)
    # cut after the loader was built: the sample it lost is unreadable too, not a crash
    victim.write_bytes(whole)
    loader = build_eval_loader(shards, EvalTransform(32, 36), batch_size=2, workers=0)
    victim.write_bytes(whole[:second])
    unreadable_txt = tmp_path / "unreadable.txt"
    loader.record_unreadable_to(unreadable_txt)
    result = evaluate_on(loader)
    assert (result.count, result.unreadable) == (3, 2)  # the broken file is in another shard
    assert any(path == str(victim) and "unreadable shard" in reason for path, reason in listed(unreadable_txt))


def test_each_unreadable_file_is_listed_once_per_run(photos, tmp_path, caplog):
    root, broken = with_broken_val_files(photos, tmp_path / "tree", count=2)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    unreadable_txt = run_dir / "unreadable.txt"
    caplog.set_level(logging.WARNING, logger="data")
    loader = build_eval_loader(root, EvalTransform(32, 36), batch_size=2, workers=0)
    loader.record_unreadable_to(unreadable_txt)
    for _ in range(2):  # two epochs
        assert sum(int(bad.sum()) for _, _, bad in loader) == 2
    assert run_eval(root, record_to=unreadable_txt).unreadable == 2  # a resumed run's new loader
    lines = listed(unreadable_txt)
    assert sorted(path for path, _ in lines) == sorted(map(str, broken))
    assert all(reason for _, reason in lines)
    warned = [r.getMessage() for r in caplog.records if "unreadable image" in r.getMessage()]
    assert len(warned) == 2 and all(m.endswith(f"; listed in {unreadable_txt}") for m in warned)
    assert all("left out of the evaluation" in m for m in warned)


def test_training_lists_its_replaced_files_in_the_same_list(photos, tmp_path):
    shutil.copytree(photos, tmp_path / "tree")
    broken = write_truncated(tmp_path / "tree" / "train" / sorted(os.listdir(photos / "train"))[0] / "zz.JPEG")
    unreadable_txt = tmp_path / "unreadable.txt"
    for attempt in range(2):  # the second loader plays a resumed run
        loader = build_train_loader(tmp_path / "tree", TrainTransform(32), batch_size=11, workers=0, seed=0)
        loader.record_unreadable_to(unreadable_txt)
        for epoch in range(2):
            loader.set_epoch(epoch)
            assert sum(int(bad.sum()) for _, _, bad in loader) == 1  # replaced, as before
    assert [path for path, _ in listed(unreadable_txt)] == [str(broken)]


RANK_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import torch, torch.distributed as dist
    from torch import nn
    from data import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, build_eval_loader
    from densenet.training.distributed import init_distributed, shutdown
    from densenet.training.evaluation import evaluate
    from densenet.training.inputs import DeviceNormalize

    info = init_distributed("cpu")
    loader = build_eval_loader(sys.argv[2], EvalTransform(32, 36), batch_size=2, workers=0,
                               rank=info.rank, world_size=info.world_size)
    loader.record_unreadable_to(sys.argv[3])
    torch.manual_seed(0)
    model = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 4))
    normalize = DeviceNormalize(IMAGENET_MEAN, IMAGENET_STD, info.device, channels_last=False)
    for _ in range(2):
        result = evaluate(model, loader, info=info, normalize=normalize, amp_dtype=None)
    print(json.dumps(result.as_dict()), flush=True)
    shutdown(info)
""")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_ranks_each_count_and_list_their_own_files(photos, tmp_path, clean):
    # six files over two ranks: rank 0 gets the first three (one broken), rank 1 the last three (one broken)
    root, broken = with_broken_val_files(photos, tmp_path / "tree", count=2)
    unreadable_txt = tmp_path / "unreadable.txt"
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, REPO, str(root), str(unreadable_txt)],
                              env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in range(2)]
    outputs = [rank.communicate(timeout=180) for rank in ranks]
    for rank, (out, err) in zip(ranks, outputs):
        assert rank.returncode == 0, err
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert results[0] == results[1]
    assert (results[0]["count"], results[0]["unreadable"]) == (4, 2)
    assert (results[0]["top1"], results[0]["top5"]) == (clean.top1, clean.top5)
    assert sorted(path for path, _ in listed(unreadable_txt)) == sorted(map(str, broken))
    # each rank said so once, on its own console
    assert [sum("listed in" in line for line in err.splitlines()) for _, err in outputs] == [1, 1]
