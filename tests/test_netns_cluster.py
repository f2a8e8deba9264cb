"""The local cluster on limited links (LocalCluster(link_mbit=...), tools/netns.py): each
node in a network namespace of its own, on a link limited both ways, reaching RabbitMQ
through forwarders; and nothing of it left once the cluster stops."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import pytest

from tools import netns
from tools.localcluster import LocalCluster, broker_running, wait_for

LINK_MBIT = 100
RATE = LINK_MBIT * 1_000_000 // 8  # bytes per second, as tc -j reports it
FORWARDER_PY = str(netns.FORWARDER)


def tbf_rates(qdiscs) -> dict:
    return {q["dev"]: q["options"]["rate"] for q in qdiscs if q["kind"] == "tbf"}


def processes_naming(text) -> list:
    """(pid, command line) of every process whose command line contains ``text``."""
    found = []
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:  # gone meanwhile
                continue
            if text in cmdline:
                found.append((int(entry.name), cmdline))
    return found


def root_addresses() -> list:
    out = subprocess.run(["ip", "-j", "address", "show"], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    return [a["local"] for link in json.loads(out) for a in link.get("addr_info", [])]


@pytest.mark.cluster
@pytest.mark.cluster_setup(link_mbit=LINK_MBIT)
def test_each_link_is_limited_both_ways_and_the_root_namespace_is_untouched(cluster):
    network = cluster.network
    for node in cluster.nodes:
        assert node.netns in network.existing()
        # Its uplink: the node's end of the veth pair.
        assert tbf_rates(network.qdiscs(node.netns)) == {"eth0": RATE}
    # Their downlinks: the switch's ends.
    assert tbf_rates(network.qdiscs(network.switch)) == {
        f"node{node.index}": RATE for node in cluster.nodes}
    addresses = root_addresses()
    assert not [a for a in addresses if a.startswith(network.prefix + ".")]
    assert not any(node.address in addresses for node in cluster.nodes)


@pytest.mark.cluster
@pytest.mark.cluster_setup(link_mbit=LINK_MBIT)
def test_an_upload_replicates_across_the_links(cluster):
    node1, node2, node3 = cluster.nodes
    for node in cluster.nodes:
        node.start_daemon()  # each consuming through its namespace's broker forwarder
    sent = node1.sent_bytes()
    received = {node.name: node.received_bytes() for node in (node2, node3)}
    image_id, md5, size = cluster.new_image("node1", size=4 * 1024 * 1024)
    cluster.upload(image_id, md5, size)
    wait_for(lambda: node2.has(image_id, md5) and node3.has(image_id, md5), 120,
             interval=0.2, what="the image on node2 and node3")
    for node in (node2, node3):
        assert f"image {image_id}: installed and verified on {node.name}" in \
            node.log.read_text()
        assert node.received_bytes() - received[node.name] >= size
    assert node1.sent_bytes() - sent >= size


def _skip_without_root():
    if not broker_running():
        pytest.fail("RabbitMQ is not running on 127.0.0.1:5672 (rabbitmq-server -detached)")
    if os.geteuid() != 0:
        pytest.skip("the local cluster needs root")


@pytest.mark.cluster
def test_stop_leaves_no_namespace_and_no_forwarder():
    _skip_without_root()
    cluster = LocalCluster(size=2, link_mbit=LINK_MBIT)
    with cluster:
        names = cluster.network.existing()
        assert len(names) == 3  # the switch and two nodes
        forwarders = processes_naming(FORWARDER_PY)
        assert len([cmd for _, cmd in forwarders if str(cluster.base) in cmd]) == 3
        # Each node's holder, sshd and forwarder.
        inside = [pid for name in names for pid in cluster.network.pids(name)]
        assert len(inside) >= 6
    assert cluster.network.existing() == []
    assert processes_naming(str(cluster.base)) == []
    assert [pid for pid in inside if pathlib.Path(f"/proc/{pid}").exists()] == []


@pytest.mark.cluster
def test_a_start_that_fails_half_way_leaves_nothing_behind():
    _skip_without_root()
    cluster = LocalCluster(size=3, link_mbit=LINK_MBIT)

    def sshd_fails():
        raise RuntimeError("node2's sshd does not start")

    cluster.nodes[1].start_sshd = sshd_fails
    with pytest.raises(RuntimeError, match="node2's sshd"), cluster:
        pass
    assert cluster.network.existing() == []
    assert processes_naming(str(cluster.base)) == []


@pytest.fixture
def echo_server():
    """A TCP server on 127.0.0.1 that echoes one connection, then closes it."""
    server = socket.create_server(("127.0.0.1", 0))
    yield server
    server.close()


def test_the_forwarder_passes_bytes_both_ways_and_passes_on_a_close(tmp_path, echo_server):
    port = echo_server.getsockname()[1]
    path = tmp_path / "upstream.sock"
    forwarder = subprocess.Popen([sys.executable, "-I", FORWARDER_PY,
                                  f"unix:{path}=tcp:127.0.0.1:{port}"],
                                 stdout=subprocess.PIPE, text=True)
    try:
        assert forwarder.stdout.readline() == "ready\n"
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(10)
            client.connect(str(path))
            served, _ = echo_server.accept()
            served.settimeout(10)
            client.sendall(b"\x08\x00\x00\x00\x00\x00\x00\xce")  # an AMQP heartbeat frame
            assert served.recv(100) == b"\x08\x00\x00\x00\x00\x00\x00\xce"
            served.sendall(b"pong")
            assert client.recv(100) == b"pong"
            served.close()  # the broker's side closes: so does the client's
            assert client.recv(100) == b""
        # The other way round: the client closes, the upstream connection ends.
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))
            served, _ = echo_server.accept()
            served.settimeout(10)
            client.sendall(b"last words")
            client.close()
            received = b""
            while chunk := served.recv(100):
                received += chunk
            assert received == b"last words"
            served.close()
    finally:
        forwarder.terminate()
        try:
            returncode = forwarder.wait(10)
        except subprocess.TimeoutExpired:
            forwarder.kill()
            returncode = forwarder.wait()
        forwarder.stdout.close()
    assert returncode == -signal.SIGTERM  # it ends on SIGTERM, as Network.stop expects
