"""Two-host training: one torchrun agent on each of two simulated hosts (tests/netns_cluster.py),
meeting in a c10d rendezvous on the first host as launch/slurm_multi_node.sh arranges it, with gloo
between the hosts; it ends bitwise equal to the same world size on one host (--standalone)."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

from _train_util import REPO, TINY, TRAIN, assert_same_training_state, demo_root, env, load, run

pytestmark = pytest.mark.slow

STEPS = 6
ARGS = TINY + ["--deterministic", "--batch-size", "16", "--epochs", "1", "--lr", "0.4", "--ckpt-every", "0",
               "--max-steps", str(STEPS)]


def rendezvous(nodelist, job_id):
    """launch/slurm_multi_node.sh: the first host of the allocation, port 10000 + job id % 20000."""
    return nodelist[0], 10000 + job_id % 20000


def test_two_hosts_train_like_one_host_with_the_same_world_size(netns_cluster, tmp_path):
    data = demo_root(tmp_path / "data")
    hosts = netns_cluster.hosts
    job_id = random.randrange(1, 1_000_000)
    rdzv_host, rdzv_port = rendezvous(hosts, job_id)
    two_hosts = tmp_path / "two_hosts"  # one folder both hosts see, as a shared file system
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={len(hosts)}", "--nproc_per_node=1",
                "--max-restarts=0", "--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv_host}:{rdzv_port}",
                f"--rdzv_id={job_id}", TRAIN, *ARGS, "--data", str(data), "--output-dir", str(two_hosts)]
    before = netns_cluster.traffic(hosts[1])
    t0 = time.monotonic()
    agents = {}
    for host in hosts:  # LOGLEVEL=INFO: torchrun logs the rendezvous (master_addr, ranks) for a failure's output
        with open(tmp_path / f"{host}.log", "w") as log:
            agents[host] = netns_cluster.run(host, torchrun, dict(env(), LOGLEVEL="INFO"), cwd=REPO, stdout=log,
                                             stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    for agent in agents.values():
        try:
            agent.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass  # reported below with its log; the cluster's teardown kills it
    two_host_s = time.monotonic() - t0
    after = netns_cluster.traffic(hosts[1])
    logs = {h: (tmp_path / f"{h}.log").read_text() for h in hosts}
    for host, agent in agents.items():
        assert agent.returncode == 0, f"{host} (status {agent.returncode}):\n{logs[host]}"
    assert "on 2 x cpu (torchrun, gloo)" in logs[hosts[0]] + logs[hosts[1]]

    t0 = time.monotonic()
    one_host = tmp_path / "one_host"
    proc = run(ARGS + ["--data", str(data), "--output-dir", str(one_host)], nproc=2)
    one_host_s = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout
    print(f"\n{STEPS} steps on 2 processes: two hosts {two_host_s:.1f} s, one host {one_host_s:.1f} s")
    assert_same_training_state(one_host / "last.pt", two_hosts / "last.pt")
    # The gradients went between the hosts: with two processes, gloo's ring all-reduce sends
    # and receives the size of the gradients each step.
    grad_bytes = sum(t.numel() * t.element_size() for t in load(two_hosts / "last.pt")["model"].values()
                     if t.is_floating_point())
    sent, received = after["tx"] - before["tx"], after["rx"] - before["rx"]
    print(f"{hosts[1]} sent {sent / 1e6:.1f} MB, received {received / 1e6:.1f} MB; "
          f"gradients {grad_bytes / 1e6:.2f} MB a step")
    assert min(sent, received) > STEPS * grad_bytes / 2


FAULT_ARGS = TINY + ["--deterministic", "--batch-size", "25", "--epochs", "3", "--ckpt-every", "4",
                     "--image-size", "48", "--log-every", "100", "--dist-timeout", "5"]


def start_agents(cluster, tmp_path, args, tag):
    hosts = cluster.hosts
    job_id = random.randrange(1, 1_000_000)
    rdzv_host, rdzv_port = rendezvous(hosts, job_id)
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={len(hosts)}", "--nproc_per_node=1",
                "--max-restarts=0", "--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv_host}:{rdzv_port}",
                f"--rdzv_id={job_id}", TRAIN, *args]
    agents = {}
    for host in hosts:
        with open(tmp_path / f"{tag}-{host}.log", "w") as log:
            agents[host] = cluster.run(host, torchrun, env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    return agents


@pytest.mark.parametrize("fault", ["dies", "cut_off"])
def test_a_host_that_dies_or_is_cut_off_never_hangs_the_other(make_netns_cluster, tmp_path, fault):
    cluster = make_netns_cluster()
    survivor, lost = cluster.hosts
    data = demo_root(tmp_path / "data")
    out = tmp_path / "run"
    args = FAULT_ARGS + ["--data", str(data), "--output-dir", str(out)]
    agents = start_agents(cluster, tmp_path, args, "faulted")
    deadline = time.monotonic() + 120
    while not (out / "last.pt").exists():
        assert time.monotonic() < deadline and all(a.poll() is None for a in agents.values()), "no checkpoint"
        time.sleep(0.01)
    started = time.monotonic()
    if fault == "dies":
        cluster.kill_host(lost)
    else:
        cluster.cut(lost)
    status = agents[survivor].wait(timeout=120)
    took = time.monotonic() - started
    said = (tmp_path / f"faulted-{survivor}.log").read_text()
    print(f"\nhost {lost} {fault.replace('_', ' ')}: the agent on {survivor} exited with status {status} "
          f"after {took:.1f} s")
    assert status != 0 and "lost contact with the other processes of the run" in said, said
    assert took < (20 if fault == "dies" else 5 + 25), took
    cluster.kill_host(lost)
    cluster.restore(lost)

    again = start_agents(cluster, tmp_path, args, "rerun")
    for host, agent in again.items():
        assert agent.wait(timeout=180) == 0, (tmp_path / f"rerun-{host}.log").read_text()
    assert "resumed from" in (tmp_path / f"rerun-{survivor}.log").read_text() + \
        (tmp_path / f"rerun-{lost}.log").read_text()
    reference = tmp_path / "reference"
    proc = run(args[:-1] + [str(reference)], nproc=2)
    assert proc.returncode == 0, proc.stdout
    assert_same_training_state(out / "last.pt", reference / "last.pt")


def _trainer_of_rank(rank: int, out: Path) -> Optional[int]:
    """The pid of the training process of global rank ``rank`` writing to ``out`` (from /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if TRAIN.encode() in argv and str(out).encode() in argv and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def test_rank0_killed_while_saving_keeps_the_last_checkpoint_and_one_host_resumes(make_netns_cluster, tmp_path):
    """SIGKILL to rank 0 while it writes a checkpoint: the checkpoint before it stays what the run
    resumes from, and a restart on one host (one process, so half the global batch) resumes at the
    same number of images into the epoch, keeping the checkpoint's peak lr as the resume rules say.

    A DenseNet-121 checkpoint takes tens of milliseconds to write, long enough to catch: rank 0 is
    stopped (SIGSTOP) the moment its temporary file appears; if the file is still there the save
    was cut short and SIGKILL follows, else the save had finished and rank 0 goes on to the next."""
    cluster = make_netns_cluster()
    data = demo_root(tmp_path / "data")
    out = tmp_path / "run"
    args = ["--arch", "densenet121", "--image-size", "32", "--workers", "0", "--wandb", "disabled",
            "--log-every", "100", "--deterministic", "--batch-size", "25", "--epochs", "1", "--ckpt-every", "2",
            "--dist-timeout", "5", "--data", str(data), "--output-dir", str(out)]
    agents = start_agents(cluster, tmp_path, args, "saving")
    logs = lambda: "\n".join((tmp_path / f"saving-{h}.log").read_text() for h in cluster.hosts)  # noqa: E731
    deadline = time.monotonic() + 180
    rank0, killed_step = None, None
    while killed_step is None:
        assert time.monotonic() < deadline and all(a.poll() is None for a in agents.values()), logs()
        rank0 = rank0 or _trainer_of_rank(0, out)
        temps = list(out.glob(".last.pt.tmp-*"))
        if not (rank0 and temps and (out / "last.pt").exists()):
            time.sleep(0.001)
            continue
        os.kill(rank0, signal.SIGSTOP)
        if any(t.exists() for t in temps):  # caught mid-save
            before = load(out / "last.pt")["progress"]
            os.kill(rank0, signal.SIGKILL)
            killed_at, killed_step = time.monotonic(), before["global_step"]
        else:
            os.kill(rank0, signal.SIGCONT)
    statuses = {h: a.wait(timeout=60) for h, a in agents.items()}
    took = time.monotonic() - killed_at
    print(f"\nrank 0 killed while saving the checkpoint after step {killed_step}: both agents ended "
          f"{took:.1f} s later with {statuses}")
    assert all(s != 0 for s in statuses.values()), statuses
    assert "lost contact with the other processes of the run" in logs(), logs()
    assert list(out.glob(".last.pt.tmp-*")), "the interrupted save left no partial file: it was not interrupted"
    kept = load(out / "last.pt")
    saved = kept["progress"]
    assert saved["global_step"] == killed_step and saved["world_size"] == 2 and saved["batch_in_epoch"] > 0

    # One host, one process: the global batch halves from 50 to 25.
    proc = run(args, nproc=1)
    assert proc.returncode == 0, proc.stdout
    images_done = saved["batch_in_epoch"] * saved["world_size"] * saved["batch_size"]
    assert (f"resumed from {out / 'last.pt'}: epoch 1, batch {images_done // 25}, step {killed_step}"
            in proc.stdout), proc.stdout
    assert "the global batch is now 25 (the checkpoint's was 50); keeping its peak lr" in proc.stdout, proc.stdout
    assert not list(out.glob(".*.pt.tmp-*")), "the partial file outlived the restart"
    final = load(out / "last.pt")
    assert final["config"]["lr"] == pytest.approx(0.1 * 50 / 256), final["config"]["lr"]
    # Every image of the epoch was trained on once: the first part by two processes, the rest by one.
    assert final["progress"]["global_step"] == killed_step + (500 - images_done) // 25
