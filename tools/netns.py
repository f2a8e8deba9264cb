"""Limited links between the local cluster's nodes: network namespaces, a bridge, tc.

``Network`` gives every node a network namespace of its own, linked to a
switch (a namespace holding a Linux bridge) by a veth pair. Each node's link
is limited by tc to the same rate in both directions: a tbf qdisc on the
node's end (its uplink) and one on the switch's end (its downlink). The
addresses (10.x.y.11, .12, ...; x and y drawn per network) exist only inside
these namespaces, and nothing is added to the root namespace: every name is
drawn per network (concurrent runs never meet), and interface names live in
the network's own namespaces (``eth0`` in a node, ``node<i>`` on the switch).

RabbitMQ stays in the root namespace, on 127.0.0.1. A node reaches it through
two forwarders: one inside the node's namespace listens on the broker's
address there and connects to a Unix socket in the network's directory (a
socket file is not bound to a network namespace), where the other, in the
root namespace, listens and connects to the broker. They pass bytes both ways
(heartbeats too) and close both sides of a connection when either side closes
(tools/forwarder.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import uuid

from tools.lifecycle import Started

# Linux limits a Unix socket's path (sun_path) to 108 bytes, its NUL included.
FORWARDER = pathlib.Path(__file__).resolve().with_name("forwarder.py")
UNIX_PATH_MAX = 107
NODE_LINK = "eth0"
BRIDGE = "br0"


def tbf(mbit: int) -> list:
    """tc arguments of a tbf limiting a link to ``mbit`` Mbit/s.

    The bucket holds 2 ms at the rate, at least 64 KiB: veth passes TCP's
    segments of up to 64 KiB whole (GSO), and a smaller bucket makes tbf cut
    them up and TCP lose some; with it a single TCP flow reaches ~95 % of the
    rate at 10, 100 and 1000 Mbit/s. The queue holds 50 ms at the rate, at
    least four buckets: room for a window's burst, too short to make the
    limit a long delay for the other flows.
    """
    rate = mbit * 1_000_000 // 8  # bytes per second
    burst = max(64 * 1024, rate // 500)
    limit = max(4 * burst, rate // 20)
    return ["tbf", "rate", f"{mbit}mbit", "burst", str(burst), "limit", str(limit)]


class Network(Started):
    """``size`` nodes, each on a link of ``link_mbit`` Mbit/s to one switch.

    ``base``: a directory for the broker's Unix sockets. ``ports``: the TCP
    ports on 127.0.0.1 (RabbitMQ's) the nodes reach as if they were local.
    Nodes are numbered from 1.
    """

    def __init__(self, base, size, link_mbit, ports=(5672,)):
        if int(link_mbit) <= 0:
            raise ValueError(f"link_mbit must be a positive number, not {link_mbit!r}")
        self.base = pathlib.Path(base)
        self.size = size
        self.link_mbit = int(link_mbit)
        self.ports = list(ports)
        tag = uuid.uuid4().hex[:8]
        self.switch = f"gis{tag}sw"
        self.namespaces = [f"gis{tag}n{index}" for index in range(1, size + 1)]
        self.prefix = f"10.{random.randrange(0, 256)}.{random.randrange(0, 256)}"
        self.forwarders = []
        self._created = []
        for port in self.ports:
            if len(str(self._socket(port))) > UNIX_PATH_MAX:
                raise ValueError(f"{self._socket(port)}: too long for a Unix socket")

    def address(self, index) -> str:
        return f"{self.prefix}.{10 + index}"

    def namespace(self, index) -> str:
        return self.namespaces[index - 1]

    def _socket(self, port) -> pathlib.Path:
        return self.base / f"broker-{port}.sock"

    # -- start and stop ------------------------------------------------------

    def start(self):
        if os.geteuid() != 0:
            raise RuntimeError("network namespaces need root")
        self.base.mkdir(parents=True, exist_ok=True)
        self._add_namespace(self.switch)
        _ip(self.switch, "link", "add", BRIDGE, "type", "bridge")
        _ip(self.switch, "link", "set", BRIDGE, "up")
        for index, namespace in enumerate(self.namespaces, start=1):
            self._add_namespace(namespace)
            port = f"node{index}"
            _ip(self.switch, "link", "add", port, "type", "veth", "peer", "name", NODE_LINK,
                "netns", namespace)
            _ip(self.switch, "link", "set", port, "master", BRIDGE, "up")
            _tc(self.switch, "qdisc", "add", "dev", port, "root", *tbf(self.link_mbit))
            _ip(namespace, "link", "set", "lo", "up")
            _ip(namespace, "address", "add", f"{self.address(index)}/24", "dev", NODE_LINK)
            _ip(namespace, "link", "set", NODE_LINK, "up")
            _tc(namespace, "qdisc", "add", "dev", NODE_LINK, "root", *tbf(self.link_mbit))
        self.forwarders.append(_forwarder(
            None, [f"unix:{self._socket(p)}=tcp:127.0.0.1:{p}" for p in self.ports]))
        for namespace in self.namespaces:
            self.forwarders.append(_forwarder(
                namespace, [f"tcp:127.0.0.1:{p}=unix:{self._socket(p)}" for p in self.ports]))
        return self

    def _add_namespace(self, name):
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True,
                       timeout=30)
        self._created.append(name)

    def stop(self):
        """Forwarders, namespaces (with their links); whatever of them was started."""
        for forwarder in self.forwarders:
            _terminate(forwarder)
        self.forwarders = []
        for name in reversed(self._created):
            # A process still in the namespace (a session a killed daemon left) keeps it
            # alive after `ip netns delete`: every process in it was started by us.
            for pid in self.pids(name):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=30)
        self._created = []
        for port in self.ports:
            with contextlib.suppress(FileNotFoundError):
                self._socket(port).unlink()

    # -- what the links did ----------------------------------------------------

    def counters(self, index) -> dict:
        """The byte and packet counters of node ``index``'s end of its link."""
        out = _ip(self.namespace(index), "-s", "-j", "link", "show", "dev", NODE_LINK)
        return json.loads(out)[0]["stats64"]

    def sent_bytes(self, index) -> int:
        return self.counters(index)["tx"]["bytes"]

    def received_bytes(self, index) -> int:
        return self.counters(index)["rx"]["bytes"]

    def qdiscs(self, namespace) -> list:
        """``tc -j qdisc show`` in that namespace, parsed."""
        return json.loads(_tc(namespace, "-j", "qdisc", "show"))

    def pids(self, namespace) -> list:
        """The processes in that namespace."""
        return [int(pid) for pid in subprocess.run(
            ["ip", "netns", "pids", namespace], capture_output=True, text=True,
            timeout=30).stdout.split()]

    def existing(self) -> list:
        """Which of this network's namespaces exist now."""
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                check=True, timeout=30).stdout
        present = {line.split()[0] for line in listed.splitlines() if line.strip()}
        return [name for name in (self.switch, *self.namespaces) if name in present]


def _ip(namespace, *args) -> str:
    return _run(["ip", "-n", namespace, *args])


def _tc(namespace, *args) -> str:
    return _run(["tc", "-n", namespace, *args])


def _run(argv) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip()}")
    return result.stdout


def _forwarder(namespace, pairs) -> subprocess.Popen:
    """The forwarder, in ``namespace`` (None: the root one); returns once it listens."""
    argv = [sys.executable, "-I", str(FORWARDER), *pairs]
    if namespace is not None:
        argv = ["ip", "netns", "exec", namespace, *argv]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    if process.stdout.readline().strip() != "ready":
        _terminate(process)
        raise RuntimeError(f"the forwarder {' '.join(pairs)} in {namespace or 'the root'} "
                           "namespace did not start")
    process.stdout.close()
    return process


def _terminate(process, timeout=10):
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
