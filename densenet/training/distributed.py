"""Process-group setup and the one record of the parallel layout, passed explicitly everywhere.

Three ways to start are understood, in this order:
  * torchrun (or any launcher that sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT);
  * a SLURM step with one task per device (``srun python train_dist.py``): SLURM_PROCID and friends;
  * a plain ``python train_dist.py``: one process, no process group.
NCCL is used on CUDA and gloo on the CPU.
"""
from __future__ import annotations

import gc
import os
import pickle
import re
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, List, Mapping, NoReturn, Optional, Tuple

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits, read from the launcher's environment variables."""

    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "torchrun", "slurm" or "single"
    local_world_size: int = 1
    master_addr: Optional[str] = None
    master_port: Optional[int] = None


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: Optional[str]  # None for a single process without a process group
    launcher: str
    local_world_size: int = 1  # processes on this node

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list such as 'gpu[003-004,007],cpu1'."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=10, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    m = re.match(r"([^\[,]+)(?:\[(\d+))?", nodelist)
    if not m:
        raise RuntimeError(f"cannot read the first host from SLURM node list {nodelist!r}; set MASTER_ADDR")
    return m.group(1) + (m.group(2) or "")


def read_launch_env(env: Mapping[str, str]) -> LaunchEnv:
    """Decide rank/world size from environment variables (a pure function, for tests)."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
                         local_rank=int(env.get("LOCAL_RANK", "0")), launcher="torchrun",
                         local_world_size=int(env.get("LOCAL_WORLD_SIZE", "1")),
                         master_addr=env.get("MASTER_ADDR"),
                         master_port=int(env["MASTER_PORT"]) if "MASTER_PORT" in env else None)
    # SLURM_STEP_NUM_TASKS is set by srun for a step but not in the batch script itself, whose
    # SLURM_NTASKS describes the allocation; trusting the latter would make a lone python process
    # wait forever for peers that were never started.
    step_tasks = int(env.get("SLURM_STEP_NUM_TASKS", "1"))
    if "SLURM_PROCID" in env and step_tasks > 1:
        job_id = int(env.get("SLURM_JOB_ID", "0"))
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "localhost")
        # SLURM_STEP_TASKS_PER_NODE looks like "8(x4)" or "8,7"; the first count is this node's or close to it
        per_node = re.match(r"\d+", env.get("SLURM_STEP_TASKS_PER_NODE", "1"))
        return LaunchEnv(rank=int(env["SLURM_PROCID"]), world_size=step_tasks,
                         local_rank=int(env.get("SLURM_LOCALID", "0")), launcher="slurm",
                         local_world_size=int(per_node.group(0)) if per_node else 1,
                         master_addr=env.get("MASTER_ADDR") or _first_slurm_host(nodelist),
                         master_port=int(env.get("MASTER_PORT", 20000 + job_id % 20000)))
    return LaunchEnv(rank=0, world_size=1, local_rank=0, launcher="single")


def device_index(local_rank: int, device_count: int, local_world_size: int) -> int:
    """The CUDA device, among those this process sees, that it trains on.

    SLURM's per-task GPU binding (srun --gpus-per-task=1, --gpu-bind=single:1) shows each task only
    its own GPU, as device 0, while SLURM_LOCALID still runs 0..7; torchrun, and srun without that
    binding, show every process of the node all its GPUs, to be told apart by local rank.
    """
    if device_count == 1:
        return 0
    if device_count >= local_world_size and 0 <= local_rank < device_count:
        return local_rank
    raise RuntimeError(
        f"local rank {local_rank} of {local_world_size} processes on this node sees {device_count} GPUs: "
        f"give each process one GPU (srun --gpus-per-task=1) or let it see at least {local_world_size} "
        f"(one process per GPU, CUDA_VISIBLE_DEVICES listing them all)")


def init_distributed(device_type: str = "auto", deterministic: bool = False, timeout_s: float = 1800.0) -> DistInfo:
    """Start the process group (if more than one process) and bind this process to its device;
    a collective that waits longer than ``timeout_s`` for the others raises (``lost_peer``)."""
    launch = read_launch_env(os.environ)
    use_cuda = torch.cuda.is_available() if device_type == "auto" else device_type == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device: --device cuda was asked for but CUDA is not available; use --device cpu")
    if use_cuda:
        if deterministic:
            # cuBLAS needs this before its first handle is made to be deterministic.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        index = device_index(launch.local_rank, torch.cuda.device_count(), launch.local_world_size)
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if launch.world_size == 1:
        return DistInfo(0, 1, 0, device, None, launch.launcher, 1)
    if launch.launcher == "slurm":
        os.environ["MASTER_ADDR"] = str(launch.master_addr)
        os.environ["MASTER_PORT"] = str(launch.master_port)
    backend = "nccl" if use_cuda else "gloo"
    kwargs: dict = {"backend": backend, "rank": launch.rank, "world_size": launch.world_size,
                    "init_method": "env://", "timeout": timedelta(seconds=timeout_s)}
    if use_cuda:
        kwargs["device_id"] = device  # binds NCCL to the device eagerly and avoids a guessed-device barrier
    dist.init_process_group(**kwargs)
    return DistInfo(launch.rank, launch.world_size, launch.local_rank, device, backend, launch.launcher,
                    launch.local_world_size)


def loader_workers(cpus: int, launcher: str, local_world_size: int, env: Mapping[str, str]) -> int:
    """Data-loader workers for a process whose CPU affinity holds ``cpus`` CPUs: its share, 1 to 8.

    torchrun's local processes all inherit its mask, so they share it. srun gives each task the
    mask its task plugin binds it to: with binding (task/affinity, task/cgroup) the task's own
    --cpus-per-task CPUs, already its share; without (task/none) the step's CPUs, shared. A mask
    smaller than what SLURM gave this node's tasks together (SLURM_CPUS_PER_TASK x local tasks,
    else SLURM_CPUS_ON_NODE) cannot be shared by all of them, so it is the task's own. Neither
    SLURM_CPUS_PER_TASK being set (task/none sets it too) nor a mask smaller than the node (a
    job's cgroup, shared by its tasks) says so alone.
    """
    local = max(local_world_size, 1)
    share = cpus // local
    if launcher == "slurm" and local > 1:
        def count(name: str) -> Optional[int]:
            value = env.get(name, "")
            return int(value) if value.isdigit() else None
        per_task = count("SLURM_CPUS_PER_TASK")
        given_here = per_task * local if per_task else count("SLURM_CPUS_ON_NODE")
        if given_here and cpus < given_here:
            share = cpus
    return max(1, min(8, share))


def default_workers(info: DistInfo) -> int:
    """Data-loader workers per process: its share of this node's CPUs, at most 8 (loader_workers)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return loader_workers(cpus, info.launcher, info.local_world_size, os.environ)


def lost_peer(error: BaseException) -> Optional[str]:
    """What the backend said, when ``error`` means another process of the run is gone or stuck (its
    host died or lost its network, it was killed or frozen) rather than a bug here; else None.
    NCCL raises DistBackendError; gloo a plain RuntimeError from its TCP transport."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    if isinstance(error, (dist.DistBackendError, dist.DistNetworkError)):
        return first[:300]
    # gloo's transport errors; the same wait can end in any of them, with or without gloo's source
    # path in front ("Application timeout caused pair closure" has none)
    gloo_io = ("Connection reset by peer", "Connection closed by peer", "Timed out waiting", "Connection refused",
               "Broken pipe", "No route to host", "caused pair closure")
    if isinstance(error, RuntimeError) and any(s in text for s in gloo_io):
        return first[:300]
    return None


def shutdown(info: DistInfo) -> None:
    if info.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


def exit_without_teardown(code: int) -> NoReturn:
    """End a process whose run is over and whose files are all written, skipping the interpreter's
    teardown, in which torch's C++ runtime now and then aborts a completed run (docs/training.md,
    exit statuses). Garbage is collected first, so data-loader iterators shut their worker
    processes down; then the streams are flushed and the process ends.
    """
    gc.collect()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said there
            pass
    os._exit(code)


def barrier(info: DistInfo) -> None:
    if info.is_distributed:
        if info.backend == "nccl":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def all_reduce(tensor: torch.Tensor, info: DistInfo, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce that is a no-op for a single process; the tensor must be on info.device."""
    if info.is_distributed:
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return tensor


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    if not info.is_distributed:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src, device=info.device)
    return holder[0]


def gather_objects(obj: Any, info: DistInfo) -> List[Any]:
    """Every rank's object, in rank order, on every rank (small objects such as RNG states)."""
    if not info.is_distributed:
        return [obj]
    out: List[Any] = [None] * info.world_size
    # Pickled to bytes first so that tensors inside do not need to live on the collective's device.
    dist.all_gather_object(out, pickle.dumps(obj))
    return [pickle.loads(b) for b in out]


# --- refusing bad input together ----------------------------------------------------------------
# A bad input found by one rank must stop every rank at the same point, with the message printed
# once: a rank that exits alone leaves the others in a collective (and torchrun then adds a
# "Connection reset by peer" traceback of its own).

class SharedError(Exception):
    """A refusal that every rank raises with the same message; rank 0 prints it."""


def decided_by_main(info: DistInfo, decide: Callable[[], Any], refusals: Tuple[type, ...]) -> Any:
    """Rank 0's answer on every rank, or its refusal (one of `refusals`) raised on every rank."""
    outcome: Any = None
    if info.is_main:
        try:
            outcome = ("answer", decide())
        except refusals as e:
            outcome = ("refusal", str(e))
    kind, value = broadcast_object(outcome, info)
    if kind == "refusal":
        raise SharedError(value)
    return value


def checked_on_every_rank(info: DistInfo, check: Callable[[], Any], refusals: Tuple[type, ...]) -> Any:
    """`check()` on every rank; if any rank refuses, all raise the lowest such rank's message."""
    result, message = None, None
    try:
        result = check()
    except refusals as e:
        message = str(e)
    first = next((m for m in gather_objects(message, info) if m is not None), None)
    if first is not None:
        raise SharedError(first)
    return result
