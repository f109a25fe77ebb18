"""A simulated cluster on one machine: every "host" is a Linux network namespace of its own.

The hosts hang off one bridge, which lives in a namespace of its own too, so nothing of a cluster
is visible from the machine's own network stack and two clusters never see each other (even with
the same addresses). Each host has

* its own address (``address(host)``) on the bridge and its own loopback,
* its own hostname as seen by the processes started on it (``socket.gethostname()``): each
  process runs in a UTS namespace of its own with the host's name set,
* an /etc/hosts that names every host of the cluster (/etc/netns/<namespace>/hosts bind-mounted
  over /etc/hosts in a mount namespace of the process's own), so a host's name resolves to its
  own bridge address on every host, as on a real cluster, and never to a loopback address.

Everything else of the machine stays as it is, /sys included: ``ip netns exec`` would remount /sys
for the namespace and so hide the machine's cgroup mounts, without which slurmd does not start
(tests/slurm/cluster.py runs one slurmd per host).

    with NetnsCluster(["node1", "node2"]) as cluster:
        p = cluster.run("node2", ["python", "-c", "import socket; print(socket.gethostname())"],
                        stdout=subprocess.PIPE)
        cluster.cut("node2")       # its link goes down: nothing reaches it or leaves it
        cluster.restore("node2")
        cluster.kill_host("node2") # SIGKILL to every process on it

Every namespace is named ``dnh-<tag>-...`` with a random tag and the creating process's pid in
/run/netns-cluster/<tag>.pid; a new cluster first removes the namespaces of clusters whose
creator is gone (a crashed earlier run), never those of a cluster still in use.
"""
from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from slurm.cluster import pid_alive

PREFIX = "dnh-"
STATE_DIR = Path("/run/netns-cluster")
NETNS_ETC = Path("/etc/netns")
# Private ranges unlikely to be in use; the first one the machine has no address or route in is used.
SUBNETS = ("10.213.0.0/24", "10.213.77.0/24", "172.30.213.0/24", "192.168.213.0/24")

# Runs first in every process started on a host: into the host's network namespace, a mount and a
# UTS namespace of its own with the host's /etc/hosts, /etc/resolv.conf and name, then exec of
# the command (so the pid that run() returns is the command's).
_ENTER = (
    "import ctypes, os, socket, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "def check(rc, what):\n"
    "    if rc != 0:\n"
    "        sys.exit(what + ': ' + os.strerror(ctypes.get_errno()))\n"
    "host, ns = sys.argv[1], sys.argv[2]\n"
    "fd = os.open('/run/netns/' + ns, os.O_RDONLY)\n"
    "check(libc.setns(fd, 0x40000000), 'setns(CLONE_NEWNET)')\n"
    "os.close(fd)\n"
    "check(libc.unshare(0x00020000 | 0x04000000), 'unshare(CLONE_NEWNS | CLONE_NEWUTS)')\n"
    # MS_REC | MS_PRIVATE: the bind mounts below stay in this process and its children
    "check(libc.mount(b'none', b'/', None, 0x4000 | 0x40000, None), 'mount --make-rprivate /')\n"
    "for name in ('hosts', 'resolv.conf'):\n"
    "    check(libc.mount(f'/etc/netns/{ns}/{name}'.encode(), f'/etc/{name}'.encode(), None, 0x1000, None),\n"
    "          'mount --bind /etc/' + name)\n"
    "socket.sethostname(host)\n"
    "os.execvpe(sys.argv[3], sys.argv[3:], os.environ)\n"
)


class NetnsUnavailable(RuntimeError):
    """This machine cannot host the namespaces (not Linux, not root, no `ip`, or the kernel refuses)."""


def why_unavailable() -> Optional[str]:
    if sys.platform != "linux":
        return f"network namespaces need Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stdout.strip()}")
    return proc


def _netns_names() -> List[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _netns_pids(ns: str) -> List[int]:
    return [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split() if p.isdigit()]


def _kill_netns_processes(ns: str, timeout: float = 10) -> None:
    """SIGKILL every process in the namespace until none is left (one may fork while we kill)."""
    deadline = time.monotonic() + timeout
    while True:
        pids = [p for p in _netns_pids(ns) if p != os.getpid()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} in network namespace {ns} survive SIGKILL")
        time.sleep(0.05)


def _delete_netns(ns: str) -> None:
    _kill_netns_processes(ns)
    _ip("netns", "delete", ns, check=False)
    shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)


def clean_leftovers() -> List[str]:
    """Delete the namespaces (and their processes) of clusters whose creating process is gone."""
    removed = []
    for ns in _netns_names():
        if not ns.startswith(PREFIX):
            continue
        tag = ns[len(PREFIX):].split("-", 1)[0]
        owner = STATE_DIR / f"{tag}.pid"
        try:
            if pid_alive(int(owner.read_text())):
                continue  # another cluster, still in use
        except (OSError, ValueError):
            pass
        _delete_netns(ns)
        removed.append(ns)
    for owner in STATE_DIR.glob("*.pid") if STATE_DIR.is_dir() else []:
        tag = owner.stem
        if not any(ns.startswith(f"{PREFIX}{tag}-") for ns in _netns_names()):
            owner.unlink(missing_ok=True)
    return removed


def _machine_networks() -> List[ipaddress.IPv4Network]:
    """The networks of the machine's own addresses and routes (every routing table)."""
    nets = []
    for line in _ip("-4", "-o", "addr", "show", check=False).stdout.splitlines():
        parts = line.split()
        if "inet" in parts:
            nets.append(ipaddress.ip_network(parts[parts.index("inet") + 1], strict=False))
    route_types = ("unicast", "local", "broadcast", "multicast", "unreachable", "blackhole", "prohibit", "throw")
    for line in _ip("-4", "route", "show", "table", "all", check=False).stdout.splitlines():
        parts = line.split()
        if parts and parts[0] in route_types:
            parts = parts[1:]
        if not parts or parts[0] == "default":
            continue
        try:
            nets.append(ipaddress.ip_network(parts[0], strict=False))
        except ValueError:
            continue
    return nets


def free_subnet() -> ipaddress.IPv4Network:
    """The first of SUBNETS that overlaps no address or route of the machine itself."""
    used = _machine_networks()
    for candidate in map(ipaddress.ip_network, SUBNETS):
        if not any(candidate.overlaps(n) for n in used):
            return candidate
    raise NetnsUnavailable(f"every candidate subnet {SUBNETS} overlaps this machine's networks {used}")


class NetnsCluster:
    """Hosts as network namespaces on one bridge; see the module docstring."""

    def __init__(self, hosts: Sequence[str] = ("node1", "node2"), subnet: Optional[str] = None) -> None:
        reason = why_unavailable()
        if reason:
            raise NetnsUnavailable(reason)
        if len(set(hosts)) != len(hosts) or not hosts:
            raise ValueError(f"host names must be distinct: {hosts}")
        self.hosts = list(hosts)
        self.tag = secrets.token_hex(3)
        self._processes: Dict[str, List[subprocess.Popen]] = {h: [] for h in self.hosts}
        self._closed = False
        clean_leftovers()
        self.subnet = ipaddress.ip_network(subnet) if subnet else free_subnet()
        addrs = list(self.subnet.hosts())
        self._address = {h: str(addrs[i]) for i, h in enumerate(self.hosts)}
        self._netns = {h: f"{PREFIX}{self.tag}-{i}" for i, h in enumerate(self.hosts)}
        self._switch = f"{PREFIX}{self.tag}-sw"
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        (STATE_DIR / f"{self.tag}.pid").write_text(str(os.getpid()))
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # --- setup and teardown ---------------------------------------------------------------------

    def _build(self) -> None:
        sw = self._switch
        made = _ip("netns", "add", sw, check=False)
        if made.returncode != 0:
            raise NetnsUnavailable(f"cannot create a network namespace: {made.stdout.strip()}")
        _ip("-n", sw, "link", "set", "lo", "up")
        _ip("-n", sw, "link", "add", "br0", "type", "bridge")
        _ip("-n", sw, "link", "set", "br0", "up")
        hosts_file = "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n" + "".join(
            f"{self._address[h]} {h}\n" for h in self.hosts)
        for i, host in enumerate(self.hosts):
            ns = self._netns[host]
            _ip("netns", "add", ns)
            # The host's end is eth0 in its namespace, the other end port<i> on the bridge.
            _ip("-n", sw, "link", "add", f"port{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", sw, "link", "set", f"port{i}", "master", "br0")
            _ip("-n", sw, "link", "set", f"port{i}", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{self._address[host]}/{self.subnet.prefixlen}", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            etc = NETNS_ETC / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(hosts_file)
            (etc / "hostname").write_text(host + "\n")
            # No name server: names come from the hosts file alone; any other lookup fails at
            # once (on the host's own loopback) instead of trying the machine's name servers.
            (etc / "resolv.conf").write_text("options attempts:1 timeout:1\n")

    def close(self) -> None:
        """Kill every process on every host and delete the namespaces and links; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        errors = []
        for host in self.hosts:
            try:
                self.kill_host(host)
            except Exception as e:  # keep on removing the rest
                errors.append(e)
        for ns in [*getattr(self, "_netns", {}).values(), getattr(self, "_switch", None)]:
            if ns:
                try:
                    _delete_netns(ns)
                except Exception as e:
                    errors.append(e)
        (STATE_DIR / f"{self.tag}.pid").unlink(missing_ok=True)
        if errors:
            raise errors[0]

    def __enter__(self) -> "NetnsCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the API the tests use --------------------------------------------------------------------

    def address(self, host: str) -> str:
        return self._address[host]

    def netns(self, host: str) -> str:
        """The network namespace's name (for `ip -n`)."""
        return self._netns[host]

    def interface(self, host: str) -> str:
        """The host's network interface, as GLOO_SOCKET_IFNAME would name it."""
        return "eth0"

    def run(self, host: str, argv: Sequence[str], env: Optional[Mapping[str, str]] = None,
            **popen_kwargs) -> subprocess.Popen:
        """Start `argv` on `host` (its network, its hostname, its /etc/hosts). The process gets a
        session of its own unless start_new_session=False is passed, so that kill_host and close
        can signal its whole process group."""
        if self._closed:
            raise RuntimeError("the cluster is closed")
        popen_kwargs.setdefault("start_new_session", True)
        cmd = [sys.executable, "-c", _ENTER, host, self._netns[host], *argv]
        proc = subprocess.Popen(cmd, env=dict(env) if env is not None else None, **popen_kwargs)
        self._processes[host].append(proc)
        return proc

    def pids(self, host: str) -> List[int]:
        """Every process now on `host`: those run() started and their descendants."""
        return _netns_pids(self._netns[host])

    def kill_host(self, host: str) -> None:
        """SIGKILL to every process on `host`: the process groups run() started, then anything
        else still in its network namespace; returns when they are gone."""
        for proc in self._processes[host]:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    proc.kill()
        _kill_netns_processes(self._netns[host])
        for proc in self._processes[host]:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass

    def traffic(self, host: str) -> Dict[str, int]:
        """Bytes `host` has sent to ("tx") and received from ("rx") the other hosts so far."""
        stats = json.loads(_ip("-n", self._netns[host], "-j", "-s", "link", "show", "eth0").stdout)[0]["stats64"]
        return {"rx": stats["rx"]["bytes"], "tx": stats["tx"]["bytes"]}

    def cut(self, host: str) -> None:
        """Take `host`'s link to the bridge down, as an unplugged cable: nothing gets through
        either way; connections stay open on both sides until they time out."""
        _ip("-n", self._switch, "link", "set", f"port{self.hosts.index(host)}", "down")

    def restore(self, host: str) -> None:
        _ip("-n", self._switch, "link", "set", f"port{self.hosts.index(host)}", "up")
