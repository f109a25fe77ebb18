"""The simulated cluster of tests/netns_cluster.py: hosts with their own addresses and hostnames,
names that resolve alike on every host, links that can be cut, hosts that can be killed, and
nothing left behind."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

import netns_cluster as nc
from netns_cluster import NetnsCluster

# Prints what a process on a host sees of itself and of the other hosts.
WHOAMI = """
import json, socket, sys
print(json.dumps({"hostname": socket.gethostname(), "fqdn": socket.getfqdn(),
                  "resolved": {h: socket.gethostbyname(h) for h in sys.argv[1:]}}))
"""

# A TCP server on the host's address: accepts one connection and echoes one line back.
ECHO_SERVER = """
import socket, sys
s = socket.create_server(("", int(sys.argv[1])))
print("listening", flush=True)
c, _ = s.accept()
c.sendall(c.recv(100))
"""

CONNECT = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as c:
    c.sendall(b"hello")
    print(c.recv(100).decode())
"""


def _output(cluster, host, code, *args, timeout=20):
    p = cluster.run(host, [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    text=True)
    out, _ = p.communicate(timeout=timeout)
    return p.returncode, out


def test_three_hosts_see_their_own_names_and_each_other(make_netns_cluster):
    hosts = ["alpha", "beta", "gamma"]
    cluster = make_netns_cluster(hosts)
    assert len({cluster.address(h) for h in hosts}) == 3
    for host in hosts:
        rc, out = _output(cluster, host, WHOAMI, *hosts)
        assert rc == 0, out
        seen = json.loads(out)
        assert seen["hostname"] == host and seen["fqdn"] == host
        # every name resolves to that host's bridge address, never to a loopback address
        assert seen["resolved"] == {h: cluster.address(h) for h in hosts}
        rc, out = _output(cluster, host, "import socket; socket.gethostbyname('not-a-host')")
        assert rc != 0 and "gaierror" in out  # at once, from the hosts file: no name server to ask
    rc, out = _output(cluster, "alpha", "import socket; print(socket.gethostname())")
    assert out.strip() == "alpha"
    assert socket.gethostname() not in hosts  # the machine's own name is untouched


def test_tcp_between_hosts_cut_and_restore(netns_cluster):
    c = netns_cluster
    server = c.run("node1", [sys.executable, "-c", ECHO_SERVER, "5000"], stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "listening"
    # The machine itself has no address or route in the cluster's subnet: the hosts live on a bridge of their own.
    assert not any(c.subnet.overlaps(n) for n in nc._machine_networks())
    c.cut("node2")
    t0 = time.monotonic()
    rc, out = _output(c, "node2", CONNECT, "node1", "5000", "1")
    assert rc != 0 and ("timed out" in out or "unreachable" in out), out
    assert time.monotonic() - t0 < 10
    c.restore("node2")
    before = c.traffic("node2")
    rc, out = _output(c, "node2", CONNECT, "node1", "5000", "10")
    assert rc == 0 and out.strip() == "hello", out
    after = c.traffic("node2")
    assert after["tx"] > before["tx"] and after["rx"] > before["rx"]
    server.wait(10)


def test_kill_host_kills_every_process_on_it(netns_cluster):
    c = netns_cluster
    # a parent and a child in a session of its own, so that only the namespace finds the child
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'],"
            " start_new_session=True); time.sleep(600)")
    parent = c.run("node2", [sys.executable, "-c", code])
    survivor = c.run("node1", [sys.executable, "-c", "import time; time.sleep(600)"])
    deadline = time.monotonic() + 10
    while len(c.pids("node2")) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = c.pids("node2")
    assert len(pids) == 2 and parent.pid in pids
    c.kill_host("node2")
    assert parent.poll() == -9 and c.pids("node2") == []
    assert not any(os.path.exists(f"/proc/{p}") and _state(p) != "Z" for p in pids)
    assert survivor.poll() is None and c.pids("node1") == [survivor.pid]


def _state(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_close_removes_everything_and_leftovers_of_a_dead_owner_are_cleaned():
    if nc.why_unavailable():
        pytest.skip(nc.why_unavailable())
    try:
        cluster = NetnsCluster(["node1", "node2"])
    except nc.NetnsUnavailable as e:
        pytest.skip(str(e))
    sleeper = cluster.run("node1", [sys.executable, "-c", "import time; time.sleep(600)"])
    names = [cluster.netns("node1"), cluster.netns("node2"), cluster._switch]
    cluster.close()
    assert sleeper.poll() is not None
    assert not set(names) & set(nc._netns_names())
    assert not any((nc.NETNS_ETC / n).exists() for n in names)

    # A cluster whose creator died (SIGKILL: no teardown) is removed by the next one.
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from netns_cluster import NetnsCluster; "
            "c = NetnsCluster(['node1', 'node2']); print(c.tag, flush=True); "
            "c.run('node1', [sys.executable, '-c', 'import time; time.sleep(600)']); time.sleep(600)")
    owner = subprocess.Popen([sys.executable, "-c", code, os.path.dirname(__file__)], stdout=subprocess.PIPE,
                             text=True)
    tag = owner.stdout.readline().strip()
    leftovers = [n for n in nc._netns_names() if n.startswith(f"{nc.PREFIX}{tag}-")]
    assert len(leftovers) == 3
    owner.kill()
    owner.wait()
    removed = nc.clean_leftovers()
    assert sorted(removed) == sorted(leftovers)
    assert not any(n.startswith(f"{nc.PREFIX}{tag}-") for n in nc._netns_names())
    assert not (nc.STATE_DIR / f"{tag}.pid").exists()
