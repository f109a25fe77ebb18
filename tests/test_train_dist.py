"""train_dist.py under real torchrun with two gloo processes on the demo JPEGs: training, exact
evaluation over a validation set that does not divide by the world size, and a run stopped by
SIGTERM to the whole process group and by SIGUSR1 to one worker, resumed to bitwise the same weights as one go."""
from __future__ import annotations

import re
import signal

import pytest

from _train_util import TINY, Background, assert_same_training_state, demo_root, jsonl, load, run

pytestmark = pytest.mark.slow

STEPS = 20  # 500 images / (2 x 16) = 15 steps per epoch: the run crosses one epoch end
VAL_IMAGES = 99  # odd: rank 0 gets 50 images, rank 1 gets 49
ARGS = TINY + ["--deterministic", "--batch-size", "16", "--epochs", "2", "--lr", "0.4", "--ckpt-every", "0",
               "--max-steps", str(STEPS)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return demo_root(tmp_path_factory.mktemp("data"), val_keep=VAL_IMAGES)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_go")
    # two loader workers here, none in the interrupted run: the batches must not depend on it
    proc = run(ARGS + ["--data", str(data), "--output-dir", str(out), "--workers", "2"], nproc=2)
    assert proc.returncode == 0, proc.stdout
    return out, proc.stdout


def test_two_process_training_and_exact_evaluation(data, reference, tmp_path):
    out, stdout = reference
    assert "on 2 x cpu (torchrun, gloo)" in stdout
    assert "batch 16 per process x 2 processes x 1 accumulated = 32 global" in stdout
    train_lines = [e for e in jsonl(out) if e["kind"] == "train"]
    assert [e["step"] for e in train_lines] == list(range(1, STEPS + 1))
    assert all(e["images_per_s"] > 0 and 0 <= e["data_wait"] <= 1 and e["lr"] == 0.4 for e in train_lines)
    evals = [e for e in jsonl(out) if e["kind"] == "eval"]
    assert [(e["epoch"], e["step"]) for e in evals] == [(1, 15), (2, STEPS)]
    assert all(e["count"] == VAL_IMAGES for e in evals)  # every image once, none padded or dropped
    for e in evals:
        assert (e["top1"] * VAL_IMAGES / 100) == pytest.approx(round(e["top1"] * VAL_IMAGES / 100), abs=1e-6)
    assert (out / "config.yaml").is_file() and (out / "epoch_0001.pt").is_file() and (out / "best.pt").is_file()
    ckpt = load(out / "last.pt")
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert len(ckpt["rng"]) == 2 and ckpt["progress"]["world_size"] == 2

    # One process evaluating the saved weights sees the same images and gets the same numbers.
    proc = run(TINY + ["--data", str(data), "--evaluate", "--weights", str(out / "last.pt"), "--batch-size", "7"])
    assert proc.returncode == 0, proc.stdout
    m = re.search(r"top1 ([\d.]+)  top5 ([\d.]+)  loss ([\d.]+)  images (\d+)", proc.stdout)
    assert m, proc.stdout
    assert int(m.group(4)) == VAL_IMAGES
    assert float(m.group(1)) == pytest.approx(evals[-1]["top1"], abs=1e-3)
    assert float(m.group(2)) == pytest.approx(evals[-1]["top5"], abs=1e-3)


def test_signals_then_resume_match_the_uninterrupted_run(data, reference, tmp_path):
    out = tmp_path / "run"
    args = ARGS + ["--data", str(data), "--output-dir", str(out)]

    # SIGTERM to the whole process group, as SLURM sends it: each worker gets it twice, directly and
    # forwarded by torchrun, and must still save before exiting
    first = Background(args, tmp_path / "first.log", nproc=2)
    first.wait_for(r"\(global 3\)")
    first.kill_group(signal.SIGTERM)
    first.finish()  # torchrun's own status after a signal is its own affair; the workers' is checked below
    assert "stopped by a signal" in first.output(), first.output()
    stop1 = load(out / "last.pt")["progress"]
    assert 3 <= stop1["global_step"] < STEPS and stop1["batch_in_epoch"] > 0

    # SIGUSR1 to rank 1 only (torchrun does not forward it): both ranks still stop at the same step
    second = Background(args, tmp_path / "second.log", nproc=2)
    second.wait_for(rf"\(global {stop1['global_step'] + 2}\)")
    second.kill(signal.SIGUSR1, pid=second.worker_pid(rank=1))
    second.finish()
    assert "stopped by a signal" in second.output(), second.output()
    assert re.search(r"exitcode\s*:\s*3", second.output()), second.output()  # torchrun's report of the workers
    stop2 = load(out / "last.pt")["progress"]
    assert stop1["global_step"] < stop2["global_step"] < STEPS

    third = run(args, nproc=2)
    assert third.returncode == 0, third.stdout
    assert_same_training_state(reference[0] / "last.pt", out / "last.pt")

    events = [e for e in jsonl(out) if e["kind"] == "event"]
    assert [e["event"] for e in events] == ["interrupted", "resumed", "interrupted", "resumed"]
    assert [e["signal"] for e in events[::2]] == [signal.SIGTERM, signal.SIGUSR1]
    assert [e["from_step"] for e in events[1::2]] == [stop1["global_step"], stop2["global_step"]]
