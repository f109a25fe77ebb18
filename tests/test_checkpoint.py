"""Checkpoint files: atomic writes, keep-K, newest valid one, weights_only loading, RNG round trip."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from densenet.training.checkpoint import (BEST, CHECKPOINT_FORMAT, LAST, CheckpointError, Checkpointer, Progress,
                                          atomic_write_bytes, capture_rng_state, find_latest_valid, load_checkpoint,
                                          restore_rng_state)
from densenet.training.config import config_from_dict
from densenet.training.distributed import DistInfo


class CheckpointSaver:
    """The checkpointer's file writing alone, on states built here."""

    def __init__(self, run_dir, keep_epochs):
        cfg = config_from_dict({"data": "demo", "keep_epochs": keep_epochs})
        self.checkpointer = Checkpointer(run_dir, cfg, DistInfo(0, 1, 0, torch.device("cpu"), None, "single"))
        self.checkpointer.start_writing(cfg, classes=[], wandb_run_id=None, report=print)

    def save(self, state, *, epoch_end, is_best):
        return self.checkpointer.write_files(state, epoch_end=epoch_end, is_best=is_best)


def make_state(step: int, epoch: int = 0) -> dict:
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    progress = Progress(epoch=epoch, batch_in_epoch=3, global_step=step, world_size=1, batch_size=2)
    return {"format": CHECKPOINT_FORMAT, "arch": "densenet_tiny", "config": {"arch": "densenet_tiny", "lr": None},
            "model": model.state_dict(), "ema": None, "optimizer": opt.state_dict(), "scaler": None,
            "progress": progress.to_dict(), "rng": [capture_rng_state(torch.device("cpu"))],
            "classes": ["n01", "n02", "n03"], "wandb_run_id": "abcd1234"}


def test_saved_checkpoint_loads_with_weights_only(tmp_path):
    saver = CheckpointSaver(tmp_path, keep_epochs=2)
    written = saver.save(make_state(5, epoch=1), epoch_end=True, is_best=True)
    assert [p.name for p in written] == [LAST, "epoch_0001.pt", BEST]
    for path in written:
        raw = torch.load(path, weights_only=True)  # the plain torch call users will make
        assert raw["progress"]["global_step"] == 5 and raw["wandb_run_id"] == "abcd1234"
        assert set(raw["model"]) == {"weight", "bias"}
    assert load_checkpoint(tmp_path / LAST)["classes"] == ["n01", "n02", "n03"]
    assert not list(tmp_path.glob(".*tmp*"))  # no temp files left behind


def test_keep_k_epoch_checkpoints(tmp_path):
    saver = CheckpointSaver(tmp_path, keep_epochs=2)
    for epoch in range(1, 5):
        saver.save(make_state(epoch * 10, epoch), epoch_end=True, is_best=False)
        saver.save(make_state(epoch * 10 + 5, epoch), epoch_end=False, is_best=False)  # mid-epoch: last.pt only
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["epoch_0003.pt", "epoch_0004.pt", LAST]
    assert load_checkpoint(tmp_path / LAST)["progress"]["global_step"] == 45


def test_corrupt_last_is_reported_and_the_previous_one_used(tmp_path):
    saver = CheckpointSaver(tmp_path, keep_epochs=3)
    saver.save(make_state(10, 1), epoch_end=True, is_best=False)
    saver.save(make_state(15, 1), epoch_end=False, is_best=False)
    last = tmp_path / LAST
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # a truncated copy
    reports = []
    path, state = find_latest_valid(tmp_path, reports.append)
    assert path.name == "epoch_0001.pt" and state["progress"]["global_step"] == 10
    assert len(reports) == 1 and "last.pt could not be read" in reports[0]
    with pytest.raises(CheckpointError, match="could not be read as a PyTorch checkpoint"):
        load_checkpoint(last)


def test_garbage_and_foreign_files_are_not_checkpoints(tmp_path):
    (tmp_path / LAST).write_bytes(os.urandom(1000))
    torch.save({"state_dict": {}}, tmp_path / "epoch_0001.pt")
    reports = []
    assert find_latest_valid(tmp_path, reports.append) is None
    assert len(reports) == 2 and any("missing" in r for r in reports)
    assert find_latest_valid(tmp_path / "empty", reports.append) is None


def test_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / LAST
    atomic_write_bytes(target, b"old")

    with pytest.raises(TypeError):
        atomic_write_bytes(target, object())  # type: ignore[arg-type]  # fails inside the write
    assert target.read_bytes() == b"old"
    assert not list(tmp_path.glob(".*tmp*"))
    # a temp file left by a killed save is cleaned up when the next run starts writing, never taken for a checkpoint
    (tmp_path / ".last.pt.tmp-999").write_bytes(b"partial")
    CheckpointSaver(tmp_path, keep_epochs=1)
    assert not list(tmp_path.glob(".*tmp*"))


def test_rng_state_round_trip_through_a_file(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    state = capture_rng_state(torch.device("cpu"))
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.save({"rng": state}, tmp_path / "rng.pt")
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"], torch.device("cpu"))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_progress_relayout_keeps_the_image_count():
    p = Progress(epoch=2, batch_in_epoch=12, global_step=100, world_size=2, batch_size=8, accum_steps=1)
    q = p.relayout(world_size=4, batch_size=8, accum_steps=2)
    assert (q.epoch, q.global_step, q.batch_in_epoch) == (2, 100, 6)  # 192 images = 3 steps of 4 x 8 x 2 = 6 batches
    assert p.same_layout(2, 8, 1) and not q.same_layout(2, 8, 1)
