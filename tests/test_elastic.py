"""Elastic restarts: a training process killed outright (SIGKILL: no handler, no checkpoint)
under torchrun --max-restarts makes torchrun restart the whole group, which resumes from the
last checkpoint and completes the run. Runs the workstation script, launch/local.sh, on the
CPU with two gloo processes.

MAX_RESTARTS is 2, one more than the kill needs: should a process fail after the run has
completed (torch's C++ teardown used to abort now and then; the trainer now leaves without it),
torchrun would restart the finished run, and the test names that instead of failing on a bare
exit status."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from slurm.trainrun import (REPO, TINY_TRAINING, events, last_train_step, read_metrics, resumes, tail, training_env,
                            wait_until)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MAX_STEPS = 150
CKPT_EVERY = 10
KILL_AFTER_STEP = 25


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return sorted(found)


def rank_of(pid: int) -> int:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(v for v in environ if v.startswith(b"RANK=")).split(b"=", 1)[1])


def saved_steps(text: str) -> list[int]:
    return [int(s) for s in re.findall(r"^saved .*\bstep (\d+)\)$", text, re.M)]


def test_killed_worker_is_restarted_and_resumes_from_checkpoint(tmp_path, capsys):
    run_dir, out = tmp_path / "run", tmp_path / "torchrun.out"
    cmd = [str(REPO / "launch" / "local.sh"), *TINY_TRAINING, "--max-steps", str(MAX_STEPS),
           "--ckpt-every", str(CKPT_EVERY), "--output-dir", str(run_dir)]
    env = training_env(NGPU="0", NPROC="2", MAX_RESTARTS="2")
    with out.open("w") as sink:
        # local.sh execs torchrun, so this pid is torchrun's and the training processes are its children.
        torchrun = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: last_train_step(read_metrics(run_dir)) >= KILL_AFTER_STEP
                   and saved_steps(out.read_text()), 180, f"step {KILL_AFTER_STEP} and a checkpoint",
                   lambda: tail(out))
        before_kill = saved_steps(out.read_text())
        workers = children(torchrun.pid)
        assert len(workers) == 2, f"expected 2 training processes under torchrun, found {workers}"
        victim = next(p for p in workers if rank_of(p) == 0)  # rank 0 writes the checkpoints
        killed_at = last_train_step(read_metrics(run_dir))
        os.kill(victim, signal.SIGKILL)
        status = torchrun.wait(timeout=240)
    finally:
        if torchrun.poll() is None:
            for p in children(torchrun.pid):
                os.kill(p, signal.SIGKILL)
            torchrun.kill()
            torchrun.wait()
    text = out.read_text(errors="replace")
    assert status == 0, f"torchrun exited {status}\n{tail(out)}"
    assert re.search(rf"exitcode\s*:\s*-9\b.*\(pid: {victim}\)", text), \
        f"torchrun never reported process {victim} as killed by SIGKILL\n{tail(out)}"

    metrics = read_metrics(run_dir)
    resumed, after_completion = resumes(metrics, MAX_STEPS)
    assert len(resumed) == 1, f"expected one resume, got {resumed}\n{tail(out)}"
    assert not after_completion, f"a process failed after the run completed: {after_completion}\n{tail(out)}"
    from_step = resumed[0]["from_step"]
    # The restart began at a checkpoint written before the kill: the newest one we had seen, or one
    # finished between that look and the kill itself (the kill may land after the file's rename and
    # before its "saved" line, at the step last trained).
    assert from_step in saved_steps(text) + [killed_at] and from_step >= max(before_kill), \
        (from_step, before_kill, killed_at)
    assert from_step <= killed_at + 1
    assert resumed[0]["restart_count"] == 1, "TORCHELASTIC_RESTART_COUNT should read 1 after one restart"
    assert not events(metrics, "interrupted"), "SIGKILL leaves no chance to checkpoint; nothing may claim so"

    # Steps between the checkpoint and the kill are trained again; the restart continues right
    # after the checkpoint.
    train_steps = [r["step"] for r in metrics if r.get("kind") == "train"]
    after = [r["step"] for r in metrics[metrics.index(resumed[0]) + 1:] if r.get("kind") == "train"]
    assert after and after[0] == from_step + 1, f"the restarted group did not continue at step {from_step + 1}"
    assert last_train_step(metrics) == MAX_STEPS
    assert sorted(set(train_steps)) == list(range(1, MAX_STEPS + 1))
    with capsys.disabled():
        print(f"\nelastic: SIGKILL to rank 0 (pid {victim}) at step {killed_at}; checkpoints seen {before_kill}; "
              f"resumed from step {from_step}, restart_count {resumed[0]['restart_count']}, "
              f"final step {last_train_step(metrics)}, torchrun exit {status}")
