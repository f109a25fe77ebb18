"""The W&B run of a training run: rank 0 only, optional, and never a reason to stop training.

Modes: ``auto`` (WANDB_MODE if set; else online when an API key or netrc entry exists and the
server answers within a few seconds; else offline), ``online``, ``offline``, ``disabled``.
wandb is imported lazily, so it is not needed unless a run asks for it. The run id is chosen here,
stored in every checkpoint, and passed back on resume so a requeued job continues the same run.
Metrics are always logged with an explicit global step: offline runs ignore ``resume=``, and each
restart writes a new offline-run folder with the same id; ``wandb sync`` merges them by step.
"""
from __future__ import annotations

import netrc
import os
import secrets
import socket
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple
from urllib.parse import urlsplit

_DEFAULT_HOST = "https://api.wandb.ai"


def _has_credentials(env: Mapping[str, str]) -> bool:
    if env.get("WANDB_API_KEY"):
        return True
    url = urlsplit(env.get("WANDB_BASE_URL", _DEFAULT_HOST))
    path = env.get("NETRC") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".netrc")
    try:
        entries = netrc.netrc(path)
    except (OSError, netrc.NetrcParseError):
        return False
    for host in (url.netloc, url.hostname):  # wandb writes host:port for servers on a port
        creds = entries.authenticators(host) if host else None
        if creds and creds[2]:
            return True
    return False


def _server_reachable(env: Mapping[str, str], timeout: float = 5.0) -> bool:
    """Connect to the W&B server with a hard timeout; DNS lookups have none, hence the thread."""
    url = urlsplit(env.get("WANDB_BASE_URL", _DEFAULT_HOST))
    host, port = url.hostname or "api.wandb.ai", url.port or (80 if url.scheme == "http" else 443)
    ok = [False]

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok[0] = True
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return ok[0]


def resolve_mode(requested: str, env: Mapping[str, str]) -> Tuple[str, str]:
    """(mode, reason) where mode is online, offline or disabled."""
    if requested == "auto":
        if env.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
            return "disabled", "WANDB_DISABLED is set"
        env_mode = env.get("WANDB_MODE", "").lower()
        if env_mode in ("online", "offline", "disabled"):
            requested = env_mode
        elif env_mode == "dryrun":
            return "offline", "WANDB_MODE=dryrun"
        elif not _has_credentials(env):
            return "offline", "no W&B credentials (WANDB_API_KEY or ~/.netrc); sync later with `wandb sync`"
        else:
            requested = "online"
    if requested == "online" and not _server_reachable(env):
        # wandb.init would wait ~100 s and then fail; offline keeps everything for a later sync.
        return "offline", "W&B server unreachable; logging offline, sync later with `wandb sync`"
    return requested, f"--wandb {requested}" if requested != "online" else "online"


class WandbRun:
    """A W&B run or nothing; every call is safe either way."""

    def __init__(self, run: Any = None, run_id: Optional[str] = None,
                 report: Callable[[str], None] = print) -> None:
        self._run = run
        self.id = run_id
        self._report = report

    @property
    def active(self) -> bool:
        return self._run is not None

    def _fail(self, what: str, error: BaseException) -> None:
        self._report(f"warning: W&B {what} failed ({type(error).__name__}: {error}); training continues without W&B")
        self._run = None

    def log(self, metrics: Dict[str, Any], step: int) -> None:
        if self._run is None:
            return
        try:
            self._run.log(metrics, step=step)
        except Exception as e:
            self._fail("log", e)

    def mark_preempting(self) -> None:
        if self._run is None:
            return
        try:
            self._run.mark_preempting()
        except Exception as e:
            self._fail("mark_preempting", e)

    def finish(self, exit_code: int = 0) -> None:
        if self._run is None:
            return
        try:
            self._run.finish(exit_code=exit_code)
        except Exception as e:
            self._fail("finish", e)
        self._run = None


def _quiet_settings(wandb: Any) -> Any:
    """Fewer banner lines from wandb itself: the trainer prints the run's id, mode and folder."""
    try:
        return wandb.Settings(quiet=True)
    except Exception:  # a wandb without this setting
        return None


def start_wandb(*, mode: str, project: str, entity: Optional[str], name: Optional[str], tags: list,
                config: Dict[str, Any], run_dir: Path, run_id: Optional[str], is_main: bool,
                report: Callable[[str], None]) -> WandbRun:
    """Start (or continue, when run_id is given) the W&B run on rank 0; a no-op elsewhere."""
    run_id = run_id or secrets.token_hex(4)
    if not is_main:
        return WandbRun(None, run_id, report)
    resolved, reason = resolve_mode(mode, os.environ)
    if resolved == "disabled":
        return WandbRun(None, run_id, report)
    try:
        import wandb
    except Exception as e:  # ImportError, or a broken install raising anything at import time
        report(f"warning: wandb could not be imported ({type(e).__name__}: {e}); training continues without W&B "
               "(pip install wandb, or pass --wandb disabled)")
        return WandbRun(None, run_id, report)
    try:
        run = wandb.init(project=project, entity=entity, name=name or run_dir.resolve().name, tags=tags or None,
                         id=run_id, resume="allow", dir=str(run_dir), mode=resolved, settings=_quiet_settings(wandb))
        run.config.update(config, allow_val_change=True)
    except Exception as e:
        report(f"warning: wandb.init failed ({type(e).__name__}: {e}); training continues without W&B")
        return WandbRun(None, run_id, report)
    report(f"W&B: {resolved} run {run_id} in {Path(run.dir).parent} ({reason})")
    return WandbRun(run, run_id, report)
