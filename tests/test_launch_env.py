"""How a process finds its GPU and CPU share, and how the launch scripts count GPUs and ask SLURM
for helper steps, all on the CPU: GPUs and SLURM are stood in for by monkeypatched torch calls
and by fake `nvidia-smi`, `torchrun`, `srun` and `scontrol` executables first on PATH."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
import torch

import densenet.training.distributed as D
from slurm.trainrun import REPO, training_env

LAUNCH = REPO / "launch"


# --- which GPU a process trains on ---------------------------------------------------------

@pytest.mark.parametrize("local_rank, device_count, local_world_size, expected", [
    (0, 1, 8, 0),  # srun --gpus-per-task=1: every task sees its own GPU as device 0
    (5, 1, 8, 0),
    (0, 1, 1, 0),
    (3, 8, 8, 3),  # torchrun, or srun without GPU binding: all GPUs visible, pick by local rank
    (3, 8, 4, 3),
    (0, 2, 1, 0),
])
def test_device_index(local_rank, device_count, local_world_size, expected):
    assert D.device_index(local_rank, device_count, local_world_size) == expected


@pytest.mark.parametrize("local_rank, device_count, local_world_size", [(2, 4, 8), (0, 0, 1), (8, 8, 8)])
def test_device_index_refuses_layouts_without_one_gpu_per_process(local_rank, device_count, local_world_size):
    with pytest.raises(RuntimeError) as err:
        D.device_index(local_rank, device_count, local_world_size)
    message = str(err.value)
    assert "\n" not in message
    assert f"sees {device_count} GPUs" in message and f"{local_world_size} processes" in message
    assert "--gpus-per-task=1" in message


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA with a given number of visible devices, and a process group that is only recorded."""
    seen: dict = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: seen.setdefault("set_device", device))
    monkeypatch.setattr(D.dist, "init_process_group", lambda **kwargs: seen.setdefault("init", kwargs))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    # init_distributed sets these for a SLURM launch; monkeypatch puts them back afterwards.
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")

    def with_devices(count: int) -> dict:
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        return seen
    return with_devices


def srun_task_env(monkeypatch, local_id: int, per_node: int = 8, nodes: int = 2) -> None:
    """The variables srun sets for one task of a step with `per_node` tasks on each of `nodes`."""
    for key, value in {"SLURM_PROCID": str(per_node + local_id), "SLURM_LOCALID": str(local_id),
                       "SLURM_STEP_NUM_TASKS": str(per_node * nodes),
                       "SLURM_STEP_TASKS_PER_NODE": f"{per_node}(x{nodes})", "SLURM_JOB_ID": "77",
                       "SLURM_STEP_NODELIST": "gpu[001-002]"}.items():
        monkeypatch.setenv(key, value)


def test_srun_task_with_one_bound_gpu_trains_on_it(fake_cuda, monkeypatch):
    seen = fake_cuda(1)
    srun_task_env(monkeypatch, local_id=5)
    info = D.init_distributed("auto")
    assert info.device == torch.device("cuda", 0) and seen["set_device"] == torch.device("cuda", 0)
    assert (info.rank, info.local_rank, info.world_size, info.launcher) == (13, 5, 16, "slurm")
    assert seen["init"]["backend"] == "nccl" and seen["init"]["device_id"] == torch.device("cuda", 0)


def test_srun_task_seeing_too_few_gpus_is_refused_in_one_line(fake_cuda, monkeypatch):
    fake_cuda(4)  # e.g. --gpus-per-task=4 with 8 tasks per node: rank 2 cannot tell which is its own
    srun_task_env(monkeypatch, local_id=2)
    with pytest.raises(RuntimeError, match=r"^local rank 2 of 8 processes on this node sees 4 GPUs: [^\n]*$"):
        D.init_distributed("auto")


# --- data-loader workers -------------------------------------------------------------------

@pytest.mark.parametrize("cpus, launcher, local_world_size, env, expected", [
    (64, "torchrun", 8, {}, 8),  # torchrun's processes share its mask
    (16, "torchrun", 8, {"SLURM_CPUS_PER_TASK": "16"}, 2),  # torchrun in a SLURM task: still shared
    (8, "slurm", 8, {"SLURM_CPUS_PER_TASK": "8"}, 8),  # srun bound each task to its own 8 CPUs
    (6, "slurm", 8, {"SLURM_CPUS_ON_NODE": "48"}, 6),  # bound, without --cpus-per-task
    (4, "slurm", 2, {"SLURM_CPUS_PER_TASK": "3"}, 4),  # bound to whole cores: a little more than asked
    (32, "slurm", 8, {"SLURM_CPUS_PER_TASK": "4"}, 4),  # no binding (task/none): the step's CPUs, shared
    (128, "slurm", 8, {"SLURM_CPUS_PER_TASK": "8"}, 8),  # no binding, the whole node visible
    (32, "slurm", 8, {}, 4),  # nothing to compare with: share, as torchrun's processes do
    (32, "slurm", 8, {"SLURM_CPUS_PER_TASK": "x"}, 4),
    (8, "slurm", 1, {"SLURM_CPUS_PER_TASK": "8"}, 8),
    (64, "single", 1, {}, 8),  # at most 8
    (1, "torchrun", 8, {}, 1),  # at least 1
])
def test_loader_workers(cpus, launcher, local_world_size, env, expected):
    assert D.loader_workers(cpus, launcher, local_world_size, env) == expected


def test_default_workers_of_an_srun_task_bound_to_its_cpus(monkeypatch):
    """Plain `srun -c 8 python train_dist.py`, 8 tasks a node: each task's affinity holds its own
    8 CPUs, which must not be divided by 8 again."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "8")
    info = D.DistInfo(3, 16, 3, torch.device("cpu"), "gloo", "slurm", 8)
    assert D.default_workers(info) == 8
    torchrun = D.DistInfo(3, 16, 3, torch.device("cpu"), "gloo", "torchrun", 8)
    assert D.default_workers(torchrun) == 1


# --- the shell side ------------------------------------------------------------------------

def fake_exe(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture
def fake_bin(tmp_path):
    """A bin folder first on PATH with an nvidia-smi that lists 8 GPUs and a torchrun that only
    prints its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_exe(bin_dir, "nvidia-smi", 'for i in 0 1 2 3 4 5 6 7; do\n'
             '  echo "GPU $i: NVIDIA H100 80GB HBM3 (UUID: GPU-0000000$i-1111-2222-3333-444444444444)"\n'
             'done\n')
    fake_exe(bin_dir, "torchrun", 'echo "torchrun $*"\n')
    return bin_dir


def script_env(bin_dir: Path, **extra: str) -> dict[str, str]:
    env = training_env(**extra)
    for name in ("CUDA_VISIBLE_DEVICES", "NGPU", "NPROC", "NPROC_PER_NODE", "OMP_NUM_THREADS", "MAX_RESTARTS",
                 "MODULES", "ACTIVATE", "LAUNCH_DIR", "REPO_DIR", "TRAIN_SCRIPT", "AGENT_PIDDIR"):
        if name not in extra:
            env.pop(name, None)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return env


# None: CUDA_VISIBLE_DEVICES unset, so nvidia-smi's 8 GPUs count.
VISIBLE = [(None, 8), ("0,1", 2), ("3", 1), ("", 0), ("-1", 0), ("0,1,-1,2", 2), ("0,,2,", 2),
           ("GPU-8f3e2a1c-0d4b-4c6e-9a7f-1b2c3d4e5f60", 1), ("MIG-1b2c3d4e-0000-1111-2222-333344445555,MIG-aa", 2)]


@pytest.mark.parametrize("visible, expected", VISIBLE)
def test_visible_gpus_follows_cuda_visible_devices(fake_bin, visible, expected):
    env = script_env(fake_bin) if visible is None else script_env(fake_bin, CUDA_VISIBLE_DEVICES=visible)
    out = subprocess.run(["bash", "-c", 'set -euo pipefail; source "$1/lib.sh"; visible_gpus', "_", str(LAUNCH)],
                         env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(expected)


@pytest.mark.parametrize("visible, expected", [("0,1", 2), ("0,,1", 2), ("0,1,-1,2", 2), ("-1", 0), ("", 0)])
def test_gpus_on_node_counts_visible_devices_the_same_way(fake_bin, visible, expected):
    env = script_env(fake_bin, CUDA_VISIBLE_DEVICES=visible)
    out = subprocess.run(["bash", "-c", 'set -euo pipefail; source "$1/lib.sh"; gpus_on_node', "_", str(LAUNCH)],
                         env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(expected)


@pytest.mark.parametrize("visible, expected", [(None, 8), ("0,1", 2), ("GPU-8f3e2a1c-0d4b-4c6e-9a7f-1b2c3d4e5f60", 1),
                                               ("", 0)])
def test_local_sh_starts_one_process_per_visible_gpu(fake_bin, tmp_path, visible, expected):
    env = script_env(fake_bin) if visible is None else script_env(fake_bin, CUDA_VISIBLE_DEVICES=visible)
    out = subprocess.run([str(LAUNCH / "local.sh"), "--data", "demo"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    procs = expected or 1  # no GPU: one CPU process (NPROC's default)
    assert f"] {procs} training processes ({expected} GPUs, " in out.stdout, out.stdout
    assert f"torchrun --standalone --nproc_per_node={procs} " in out.stdout, out.stdout
    assert out.stdout.rstrip().endswith("train_dist.py --data demo"), out.stdout


def test_multi_node_signalling_step_asks_for_no_gpus(fake_bin, tmp_path):
    """The batch shell of a job submitted with --gpus-per-node=8 gets SIGUSR1 and starts its
    signalling step; that step must ask SLURM for no GPUs. srun reads SLURM_GPUS_PER_NODE (which
    sbatch sets) as --gpus-per-node, so --gres=none only means "none" without it."""
    record = tmp_path / "srun.log"
    # The training step (the srun without --overlap) warns the batch shell as --signal=B:USR1 would,
    # waits for the signalling step and stops the way the trainer does after a warning (status 3).
    fake_exe(fake_bin, "srun", f'''log={record}
if [[ " $* " == *" --overlap "* ]]; then
    {{ echo "ARGS $*"; env | grep -E '^SLURM_(GPUS|GPUS_PER_[A-Z]+|CPUS_PER_GPU|MEM_PER_GPU|NTASKS_PER_GPU)=' | sed 's/^/ENV /'; }} >>"$log"
    exit 0
fi
echo "TRAIN $*" >>"$log"
kill -USR1 "$PPID"
for _ in $(seq 200); do grep -q '^ARGS' "$log" && exit 3; sleep 0.05; done
exit 1
''')
    fake_exe(fake_bin, "scontrol", f'''case "$1 $2" in
    "show hostnames") echo node1 ;;
    requeue*) echo "REQUEUE $2" >>{record} ;;
    *) exit 1 ;;
esac
''')
    env = script_env(fake_bin, LAUNCH_DIR=str(LAUNCH), AGENT_PIDDIR=str(tmp_path / "pids"), SLURM_JOB_ID="4242",
                     SLURM_JOB_NODELIST="node1", SLURM_NTASKS="1", SLURM_JOB_NUM_NODES="1",
                     SLURM_CPUS_PER_TASK="64", SLURM_GPUS_PER_NODE="8", SLURM_GPUS_ON_NODE="8")
    out = subprocess.run(["bash", str(LAUNCH / "slurm_multi_node.sh"), "--data", "demo"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    log = record.read_text() if record.exists() else ""
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}\n{log}"
    assert "SIGUSR1: the job ends soon" in out.stdout and "REQUEUE 4242" in log, f"{out.stdout}\n{log}"
    signalling = [line for line in log.splitlines() if line.startswith("ARGS ")]
    assert len(signalling) == 1, log
    args = signalling[0].split()
    assert "--gres=none" in args and "--overlap" in args, signalling[0]
    assert not any(a.startswith(("--gpus", "--gres=gpu")) for a in args), signalling[0]
    assert not [line for line in log.splitlines() if line.startswith("ENV ")], \
        f"the signalling step inherits a GPU request through its environment:\n{log}"
    # The training step itself keeps the job's GPUs.
    assert any(line.startswith("TRAIN ") and "--gres" not in line for line in log.splitlines()), log


# --- which status the batch scripts act on ------------------------------------------------

@pytest.mark.parametrize("torchrun_status, recorded, expected", [
    (0, {}, 0),
    (1, {}, 1),  # every worker was killed by a signal: torchrun's status stands
    (1, {0: 5, 1: 5}, 5),  # both processes of this node lost their peer
    (1, {0: 5}, 5),  # the other one was killed (a frozen rank torchrun stopped)
    (1, {0: 3, 1: 5}, 5),
    (1, {0: 3, 1: 3}, 3),
    (1, {0: 5, 1: 2}, 2),  # a bad input is a failure, not a reason to requeue
    (1, {0: 4, 1: 5}, 4),
    (1, {0: 0, 1: 1}, 1),
])
def test_node_agent_reports_the_workers_status(fake_bin, tmp_path, torchrun_status, recorded, expected):
    status_dir = tmp_path / "status"
    status_dir.mkdir()
    for rank, code in recorded.items():
        (status_dir / f"rank.{rank}").write_text(f"{code}\n")
    (status_dir / "rank.9.tmp").write_text("7\n")  # half written: ignored
    out = subprocess.run(["bash", "-c", 'set -euo pipefail; source "$1/lib.sh"; trainer_status "$2" "$3"', "_",
                          str(LAUNCH), str(status_dir), str(torchrun_status)],
                         env=script_env(fake_bin), capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(expected)


@pytest.mark.parametrize("status, restarts, terminated, requeued, exit_status", [
    (5, 0, 0, True, 0),
    (5, 9, 0, True, 0),
    (5, 10, 0, False, 5),  # MAX_LOST_PEER_RESTARTS (10) reached: the nodes need a look
    (5, 0, 1, False, 5),  # SLURM is ending the job: never requeued by the script
    (2, 0, 0, False, 2),
    (1, 0, 0, False, 1),
])
def test_lost_peer_requeues_a_bounded_number_of_times(fake_bin, tmp_path, status, restarts, terminated, requeued,
                                                     exit_status):
    record = tmp_path / "scontrol.log"
    fake_exe(fake_bin, "scontrol", f'echo "$*" >>{record}\n')
    out = subprocess.run(["bash", "-c", 'source "$1/lib.sh"; TERMINATED=$3; finish_or_requeue "$2" 0', "_",
                          str(LAUNCH), str(status), str(terminated)],
                         env=script_env(fake_bin, SLURM_JOB_ID="77", SLURM_RESTART_COUNT=str(restarts)),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == exit_status, out.stdout + out.stderr
    said = record.read_text() if record.exists() else ""
    assert (said.strip() == "requeue 77") is requeued, said
    if status == 5 and not terminated:
        assert ("requeueing job 77" in out.stdout) is requeued, out.stdout
        assert ("MAX_LOST_PEER_RESTARTS=10" in out.stderr) is (not requeued), out.stderr


def test_trainer_leaves_its_exit_status_for_the_node_agent(tmp_path):
    """A refused command line (status 2, before torch is imported) is recorded like any other end."""
    status_dir = tmp_path / "status"
    status_dir.mkdir()
    out = subprocess.run([os.sys.executable, str(REPO / "train_dist.py"), "--data", "demo", "--arch", "densenet_nope"],
                         env=training_env(DENSENET_EXIT_STATUS_DIR=str(status_dir), RANK="3"),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert (status_dir / "rank.3").read_text() == "2\n"
    assert sorted(p.name for p in status_dir.iterdir()) == ["rank.3"]
