"""train_dist.py as one plain python process on the real demo JPEGs: exact resume after SIGTERM and
from an older checkpoint when last.pt is corrupt, W&B offline files, non-finite loss, and --evaluate
with a torchvision weight file."""
from __future__ import annotations

import re
import signal

import pytest
import torch

from _train_util import (TINY, Background, assert_same_training_state, demo_root, jsonl, load, run, wandb_config,
                         wandb_history)

pytestmark = pytest.mark.slow

STEPS = 10
# The modern recipe's moving parts (EMA, mixup/cutmix on numpy's RNG, RandAugment, random erasing,
# label smoothing, warmup + cosine) plus accumulation and clipping: all must survive a resume.
EXACT = TINY + ["--recipe", "modern", "--deterministic", "--batch-size", "32", "--accum-steps", "2", "--epochs", "3",
                "--lr", "0.2", "--warmup-epochs", "0.5", "--grad-clip", "2.0", "--ckpt-every", "0",
                "--max-steps", str(STEPS)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return demo_root(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The same run in one go."""
    out = tmp_path_factory.mktemp("one_go")
    proc = run(EXACT + ["--data", str(data), "--output-dir", str(out)])
    assert proc.returncode == 0, proc.stdout
    return out


def test_sigterm_resume_and_corrupt_last_give_the_same_weights(data, reference, tmp_path):
    out = tmp_path / "run"
    args = EXACT + ["--data", str(data), "--output-dir", str(out), "--wandb", "offline"]

    # 1. SIGTERM in the middle of the first epoch (7 steps of 2 x 32 images each)
    first = Background(args, tmp_path / "first.log")
    first.wait_for(r"\(global 2\)")
    first.kill(signal.SIGTERM)
    assert first.finish() == 3, first.output()
    assert "received SIGTERM" in first.output() and "checkpoint saved" in first.output()
    stopped = load(out / "last.pt")["progress"]
    assert 2 <= stopped["global_step"] < 7 and stopped["batch_in_epoch"] == 2 * stopped["global_step"]

    # 2. resume (same command, higher stop) past the end of epoch 1 into epoch 2
    second = run(args + ["--max-steps", "9"])  # the later flag wins
    assert second.returncode == 0, second.stdout
    assert f"resumed from {out / 'last.pt'}: epoch 1, batch {stopped['batch_in_epoch']}" in second.stdout
    assert (out / "epoch_0001.pt").is_file() and load(out / "last.pt")["progress"]["global_step"] == 9

    # 3. last.pt damaged (a truncated copy): reported, an older valid checkpoint is used instead
    data_bytes = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(data_bytes[: len(data_bytes) // 3])
    third = run(args)
    assert third.returncode == 0, third.stdout
    assert re.search(r"warning: skipping checkpoint .*last\.pt could not be read", third.stdout), third.stdout

    assert_same_training_state(reference / "last.pt", out / "last.pt")

    events = [e for e in jsonl(out) if e["kind"] == "event"]
    assert [e["event"] for e in events] == ["interrupted", "resumed", "resumed"]
    assert events[0]["signal"] == signal.SIGTERM and events[1]["from_step"] == stopped["global_step"]
    assert events[2]["checkpoint"] != str(out / "last.pt") and events[2]["from_step"] in (7, 9)
    assert all(e["restart_count"] == 0 for e in events[1:])

    # W&B: one offline run folder per start, all with the run id kept in the checkpoint
    run_id = load(out / "last.pt")["wandb_run_id"]
    files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 3 and all(f.name == f"run-{run_id}.wandb" for f in files)
    histories = [wandb_history(f) for f in files]
    logged_steps = sorted(set().union(*histories))
    assert logged_steps == list(range(1, STEPS + 1))
    train_lines = {e["step"]: e for e in jsonl(out) if e["kind"] == "train"}
    for history in histories:  # the same numbers as metrics.jsonl (steps 8 and 9 were trained twice, identically)
        for step, values in history.items():
            assert values["train/loss"] == pytest.approx(train_lines[step]["loss"], rel=1e-12)
            assert values["train/lr"] == pytest.approx(train_lines[step]["lr"], rel=1e-12)
    last_history = histories[-1]
    assert "epoch/val_top1" in last_history[STEPS] and 0 <= last_history[STEPS]["epoch/val_top1"] <= 100
    config = wandb_config(files[-1])
    assert config["arch"] == "densenet_tiny" and config["global_batch_size"] == 64 and config["max_steps"] == STEPS


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    proc = run(TINY + ["--data", str(data), "--output-dir", str(out), "--batch-size", "16", "--max-steps", "8",
                       "--ckpt-every", "1", "--lr", "1e30"])
    assert proc.returncode == 4, proc.stdout
    m = re.search(r"error: the training loss became (nan|inf) at step (\d+)", proc.stdout)
    assert m, proc.stdout
    bad_step = int(m.group(2))
    assert "the last good checkpoint" in proc.stdout and "was left as it was" in proc.stdout
    state = load(out / "last.pt")
    assert state["progress"]["global_step"] == bad_step - 1
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert jsonl(out)[-1]["event"] == "nonfinite_loss"


def test_evaluate_a_torchvision_weight_file(data, tmp_path):
    import torchvision

    from data import EvalTransform, build_eval_loader
    from data import IMAGENET_MEAN, IMAGENET_STD

    torch.manual_seed(0)
    tv = torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16, num_classes=10)
    for m in tv.modules():  # non-trivial running statistics, so that eval-mode BatchNorm matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    weights = tmp_path / "densenet_tiny_tv.pth"
    torch.save(tv.state_dict(), weights)

    proc = run(TINY + ["--data", str(data), "--evaluate", "--weights", str(weights), "--batch-size", "16"])
    assert proc.returncode == 0, proc.stdout
    m = re.search(r"top1 ([\d.]+)  top5 ([\d.]+)  loss ([\d.]+)  images (\d+)", proc.stdout)
    assert m, proc.stdout

    # torchvision's own model on the same validation images gives the same numbers
    tv.eval()
    loader = build_eval_loader(data, EvalTransform(32), batch_size=16, workers=0, rank=0, world_size=1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    correct1 = correct5 = total = 0
    with torch.no_grad():
        for images, targets, _ in loader:
            logits = tv((images.float() / 255 - mean) / std)
            top = logits.topk(5, dim=1).indices
            correct1 += int((top[:, 0] == targets).sum())
            correct5 += int((top == targets[:, None]).any(dim=1).sum())
            total += len(targets)
    assert int(m.group(4)) == total == 100
    assert float(m.group(1)) == pytest.approx(100 * correct1 / total, abs=1e-3)
    assert float(m.group(2)) == pytest.approx(100 * correct5 / total, abs=1e-3)
