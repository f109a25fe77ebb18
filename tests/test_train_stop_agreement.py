"""The per-step stop agreement read one step late, in the real trainer on the CPU: a signal stops the
run one step after the step it arrived in, a non-finite loss is caught before any checkpoint holds
its weights, and --amp auto picks fp16 where bf16 would only be emulated. On a GPU the same order
of events means no host wait per step (the GPU check counts the syncs)."""
from __future__ import annotations

import signal

import pytest
import torch

from densenet.bench.gpu_correctness import build_trainer
from densenet.training.checkpoint import LAST, Checkpointer, load_checkpoint
from densenet.training.distributed import DistInfo
from densenet.training.engine import EpochEnd, StopAgreement
from densenet.training.settings import auto_amp_dtype
from densenet.training.signals import StopRequest

CPU = DistInfo(0, 1, 0, torch.device("cpu"), None, "single")
BATCHES = 8


class Batches:
    """The loader interface train_epoch uses, over fixed random uint8 batches; ``on_batch(i)`` runs as
    batch i is handed out, while the previous step's work is done."""

    def __init__(self, on_batch=lambda i: None, batch=4, size=32):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (BATCHES, batch, 3, size, size), dtype=torch.uint8, generator=g)
        self.targets = torch.randint(0, 10, (BATCHES, batch), generator=g)
        self.on_batch = on_batch
        self.start = 0

    def set_epoch(self, epoch, start_batch=0):
        self.start = start_batch

    def size_at(self, epoch):
        return self.images.shape[-1]

    def __len__(self):
        return BATCHES

    def __iter__(self):
        for i in range(self.start, BATCHES):
            self.on_batch(i)
            yield self.images[i], self.targets[i], torch.zeros(self.targets.shape[1], dtype=torch.bool)


def trainer(**overrides):
    return build_trainer(CPU.device, batch=4, image_size=32, classes=10, extra=overrides)


def checkpointer(t, run_dir):
    """The real checkpointer of trainer ``t``, writing to run_dir; the steps it saved at, in order."""
    saved = []
    c = Checkpointer(run_dir, t.cfg, CPU)
    c.start_writing(t.cfg, classes=[str(i) for i in range(10)], wandb_run_id=None,
                    report=lambda line: saved.append(int(line.rsplit("step ", 1)[1].rstrip(")"))))
    return c, saved


def test_verdicts_come_one_step_late_unless_flushed():
    agreement = StopAgreement(CPU)
    finite, nan = torch.tensor(1.0, dtype=torch.float64), torch.tensor(float("nan"), dtype=torch.float64)
    assert agreement.post(1, 0, finite) is None
    first = agreement.post(2, signal.SIGTERM, finite)
    assert (first.step, first.signal, first.nonfinite) == (1, 0, False)
    second = agreement.flush()
    assert (second.step, second.signal, second.nonfinite) == (2, int(signal.SIGTERM), False)
    assert agreement.flush() is None
    agreement.post(3, 0, nan)
    assert agreement.post(4, 0, finite).nonfinite


def test_a_signal_stops_the_epoch_one_step_after_it_arrived():
    stop = StopRequest()

    def signal_during(i):
        if i == 3:  # as step 4's batch is fetched: step 4's flags carry the signal, read after step 5
            stop.signum = signal.SIGUSR1

    t = trainer()
    stats = t.train_epoch(Batches(signal_during), stop)
    assert stats.end is EpochEnd.SIGNAL and stats.signal == signal.SIGUSR1 and not stats.complete
    assert t.progress.global_step == 5 and t.progress.batch_in_epoch == 5 and t.progress.epoch == 0


def test_a_signal_before_a_checkpoint_is_acted_on_at_that_step(tmp_path):
    stop = StopRequest()

    def signal_during(i):
        if i == 3:
            stop.signum = signal.SIGTERM

    t = trainer(ckpt_every=4)
    checkpoints, saved = checkpointer(t, tmp_path)
    stats = t.train_epoch(Batches(signal_during), stop, checkpoints)
    # step 4 is a checkpoint step: its verdict is read at once, and the trainer's caller saves
    assert stats.end is EpochEnd.SIGNAL and t.progress.global_step == 4 and saved == []


@pytest.mark.parametrize("ckpt_every", [2, 3])
def test_no_checkpoint_is_written_after_a_nonfinite_step(ckpt_every, tmp_path):
    t = trainer(ckpt_every=ckpt_every)
    calls = {"n": 0}

    def poison(module, inputs, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 3 else output  # the loss of step 3 is NaN

    t.model.register_forward_hook(poison)
    checkpoints, saved = checkpointer(t, tmp_path)
    stats = t.train_epoch(Batches(), StopRequest(), checkpoints)
    assert stats.end is EpochEnd.NONFINITE and stats.nonfinite_step == 3
    assert stats.nonfinite_loss != stats.nonfinite_loss  # NaN
    assert saved == ([2] if ckpt_every == 2 else [])  # never a checkpoint at or after step 3
    if saved:
        assert load_checkpoint(tmp_path / LAST)["progress"]["global_step"] == 2
    else:
        assert not (tmp_path / LAST).exists()


def test_checkpoints_come_every_n_steps_and_the_epoch_moves_on_when_complete(tmp_path):
    t = trainer(ckpt_every=3)
    checkpoints, saved = checkpointer(t, tmp_path)
    stats = t.train_epoch(Batches(), StopRequest(), checkpoints)
    # steps 3 and 6 save; step 8 ends the epoch, whose checkpoint the epoch loop writes after evaluating
    assert saved == [3, 6] and stats.end is EpochEnd.COMPLETE and stats.complete
    assert (t.progress.epoch, t.progress.batch_in_epoch, t.progress.global_step) == (1, 0, 8)
    assert stats.epoch == 1 and stats.epochs_done == 1.0
    state = load_checkpoint(tmp_path / LAST)
    assert state["progress"]["global_step"] == 6 and state["progress"]["batch_in_epoch"] == 6


def test_amp_auto_takes_fp16_where_bf16_is_emulated():
    assert auto_amp_dtype(True) is torch.bfloat16
    assert auto_amp_dtype(False) is torch.float16
