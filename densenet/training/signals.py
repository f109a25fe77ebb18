"""Graceful stop on SIGTERM / SIGINT / SIGUSR1.

The first signal only sets a flag; the training loop checks it after every optimizer step (all
ranks agree through one all-reduce, so a signal that reached a single rank still stops all of them
at the same step), saves a checkpoint and exits with EXIT_INTERRUPTED. A second signal exits at
once with 128 + signum, the status a shell reports for a process killed by that signal.

SIGUSR1 is SLURM's usual "time is nearly up" warning. torchrun forwards SIGTERM and SIGINT to its
workers but not SIGUSR1: under torchrun, send SIGUSR1 to the worker processes themselves.

One signal often arrives twice: Ctrl-C reaches every process of the terminal's foreground group and
torchrun forwards it again; SLURM signals every process of a step and torchrun forwards that too.
So a repeat within DUPLICATE_WINDOW_S of the first signal is taken as the same request.

torchrun and SLURM signal every rank, so only rank 0 says that the first signal arrived (one line
per job, not one per rank); rank 0's "stopped by a signal at step N" line follows in any case, also
when the signal reached only other ranks. A second signal is reported by every rank it ends.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Optional

EXIT_OK = 0
EXIT_CONFIG_ERROR = 2
EXIT_INTERRUPTED = 3  # a checkpoint was saved: run the same command again to resume
EXIT_NONFINITE = 4  # the loss became NaN/inf; the last good checkpoint was left as it was
EXIT_PEER_LOST = 5  # another process of the run died, was cut off or froze; rerun to resume from the last checkpoint

# A launcher cannot see the trainer's exit status through torchrun, which ends with 1 whenever a
# worker failed: launch/node_agent.sh names a node-local folder here and reads each worker's
# status from it, so that a lost peer (5) becomes "requeue" while a bad input (2) stays a failure.
STATUS_DIR_ENV = "DENSENET_EXIT_STATUS_DIR"

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
DUPLICATE_WINDOW_S = 2.0


def launch_rank() -> int:
    """This process's global rank as the launcher set it (torchrun's RANK, else SLURM's SLURM_PROCID,
    else 0), known before the process group exists, so that a signal handler can use it."""
    for name in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 0


def record_exit_status(code: int) -> None:
    """Leave this process's exit status in $DENSENET_EXIT_STATUS_DIR/rank.<RANK> for the node agent
    (nothing when the variable is unset). Written whole or not at all: a rename is atomic."""
    folder = os.environ.get(STATUS_DIR_ENV, "").strip()
    if not folder:
        return
    path = os.path.join(folder, f"rank.{launch_rank()}")
    try:
        with open(path + ".tmp", "w") as f:
            f.write(f"{code}\n")
        os.replace(path + ".tmp", path)
    except OSError as e:  # the status is advice for the launcher; losing it must not change the exit
        os.write(2, f"warning: could not record exit status {code} in {path}: {e}\n".encode())


class StopRequest:
    """Records the first stop signal; installing it replaces the handlers of HANDLED signals."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._first_at = 0.0
        self._pid = os.getpid()
        self._speaks = launch_rank() == 0  # says that the first signal arrived

    def install(self) -> "StopRequest":
        for sig in HANDLED:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if os.getpid() != self._pid:
            # A forked data-loader worker inherited this handler; the main process decides.
            return
        if self.signum is not None:
            if time.monotonic() - self._first_at < DUPLICATE_WINDOW_S:
                return  # the same request delivered twice (see the module docstring)
            os.write(2, f"\nsecond signal {signal.Signals(signum).name}: exiting now without saving\n".encode())
            os._exit(128 + signum)
        self.signum = signum
        self._first_at = time.monotonic()
        if not self._speaks:
            return
        # os.write rather than print: a handler may interrupt a print and re-enter the same stream.
        os.write(2, f"\nreceived {signal.Signals(signum).name}: finishing the current step, saving a checkpoint, "
                    f"then exiting with status {EXIT_INTERRUPTED}; send it again to exit at once\n".encode())

    def ignore_further(self) -> None:
        """After the final checkpoint is safely written, late signals (a launcher tearing the job
        down once one rank has exited) must not turn a clean, resumable exit into a kill."""
        for sig in HANDLED:
            signal.signal(sig, signal.SIG_IGN)
