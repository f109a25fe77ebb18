"""--aug-repeats under real torchrun with two gloo processes on the demo JPEGs: DeiT's epoch length,
evaluation still of every validation image once, and a run stopped mid-epoch by SIGTERM and resumed
ending bitwise equal to the same run done in one go."""
from __future__ import annotations

import signal

import pytest

from _train_util import TINY, Background, assert_same_training_state, demo_root, jsonl, load, run

pytestmark = pytest.mark.slow

# 500 images: each of 2 processes draws floor(500 // 256 * 256 / 2) = 128 samples per epoch, 16 batches of 8
STEPS_PER_EPOCH = 16
STEPS = 20  # the run crosses one epoch end
VAL_IMAGES = 100
ARGS = TINY + ["--deterministic", "--aug-repeats", "3", "--batch-size", "8", "--epochs", "2", "--lr", "0.2",
               "--ckpt-every", "0", "--max-steps", str(STEPS)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return demo_root(tmp_path_factory.mktemp("data"))


def test_repeated_augmentation_resumes_mid_epoch_exactly(data, tmp_path):
    one_go = tmp_path / "one_go"
    reference = run(ARGS + ["--data", str(data), "--output-dir", str(one_go)], nproc=2)
    assert reference.returncode == 0, reference.stdout
    assert "repeated augmentation x3 (128 samples per process per epoch)" in reference.stdout
    assert f"{STEPS_PER_EPOCH} steps per epoch" in reference.stdout

    # SIGTERM to the whole process group in the middle of the first epoch, then the same command again.
    # (A --max-steps stop would not do: the evaluation at that stop averages the ranks' BatchNorm
    # statistics, which the run in one go does not do at that step.)
    out = tmp_path / "run"
    args = ARGS + ["--data", str(data), "--output-dir", str(out)]
    first = Background(args, tmp_path / "first.log", nproc=2)
    first.wait_for(r"\(global 3\)")
    first.kill_group(signal.SIGTERM)
    first.finish()
    assert "stopped by a signal" in first.output(), first.output()
    stopped = load(out / "last.pt")["progress"]
    assert stopped["epoch"] == 0 and 3 <= stopped["batch_in_epoch"] < STEPS_PER_EPOCH, stopped
    second = run(args, nproc=2)
    assert second.returncode == 0, second.stdout
    assert f"resumed from {out / 'last.pt'}: epoch 1, batch {stopped['batch_in_epoch']}" in second.stdout
    assert_same_training_state(one_go / "last.pt", out / "last.pt")
    assert load(out / "last.pt")["progress"]["batch_in_epoch"] == STEPS - STEPS_PER_EPOCH

    # Evaluation is not repeated: every validation image once over both processes, at each evaluation.
    for folder, stdout in ((one_go, reference.stdout), (out, first.output() + second.stdout)):
        evals = [e for e in jsonl(folder) if e["kind"] == "eval"]
        assert [(e["epoch"], e["step"]) for e in evals] == [(1, STEPS_PER_EPOCH), (2, STEPS)]
        assert all(e["count"] == VAL_IMAGES for e in evals)
        assert stdout.count(f"on {VAL_IMAGES} images") == 2, stdout
    assert [e["step"] for e in jsonl(one_go) if e["kind"] == "train"] == list(range(1, STEPS + 1))
