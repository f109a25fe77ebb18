"""What a user sees when a two-process torchrun job is stopped by SIGTERM mid-epoch, with loader
workers running: one "received SIGTERM" line for the whole job (not one per rank), every rank saving
and exiting 3, no traceback from a rank or a loader worker, and no process of the job left behind.

Two ways the signal comes, both real:
- to torchrun alone (as `kill`, or a launcher, sends it): torchrun passes it to each rank's whole
  process group, loader workers included;
- to every process of the job, as SLURM signals a job step (and torchrun forwards it again).

torchrun's own exit after a signal (status 1, a SignalException traceback of its own) is torchrun's
affair (docs/training.md); the ranks' statuses are read through a small shell between torchrun and
each rank, which ignores the signals itself and prints the status of its rank."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import List

import pytest

from _train_util import REPO, TINY, TRAIN, demo_root, env, jsonl, load

# Launched by torchrun in place of `python train_dist.py`: runs the rank and says how it ended.
RANK_SHELL = 'trap "" INT TERM USR1; "$0" "$@"; echo "rank $RANK exited with status $?"'
ARGS = TINY + ["--batch-size", "16", "--epochs", "3", "--workers", "2", "--ckpt-every", "0"]
STEPS_PER_EPOCH = 15  # 500 images / (2 ranks x 16)
# What must not appear: tracebacks of ranks or workers and their usual causes.
NOISE = ("Traceback", "Exception ignored", "KeyboardInterrupt", "killed by signal", "exited unexpectedly",
         "ConnectionResetError", "BrokenPipeError", "Error")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return demo_root(tmp_path_factory.mktemp("data"))


def children_of() -> dict:
    children: dict = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    return children


def descendants(pid: int, depth: int = 0) -> List[int]:
    """Every process below `pid`: the shells torchrun started, the ranks below them, their loader
    workers below those; with `depth`, only those that many levels down."""
    children, found, level = children_of(), [], [pid]
    for n in range(1, (depth or 100) + 1):
        level = [c for p in level for c in children.get(p, [])]
        if not level:
            break
        if not depth or n == depth:
            found += level
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


def stop_mid_epoch(data: Path, out: Path, everyone: bool, stop_after: int, extra: List[str] = ()) -> dict:
    """Start the job, SIGTERM it once `stop_after` steps are done, wait for the end and report."""
    log_path = out.parent / f"{out.name}.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python",
           "sh", "-c", RANK_SHELL, sys.executable, TRAIN, *ARGS, *extra, "--data", str(data),
           "--output-dir", str(out)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while not re.search(rf"\(global {stop_after}\)", log_path.read_text()):
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.02)
            workers = descendants(proc.pid, depth=3)  # torchrun > sh > rank > worker
            job = [proc.pid, *descendants(proc.pid)]
            if everyone:  # as SLURM signals a step: every process, and torchrun forwards it again
                os.killpg(proc.pid, signal.SIGTERM)
                for pid in job[1:]:
                    try:
                        os.kill(pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
            else:
                os.kill(proc.pid, signal.SIGTERM)
            launcher_status = proc.wait(120)
        finally:
            if proc.poll() is None:  # a failed test: leave no process behind (ranks have sessions of their own)
                for pid in [proc.pid, *descendants(proc.pid)]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                proc.wait()
    # The ranks shut their loader workers down before they exit (a worker left to notice by itself
    # that its rank is gone would take up to torch's 5 s watchdog interval).
    time.sleep(0.5)
    return dict(output=log_path.read_text(), launcher_pid=proc.pid, launcher_status=launcher_status,
                workers=workers, left=[p for p in job if alive(p)])


def check_stopped_cleanly(run: dict, out: Path, stop_after: int) -> None:
    output = run["output"]
    # Both ranks saved and exited with EXIT_INTERRUPTED.
    assert sorted(re.findall(r"rank (\d) exited with status (\d+)", output)) == [("0", "3"), ("1", "3")], output
    assert output.count("received SIGTERM") == 1, output
    assert "stopped by a signal at step" in output and "checkpoint saved" in output, output
    progress = load(out / "last.pt")["progress"]
    assert progress["global_step"] > stop_after and progress["batch_in_epoch"] > 0, progress
    events = [e for e in jsonl(out) if e["kind"] == "event"]
    assert [(e["event"], e["signal"]) for e in events] == [("interrupted", signal.SIGTERM)]
    # The only traceback is torchrun's own, for the signal it got itself: cut it out, then nothing.
    launcher = re.search(r"^Traceback \(most recent call last\):\n(?:[ \t].*\n)*"
                         rf"\S*SignalException: Process {run['launcher_pid']} got signal: 15\n", output, re.M)
    assert launcher and run["launcher_status"] == 1, output
    rest = output[:launcher.start()] + output[launcher.end():]
    assert not [word for word in NOISE if word in rest], rest
    assert len(run["workers"]) >= 4, run  # two loader workers per rank were running when the signal came
    assert not run["left"], f"processes of the job still running: {run['left']}\n{output}"


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_the_job_quietly(data, tmp_path):
    out = tmp_path / "run"
    run = stop_mid_epoch(data, out, everyone=False, stop_after=4)
    check_stopped_cleanly(run, out, stop_after=4)


@pytest.mark.slow
@pytest.mark.parametrize("decode", ["cpu", "device"])
def test_sigterm_to_every_process_of_the_job_stops_it_quietly(data, tmp_path, decode):
    """In the second epoch, so that the evaluation loader's workers are running too; with
    --decode device the decode-ahead thread of each rank is stopped as well (on the CPU here)."""
    out = tmp_path / "run"
    stop_after = STEPS_PER_EPOCH + 3
    run = stop_mid_epoch(data, out, everyone=True, stop_after=stop_after, extra=["--decode", decode])
    check_stopped_cleanly(run, out, stop_after=stop_after)
    assert len(run["workers"]) >= 8, run  # train and eval loader workers on both ranks


@pytest.mark.parametrize("rank_env", [{"RANK": "1"}, {"SLURM_PROCID": "1"}, {"RANK": "0", "SLURM_PROCID": "3"}])
def test_only_rank_0_reports_the_first_signal(rank_env):
    """Each rank gets the signal, one says so; a second signal is reported by every rank it ends."""
    script = textwrap.dedent("""
        import os, signal, sys, time
        sys.path.insert(0, sys.argv[1])
        from densenet.training.signals import DUPLICATE_WINDOW_S, StopRequest
        stop = StopRequest().install()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
        time.sleep(DUPLICATE_WINDOW_S + 0.2)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(REPO)], capture_output=True, text=True, timeout=60,
                          env={**env(), **rank_env})
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert ("received SIGTERM" in proc.stderr) == (rank_env.get("RANK") == "0"), proc.stderr
    assert "second signal SIGTERM: exiting now" in proc.stderr
