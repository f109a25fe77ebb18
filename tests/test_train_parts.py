"""The small parts of the trainer: launch environments, W&B mode choice, LR schedule, signal handling."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from _train_util import REPO
from densenet.training.config import parse_config
from densenet.training.distributed import read_launch_env
from densenet.training.inputs import DeviceNormalize
from densenet.training.settings import resolve_amp
from densenet.training.optim import LRSchedule, build_optimizer, load_optimizer_state
from densenet.training.wandb_run import WandbRun, resolve_mode, start_wandb


def test_launch_env_torchrun_slurm_and_single():
    tr = read_launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                          "MASTER_ADDR": "h", "MASTER_PORT": "29500", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"})
    assert (tr.launcher, tr.rank, tr.world_size, tr.local_rank, tr.local_world_size) == ("torchrun", 3, 8, 1, 4)
    slurm = read_launch_env({"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
                             "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_ID": "1234",
                             "SLURM_STEP_NODELIST": "gpu[003-004]", "PATH": ""})
    assert (slurm.launcher, slurm.rank, slurm.world_size, slurm.local_rank, slurm.local_world_size) == \
        ("slurm", 5, 8, 1, 4)
    assert slurm.master_addr == "gpu003" and slurm.master_port == 20000 + 1234
    # the batch script itself: the allocation has 8 tasks, but this lone process is not one of 8
    batch = read_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "1"})
    assert (batch.launcher, batch.world_size) == ("single", 1)


def test_wandb_mode_without_credentials_or_network(tmp_path):
    home = {"HOME": str(tmp_path), "NETRC": str(tmp_path / "none")}
    assert resolve_mode("auto", home)[0] == "offline"
    assert resolve_mode("auto", {**home, "WANDB_MODE": "disabled"})[0] == "disabled"
    assert resolve_mode("disabled", home)[0] == "disabled"
    # credentials but no reachable server: offline at once instead of a 100-second wait
    (tmp_path / "netrc").write_text("machine 127.0.0.1:9 login user password " + "k" * 40 + "\n")
    unreachable = {**home, "NETRC": str(tmp_path / "netrc"), "WANDB_BASE_URL": "http://127.0.0.1:9"}
    mode, reason = resolve_mode("auto", unreachable)
    assert mode == "offline" and "unreachable" in reason
    assert resolve_mode("online", unreachable)[0] == "offline"


def test_broken_wandb_never_stops_training(tmp_path):
    messages = []

    class Broken:
        dir = "x"

        def log(self, *a, **k):
            raise ConnectionError("boom")

    run = WandbRun(Broken(), "abc", messages.append)
    run.log({"a": 1}, step=1)
    run.log({"a": 2}, step=2)  # after the first failure W&B is off: no second report, no exception
    run.finish()
    assert len(messages) == 1 and "training continues without W&B" in messages[0]
    off = start_wandb(mode="disabled", project="p", entity=None, name=None, tags=[], config={}, run_dir=tmp_path,
                      run_id=None, is_main=True, report=messages.append)
    assert not off.active and len(off.id) == 8  # an id is kept even when off, for a later resume


def test_lr_schedules():
    cfg = parse_config(["--data", "demo"])
    step = LRSchedule.from_config(cfg, peak=0.1, steps_per_epoch=10)
    assert step(0) == 0.1 and step(299) == 0.1 and step(300) == pytest.approx(0.01) and step(600) == pytest.approx(1e-3)
    modern = parse_config(["--data", "demo", "--recipe", "modern", "--epochs", "10"])
    cos = LRSchedule.from_config(modern, peak=0.4, steps_per_epoch=10)
    assert cos(0) == pytest.approx(0.4 / 50) and cos(49) == pytest.approx(0.4)  # 5 warmup epochs
    assert cos(75) == pytest.approx(0.2) and cos(100) == pytest.approx(0.0, abs=1e-12)


def test_no_weight_decay_on_norms_and_biases_and_config_wins_on_resume():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    cfg = parse_config(["--data", "demo", "--no-weight-decay-norm-bias", "--weight-decay", "0.05"])
    opt = build_optimizer(model, cfg, lr=0.1)
    assert [(len(g["params"]), g["weight_decay"]) for g in opt.param_groups] == [(1, 0.05), (3, 0.0)]
    saved = opt.state_dict()
    opt2 = build_optimizer(model, parse_config(["--data", "demo", "--no-weight-decay-norm-bias",
                                                "--weight-decay", "0.01"]), lr=0.1)
    load_optimizer_state(opt2, saved)
    assert opt2.param_groups[0]["weight_decay"] == 0.01


def test_amp_choice_and_device_normalisation():
    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) is None and resolve_amp("bf16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        resolve_amp("fp16", cpu)
    norm = DeviceNormalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), cpu, channels_last=True)
    x = norm(torch.full((2, 3, 4, 4), 255, dtype=torch.uint8))
    assert x.dtype == torch.float32 and torch.allclose(x, torch.full_like(x, 2.0))
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_settings_are_resolved_once_for_the_device():
    from densenet.training.config import ConfigError
    from densenet.training.distributed import DistInfo
    from densenet.training.settings import resolve_settings

    cpu = DistInfo(1, 2, 1, torch.device("cpu"), "gloo", "torchrun", 2)
    run = resolve_settings(parse_config(["--data", "demo", "--workers", "3", "--seed", "7"]), cpu)
    assert (run.amp_dtype, run.channels_last, run.pin_memory, run.decode_on) == (None, False, False, None)
    assert run.workers == 3 and run.rank_seed == 7 + 1000
    run = resolve_settings(parse_config(["--data", "demo", "--channels-last", "--amp", "bf16"]), cpu)
    assert run.channels_last and run.amp_dtype is torch.bfloat16 and run.workers >= 1
    for flags, message in ((["--amp", "fp16"], "amp: fp16 needs CUDA"),
                           (["--sync-bn"], "sync_bn: SyncBatchNorm needs CUDA")):
        with pytest.raises(ConfigError, match=message):
            resolve_settings(parse_config(["--data", "demo", *flags]), cpu)


def test_signal_handling_in_a_real_process():
    """First signal: a flag. The same signal again right away (a launcher forwarding it): ignored.
    A second signal later: exit at once with 128 + signum."""
    script = textwrap.dedent("""
        import os, signal, sys, time
        sys.path.insert(0, sys.argv[1])
        from densenet.training.signals import DUPLICATE_WINDOW_S, StopRequest
        stop = StopRequest().install()
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.signum == signal.SIGUSR1
        print("still running", flush=True)
        time.sleep(DUPLICATE_WINDOW_S + 0.2)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
        print("not reached", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(REPO)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 128 + 2, proc.stderr
    assert "still running" in proc.stdout and "not reached" not in proc.stdout
    assert "received SIGUSR1" in proc.stderr and "second signal SIGINT: exiting now" in proc.stderr


def test_exit_without_teardown_flushes_and_stops_loader_workers(tmp_path):
    """After a run with a gloo process group and persistent loader workers, the trainer leaves
    without the interpreter's teardown: the exit code and unflushed output survive, and no loader
    worker outlives the process."""
    script = textwrap.dedent("""
        import os, socket, sys
        sys.path.insert(0, sys.argv[1])
        import torch, torch.distributed as dist
        from densenet.training.distributed import exit_without_teardown

        def run():
            sock = socket.socket(); sock.bind(("127.0.0.1", 0)); port = sock.getsockname()[1]; sock.close()
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
            data = torch.utils.data.TensorDataset(torch.arange(16.0))
            loader = torch.utils.data.DataLoader(data, batch_size=4, num_workers=2, persistent_workers=True)
            batch = next(iter(loader))[0]
            dist.all_reduce(batch)
            pids = [w.pid for w in loader._iterator._workers]
            open(sys.argv[2], "w").write(" ".join(map(str, pids)))
            dist.destroy_process_group()
            print(f"sum {int(batch.sum())}")  # not flushed: stdout is a pipe here

        run()
        exit_without_teardown(3)
    """)
    pid_file = tmp_path / "workers"
    proc = subprocess.run([sys.executable, "-c", script, str(REPO), str(pid_file)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.strip() == "sum 6", proc.stdout
    pids = [int(p) for p in pid_file.read_text().split()]
    assert len(pids) == 2

    def alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split(")")[-1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    assert not any(alive(pid) for pid in pids), "a loader worker outlived the process"
