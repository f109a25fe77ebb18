"""A process of the run that dies or freezes never hangs the others: they exit with status 5 and a
line that says what happened, within a bound set by --dist-timeout, and the rerun resumes from the
last checkpoint to the same final state as an uninterrupted run. The processes are started as srun
starts one task per GPU (plain python, RANK and WORLD_SIZE set), so the statuses are the trainer's
own; the same trainer under torchrun across hosts is covered by the multi-host tests."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _train_util import REPO, TINY, TRAIN, assert_same_training_state, demo_root, env, run

TIMEOUT_S = 4


def start_ranks(args, log_dir: Path, world: int = 2):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        e = dict(env(), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        log = open(log_dir / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, TRAIN, *args], cwd=REPO, env=e, stdout=log,
                                      stderr=subprocess.STDOUT))
    return procs


def wait_for_file(path: Path, procs, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"no {path} within {timeout}s"
        assert all(p.poll() is None for p in procs), "a rank ended before the first checkpoint"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("faults")
    data = demo_root(base)
    args = [*TINY, "--data", str(data), "--batch-size", "25", "--epochs", "3", "--ckpt-every", "4",
            "--image-size", "48", "--log-every", "100", "--dist-timeout", str(TIMEOUT_S)]
    reference = base / "reference"
    done = run([*args, "--output-dir", str(reference)], nproc=2)
    assert done.returncode == 0, done.stdout
    return base, args, reference


@pytest.mark.parametrize("fault", ["killed", "frozen"])
def test_a_dead_or_frozen_rank_ends_the_run_in_bounded_time_and_the_rerun_resumes(setup, fault):
    base, args, reference = setup
    out = base / fault
    out.mkdir()
    procs = start_ranks([*args, "--output-dir", str(out)], out)
    try:
        wait_for_file(out / "last.pt", procs)
        started = time.monotonic()
        procs[1].send_signal(signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        status = procs[0].wait(timeout=TIMEOUT_S + 60)
        took = time.monotonic() - started
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    said = (out / "rank0.log").read_text()
    print(f"{fault}: the surviving rank exited with status {status} after {took:.1f}s")
    assert status == 5, said
    assert "error (rank 0): lost contact with the other processes of the run" in said
    assert "Rerun the same command to resume" in said and "Traceback" not in said
    # a dead peer is noticed at once; a frozen one when the collective times out
    assert took < (10 if fault == "killed" else TIMEOUT_S + 15), took
    if fault == "frozen":
        assert took >= TIMEOUT_S - 0.5, took
    resumed = run([*args, "--output-dir", str(out)], nproc=2)
    assert resumed.returncode == 0, resumed.stdout
    assert "resumed from" in resumed.stdout
    assert_same_training_state(out / "last.pt", reference / "last.pt")


def test_a_bug_is_not_taken_for_a_lost_peer():
    from densenet.training.distributed import lost_peer

    assert lost_peer(RuntimeError("CUDA error: an illegal memory access")) is None
    assert lost_peer(ValueError("gloo Connection reset by peer")) is None
    assert lost_peer(RuntimeError("Application timeout caused pair closure"))  # gloo, as DDP's broadcast says it
    said = lost_peer(RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv"))
    assert said and "Timed out" in said
