"""A throw-away SLURM cluster on localhost, for tests of the launch scripts on real daemons.

One node (this host, on 127.0.0.1) by default; given a simulated cluster of network namespaces
(tests/netns_cluster.py), one node per simulated host instead: slurmctld and the clients on the
first host, a slurmd on every host (``-N`` its node name, ``%n`` in its spool, pid and log paths),
each node at its host's own address, so that the job steps run on their hosts.

Debian's munge, slurmctld and slurmd run as root without systemd or cgroups when process
tracking is done by walking /proc (proctrack/linuxproc) and task binding is off (task/none).
Every file the daemons write (config, state, spool, logs, pid files, the munge socket and key)
lives in one temporary directory, the ports are picked free, and the daemons are stopped by the
pids they wrote, so a cluster started here never touches a system-wide SLURM or munge setup.

Used as a library by the tests (``LocalSlurm``) and from the shell for manual experiments:

    python tests/slurm/cluster.py up /tmp/slurm      # prints `export SLURM_CONF=...`
    SLURM_CONF=/tmp/slurm/slurm.conf sbatch --wrap 'hostname'
    python tests/slurm/cluster.py down /tmp/slurm
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGES = ("munge", "slurmctld", "slurmd", "slurm-client", "procps")
# pgrep (procps) is what launch/node_agent.sh uses to find torchrun's workers.
BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "slurmstepd", "sbatch", "scontrol", "sinfo", "pgrep")
SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/bin")


PARTITION = "debug"


class SlurmUnavailable(RuntimeError):
    """This machine cannot host the test cluster (not root, or no way to install SLURM)."""


def _which(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in SBIN_DIRS:  # sbin is often missing from a non-login root PATH
        p = Path(d) / name
        if p.exists():
            return str(p)
    return None


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if _which(b) is None]


def why_unavailable() -> str | None:
    """The reason this machine cannot run the cluster, or None when it can (perhaps after apt)."""
    if sys.platform != "linux":
        return f"SLURM test cluster needs Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return "SLURM test cluster needs root (the daemons run as root and munged as user munge)"
    if missing_binaries() and _which("apt-get") is None:
        return f"SLURM is not installed ({', '.join(missing_binaries())} missing) and apt-get is absent"
    return None


def ensure_installed(log=print) -> None:
    """Install Debian's SLURM and munge packages when any binary is missing (about 10-30 s)."""
    missing = missing_binaries()
    if not missing:
        return
    log(f"installing {' '.join(PACKAGES)} (missing: {', '.join(missing)})")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    # Recommends pull in a dozen unrelated plugin packages; the base packages are enough.
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES], check=True, env=env
    )
    still = missing_binaries()
    if still:
        raise RuntimeError(f"apt-get installed {PACKAGES} but {still} are still missing")


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still answers kill(0); treat it as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class LocalSlurm:
    """A SLURM cluster with its files under ``root``: one node (this host's short name), or one
    per host of ``hosts`` (a NetnsCluster), the first of which runs slurmctld."""

    def __init__(self, root: str | os.PathLike, cpus: int | None = None, log=print, hosts=None):
        self.root = Path(root).resolve()
        self.hosts = hosts
        self.nodes = list(hosts.hosts) if hosts is not None else [socket.gethostname().split(".")[0]]
        self.node = self.nodes[0]
        self.cpus = cpus or os.cpu_count() or 1
        self.log = log
        self.conf = self.root / "slurm.conf"

    def _address(self, node: str) -> str:
        return self.hosts.address(node) if self.hosts is not None else "127.0.0.1"

    def _on(self, node: str, argv: list[str], env: dict[str, str] | None = None, **popen_kwargs) -> subprocess.Popen:
        """Start ``argv`` on ``node``: in its network namespace when the cluster has hosts."""
        if self.hosts is not None:
            return self.hosts.run(node, argv, env, **popen_kwargs)
        return subprocess.Popen(argv, env=env, **popen_kwargs)

    @property
    def munge_dir(self) -> Path:
        """munged runs as user munge, which must reach its socket; a private root (pytest's
        tmp_path is 0700) would not let it, so munge gets a directory of its own in /tmp."""
        record = self.root / "munge_dir"
        if not record.exists():
            record.write_text(tempfile.mkdtemp(prefix="munge-", dir="/tmp"))
        return Path(record.read_text().strip())

    # -- environment for clients -------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """os.environ plus what SLURM clients need to find this cluster (sbatch exports it on)."""
        path = os.environ.get("PATH", "")
        extra = [d for d in SBIN_DIRS if d not in path.split(os.pathsep)]
        return dict(os.environ, SLURM_CONF=str(self.conf), PATH=os.pathsep.join([path, *extra]))

    def run(self, *args: str, check: bool = True, timeout: float = 60,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Runs a SLURM client (on the first node); ``env`` adds variables (sbatch hands them on to the job)."""
        proc = self._on(self.node, list(args), {**self.env, **(env or {})}, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True, start_new_session=False)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        done = subprocess.CompletedProcess(list(args), proc.returncode, out, err)
        if check:
            done.check_returncode()
        return done

    def node_state(self) -> str:
        """sinfo's state of the nodes (idle, allocated, mixed, completing, down...): one word when
        they all agree, else the states seen, comma-separated."""
        lines = self.run("sinfo", "-h", "-N", "-o", "%T", check=False, timeout=20).stdout.split()
        return ",".join(sorted(set(lines)))

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> "LocalSlurm":
        reason = why_unavailable()
        if reason:
            raise SlurmUnavailable(reason)
        ensure_installed(self.log)
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self._start_munge()
            self._write_conf()
            self._start_daemon("slurmctld", self.node, ["slurmctld", "-f", str(self.conf)])
            for node in self.nodes:
                (self.root / "spool" / node).mkdir(parents=True, exist_ok=True)
                self._start_daemon("slurmd", node, ["slurmd", "-N", node, "-f", str(self.conf)])
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 20) -> None:
        """Cancel what still runs, then stop the daemons by the pids they wrote, slurmd first.

        Jobs go first: slurmstepd keeps a job's processes (torchrun, trainers) alive after
        slurmd itself has stopped.
        """
        if self._alive("slurmctld") and all(self._alive("slurmd", node) for node in self.nodes):
            self.run("scancel", "--full", "--signal=KILL", f"--partition={PARTITION}", check=False)
            self.run("scancel", f"--partition={PARTITION}", check=False)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                q = self.run("squeue", "-h", "-t", "all", "-o", "%i %T", check=False)
                if q.returncode != 0 or not any(
                    line.split()[1] in ("RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED")
                    for line in q.stdout.splitlines() if line.strip()
                ):
                    break
                time.sleep(0.25)
        daemons = [("slurmd", node) for node in self.nodes] + [("slurmctld", None), ("munged", None)]
        for name, node in daemons:
            pid = self._pid(name, node)
            if pid is None or not pid_alive(pid):
                continue
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if pid_alive(pid):
                self.log(f"{name} (pid {pid}) ignored SIGTERM for {timeout:.0f} s, killing it")
                os.kill(pid, signal.SIGKILL)
        record = self.root / "munge_dir"
        if record.exists():
            shutil.rmtree(record.read_text().strip(), ignore_errors=True)
            record.unlink()

    def _pidfile(self, name: str, node: str | None = None) -> Path:
        """Where daemon ``name`` writes its pid; slurmd's path has SLURM's %n (its node name) in it."""
        if name == "munged":
            return self.munge_dir / "munged.pid"
        if name == "slurmd":
            return self.root / f"slurmd.{node or '%n'}.pid"
        return self.root / f"{name}.pid"

    def _pid(self, name: str, node: str | None = None) -> int | None:
        try:
            return int(self._pidfile(name, node).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _alive(self, name: str, node: str | None = None) -> bool:
        pid = self._pid(name, node)
        return pid is not None and pid_alive(pid)

    def __enter__(self) -> "LocalSlurm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- pieces ------------------------------------------------------------------------------
    def _start_munge(self) -> None:
        d = self.munge_dir
        d.mkdir(exist_ok=True)
        d.chmod(0o711)  # munged insists that every user can reach its socket
        key = d / "munge.key"
        if not key.exists():
            subprocess.run([_which("mungekey"), "--create", f"--keyfile={key}"], check=True)
        shutil.chown(d, "munge", "munge")
        shutil.chown(key, "munge", "munge")
        key.chmod(0o600)
        cmd = [
            _which("munged"),
            f"--socket={d / 'munge.socket'}",
            f"--key-file={key}",
            f"--pid-file={self._pidfile('munged')}",
            f"--log-file={d / 'munged.log'}",
            f"--seed-file={d / 'munged.seed'}",
        ]
        # munged refuses to run as root; it daemonizes and writes its pid file once ready.
        proc = subprocess.run(cmd, user="munge", group="munge", capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"munged failed to start (exit {proc.returncode}): {proc.stderr.strip()}\n"
                               f"{self._tail(d / 'munged.log')}")
        self._wait_pidfile("munged", d / "munged.log")

    def _write_conf(self) -> None:
        ctld_port, slurmd_port = _free_ports(2)
        r = self.root
        (r / "state").mkdir(exist_ok=True)
        (r / "spool").mkdir(exist_ok=True)
        nodes = "\n".join(f"NodeName={n} NodeAddr={self._address(n)} CPUs={self.cpus} State=UNKNOWN"
                          for n in self.nodes)
        lines = f"""
            # Written by tests/slurm/cluster.py for a test cluster on this machine.
            ClusterName=localtest
            SlurmctldHost={self.node}({self._address(self.node)})
            SlurmUser=root
            SlurmdUser=root
            SlurmctldPort={ctld_port}
            SlurmdPort={slurmd_port}
            AuthType=auth/munge
            CredType=cred/munge
            AuthInfo=socket={self.munge_dir / 'munge.socket'}
            StateSaveLocation={r / 'state'}
            SlurmdSpoolDir={r / 'spool'}/%n
            SlurmctldPidFile={self._pidfile('slurmctld')}
            SlurmdPidFile={self._pidfile('slurmd')}
            SlurmctldLogFile={r / 'slurmctld.log'}
            SlurmdLogFile={r / 'slurmd.%n.log'}
            SlurmctldDebug=info
            SlurmdDebug=info
            # No systemd or cgroups here: track processes by walking /proc, bind nothing.
            ProctrackType=proctrack/linuxproc
            TaskPlugin=task/none
            SelectType=select/cons_tres
            SelectTypeParameters=CR_Core
            SchedulerType=sched/builtin
            MpiDefault=none
            JobAcctGatherType=jobacct_gather/none
            AccountingStorageType=accounting_storage/none
            JobCompType=jobcomp/none
            ReturnToService=2
            # Tests look at finished jobs with scontrol for a while after they end.
            MinJobAge=600
            KillWait=10
            {nodes}
            PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
        """
        self.conf.write_text("\n".join(line.strip() for line in lines.strip().splitlines()) + "\n")

    def _start_daemon(self, name: str, node: str, cmd: list[str]) -> None:
        """Start daemon ``name`` on ``node``; it forks into the background and writes its pid file."""
        cmd = [_which(cmd[0]), *cmd[1:]]
        logfile = self.root / (f"slurmd.{node}.log" if name == "slurmd" else f"{name}.log")
        proc = self._on(node, cmd, self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _, err = proc.communicate(timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed to start on {node} (exit {proc.returncode}): {err.strip()}\n"
                               f"{self._tail(logfile)}")
        self._wait_pidfile(name, logfile, node=node if name == "slurmd" else None)

    def _wait_pidfile(self, name: str, logfile: Path, timeout: float = 20, node: str | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._alive(name, node):
                return
            time.sleep(0.1)
        raise RuntimeError(f"{name} did not come up within {timeout:.0f} s\n{self._tail(logfile)}")

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        state = "?"
        while time.monotonic() < deadline:
            state = self.node_state()
            if state == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(
            f"nodes {','.join(self.nodes)} not idle after {timeout:.0f} s (last state: {state!r})\n"
            f"{self._tail(self.root / 'slurmctld.log')}\n{self._tail(self.root / f'slurmd.{self.node}.log')}"
        )

    @staticmethod
    def _tail(path: Path, n: int = 15) -> str:
        try:
            lines = path.read_text(errors="replace").splitlines()[-n:]
        except OSError:
            return f"({path} not written)"
        return f"--- last lines of {path} ---\n" + "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in ("up", "down"):
        print(__doc__)
        return 2
    cluster = LocalSlurm(argv[2])
    if argv[1] == "up":
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}")
    else:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
