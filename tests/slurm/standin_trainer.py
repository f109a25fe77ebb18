"""A tiny trainer with train_dist.py's launch contract, for exercising the launch machinery fast.

It keeps the parts of the contract the launch scripts depend on and nothing else:
- run under torchrun (gloo), every rank steps in lock-step (one all_reduce per step);
- SIGTERM, SIGINT or SIGUSR1 on ANY rank: all ranks finish the step, rank 0 saves, exit 3;
  a second signal exits at once with 128 + signum;
- ``--output-dir`` holds ``last.pt`` (JSON here) and ``metrics.jsonl`` with "train" lines and
  "resumed" / "interrupted" events; rerunning the same command resumes from ``last.pt``;
- a finished run exits 0.

    torchrun --nproc_per_node=2 tests/slurm/standin_trainer.py --output-dir /tmp/run --max-steps 50
"""

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

EXIT_INTERRUPTED = 3
_received: list[int] = []


def _on_signal(signum, frame):
    if _received:
        os._exit(128 + signum)
    _received.append(signum)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--output-dir", required=True)
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--ckpt-every", type=int, default=10)
    p.add_argument("--step-time", type=float, default=0.2)
    args, _unknown = p.parse_known_args()  # the launch scripts may pass trainer-only flags

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(s, _on_signal)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(args.output_dir)
    ckpt, metrics = out / "last.pt", out / "metrics.jsonl"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()

    def log(record: dict) -> None:
        if rank == 0:
            with metrics.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)

    def save(step: int) -> None:
        if rank == 0:
            tmp = ckpt.with_suffix(".tmp")
            tmp.write_text(json.dumps({"step": step}))
            os.replace(tmp, ckpt)
        dist.barrier()

    step = 0
    if ckpt.exists():
        step = json.loads(ckpt.read_text())["step"]
        restarts = os.environ.get("SLURM_RESTART_COUNT") or os.environ.get("TORCHELASTIC_RESTART_COUNT")
        log({"kind": "event", "event": "resumed", "epoch": 0, "step": step, "from_step": step,
             "restart_count": int(restarts or 0), "world_size": world})

    while step < args.max_steps:
        time.sleep(args.step_time)
        step += 1
        stop = torch.tensor([1.0 if _received else 0.0])
        dist.all_reduce(stop)  # every rank learns that one of them was signalled
        log({"kind": "train", "epoch": 0, "step": step, "loss": 1.0 / step})
        if stop.item() > 0:
            save(step)
            sig = signal.Signals(_received[0]).name if _received else "peer"
            log({"kind": "event", "event": "interrupted", "epoch": 0, "step": step, "signal": sig})
            dist.destroy_process_group()
            return EXIT_INTERRUPTED
        if step % args.ckpt_every == 0:
            save(step)
    save(step)
    log({"kind": "event", "event": "finished", "epoch": 0, "step": step})
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
