"""A clustered broker as clouds run it: three RabbitMQ nodes of the test's own
(tools/rabbitnodes.py, joined with rabbitmqctl join_cluster), every node in
transport_url, rabbit_quorum_queue = true on both sides (Glance's side is
oslo.messaging's Notifier, configured the same).

While a burst of uploads flows, the broker node the daemons are connected to
is stopped: every daemon connects to another node within 10 s and goes on;
nothing is lost, no image is written twice; the node comes back and rejoins.
Then the same for one-shot runs, with the node stopped in the middle of them.
"""

import datetime
import os
import re
import subprocess
import threading

import pytest

from tests.test_faults import assert_converges, md5s, new_images
from tools.localcluster import LocalCluster, wait_for
from tools.rabbitnodes import RabbitNodes

pytestmark = pytest.mark.cluster
RECONNECT_WITHIN = 10.0
CONNECTED = re.compile(r"^(\S+ \S+) \d+ INFO \S+ \[-\] (fan-out|sync): connected to "
                       r"amqp://guest:\*\*\*\*@127\.0\.0\.1:(\d+)/", re.MULTILINE)


@pytest.fixture(scope="module")
def brokers():
    if os.geteuid() != 0:
        pytest.skip("the local cluster and RabbitMQ nodes of the test's own need root")
    with RabbitNodes(3) as nodes:
        yield nodes


@pytest.fixture
def quorum_cluster(brokers):
    # 4 MiB/s per transfer: transfers are under way whenever a node is stopped.
    with LocalCluster(brokers=brokers, durable=True, extra_config={"rsync_bwlimit": 4096},
                      rabbit_options={"rabbit_quorum_queue": True}) as cluster:
        yield cluster


def connections(node, since=None):
    """[(when, loop, broker port)] of each 'connected to' line in node's log."""
    found = []
    for stamp, loop, port in CONNECTED.findall(node.log_since()):
        when = datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f")
        if since is None or when >= since:
            found.append((when, loop, int(port)))
    return found


def current_broker_ports(cluster):
    """{port of the broker node each daemon's loops are connected to now}."""
    ports = set()
    for node in cluster.nodes:
        latest = {}
        for _, loop, port in connections(node):
            latest[loop] = port
        ports |= set(latest.values())
    return ports


def stop_the_connected_broker_and_wait_for_reconnects(brokers, cluster):
    """Stop the broker node every daemon is connected to; return the seconds each loop of
    each daemon took to connect to another node."""
    ports = current_broker_ports(cluster)
    assert len(ports) == 1, ports  # every loop starts with the first broker in transport_url
    victim = next(node for node in brokers.nodes if node.port in ports)
    stopped_at = datetime.datetime.now()
    victim.stop()
    wanted = {(node.name, loop) for node in cluster.nodes for loop in ("fan-out", "sync")}

    def reconnected():
        found = {}
        for node in cluster.nodes:
            for when, loop, port in connections(node, since=stopped_at):
                if port != victim.port:
                    found.setdefault((node.name, loop), (when - stopped_at).total_seconds())
        return found if set(found) == wanted else None

    took = wait_for(reconnected, 30, interval=0.2, what="every daemon to reconnect")
    return victim, took


def bring_back(brokers, victim):
    victim.start()
    victim.wait_started()
    brokers.wait_running(brokers.nodes)  # rejoined the cluster


def test_a_node_of_the_cluster_stopped_during_a_burst_of_50_uploads_loses_nothing(
        brokers, quorum_cluster):
    cluster = quorum_cluster
    for node in cluster.nodes:
        node.start_daemon()
    images = new_images(cluster, 50, 1024 * 1024)
    published, faults, failures, comebacks = [], [], [], []

    def publish_all():
        """The burst; at the 15th and the 35th upload, the daemons' broker node stops
        (and comes back while the burst goes on)."""
        try:
            for image_id, (md5, size) in images.items():
                if len(published) in (15, 35):
                    for comeback in comebacks:
                        comeback.join(120)
                    victim, took = stop_the_connected_broker_and_wait_for_reconnects(
                        brokers, cluster)
                    faults.append((victim.name, len(published), took))
                    comebacks.append(threading.Thread(target=bring_back,
                                                      args=(brokers, victim)))
                    comebacks[-1].start()
                cluster.upload(image_id, md5, size)
                published.append(image_id)
        except BaseException as exc:  # noqa: BLE001 - reported by the test's thread
            failures.append(exc)

    cluster.notifier("node1")  # on this thread, see LocalCluster.notifier
    publisher = threading.Thread(target=publish_all)
    publisher.start()
    publisher.join(300)
    for comeback in comebacks:
        comeback.join(120)
    assert not failures, failures
    assert not publisher.is_alive() and len(published) == 50
    assert_converges(cluster, md5s(images), timeout=180)
    for name, at, took in faults:  # shown with -s: the figures of a fault run
        print(f"fault: broker node {name} stopped after {at} of 50 uploads; the 6 loops "
              f"reconnected in {min(took.values()):.2f}-{max(took.values()):.2f} s")
    assert len(faults) == 2
    for _, _, took in faults:
        assert max(took.values()) < RECONNECT_WITHIN, took
    assert len(brokers.running_nodes()) == 3
    for node in cluster.nodes:
        assert node.daemon.poll() is None
        log = node.log.read_text()
        assert "Traceback" not in log
        for image_id in images:  # every image written once on each node that fetched it
            assert log.count(f"image {image_id}: installed and verified on") <= 1, node.name
        if node.name != "node1":
            assert sum(log.count(f"image {i}: installed and verified on") for i in images) == 50
        # Every line about a lost connection names the broker, password hidden.
        lost = [line for line in log.splitlines() if "reconnecting in" in line]
        assert lost and all("amqp://guest:****@127.0.0.1:" in line for line in lost), lost
    queues = brokers.ctl("list_queues", "-p", cluster.vhost, "name", "type").stdout
    types = dict(line.split() for line in queues.splitlines() if len(line.split()) == 2)
    assert types["glance_notifications.info"] == "quorum"
    assert all(kind == "quorum" for name, kind in types.items()
               if name.startswith("glance_image_sync.")), types


def test_one_shot_runs_go_on_when_the_broker_node_they_use_stops(brokers, quorum_cluster):
    cluster = quorum_cluster
    for node in cluster.nodes:  # 2 MiB/s: the runs last a few seconds ([DEFAULT] is last)
        node.config.write_text(node.config.read_text() + "rsync_bwlimit = 2048\n")
    images = new_images(cluster, 10, 1024 * 1024)
    for image_id, (md5, size) in images.items():
        cluster.upload(image_id, md5, size)
    assert cluster["node1"].run("duplicate-notifications").returncode == 0
    runs = {name: cluster[name].spawn("sync-images", stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE)
            for name in ("node2", "node3")}
    wait_for(lambda: all(connections(cluster[name]) for name in runs), 30,
             what="both runs to connect")
    wait_for(lambda: all(cluster[name].temporaries() for name in runs), 30,
             what="transfers under way")
    ports = {port for name in runs for _, _, port in connections(cluster[name])}
    victim = next(node for node in brokers.nodes if node.port in ports)
    victim.stop()
    try:
        codes = {name: run.wait(180) for name, run in runs.items()}
    finally:
        victim.start()
        victim.wait_started()
        brokers.wait_running(brokers.nodes)
    assert codes == {"node2": 0, "node3": 0}, {n: cluster[n].log.read_text()[-3000:]
                                                for n in runs}
    assert_converges(cluster, md5s(images), timeout=60)
    for name in runs:
        log = cluster[name].log.read_text()
        assert f"connection to amqp://guest:****@127.0.0.1:{victim.port}/" in log
        assert any(port != victim.port for _, _, port in connections(cluster[name]))
        for image_id in images:
            assert log.count(f"image {image_id}: installed and verified on") == 1
