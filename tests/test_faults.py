"""Fault injection on the real cluster: never lose an event, never corrupt an image.

Each scenario runs real daemons (or cron runs), injects a real fault (the
broker restarted, daemons SIGKILLed, an sshd stopped, a corrupted source, a
full disk, a node down for a while, a consumer_timeout shorter than a
transfer) and ends by checking every node's store against the truth: which
images exist, with which md5, and no temporary file left anywhere.
"""

import json
import random
import re
import threading

import pytest

from glance_image_sync.broker import topology
from tools.localcluster import rabbitmqctl, wait_for

pytestmark = pytest.mark.cluster

MiB = 1024 * 1024


def converged(cluster, truth, nodes=None):
    """True once every node holds exactly ``truth`` ({image id: md5})."""
    return all(node.contents() == truth and not node.temporaries()
               for node in nodes or cluster.nodes)


def assert_converges(cluster, truth, timeout=120, nodes=None):
    try:
        wait_for(lambda: converged(cluster, truth, nodes), timeout, interval=0.25,
                 what="every store to match the truth")
    except TimeoutError:
        details = {node.name: (sorted(set(node.contents()) ^ set(truth)), node.temporaries())
                   for node in nodes or cluster.nodes}
        raise AssertionError(f"stores differ from the truth (symmetric difference, "
                             f"temporaries): {details}") from None


def new_images(cluster, count, size, node="node1"):
    truth = {}
    for _ in range(count):
        image_id, md5, real_size = cluster.new_image(node, size=size)
        truth[image_id] = (md5, real_size)
    return truth


def md5s(images):
    return {image_id: md5 for image_id, (md5, _) in images.items()}


@pytest.mark.own_broker  # it restarts RabbitMQ
@pytest.mark.cluster_setup(durable=True)
def test_a_broker_restart_during_a_burst_of_50_uploads_loses_nothing(cluster):
    for node in cluster.nodes:
        node.start_daemon()
    images = new_images(cluster, 50, 256 * 1024)
    published = []

    def publish_all():
        for image_id, (md5, size) in images.items():
            cluster.upload(image_id, md5, size)
            published.append(image_id)

    cluster.notifier("node1")  # on this thread, see LocalCluster.notifier
    publisher = threading.Thread(target=publish_all)
    publisher.start()
    wait_for(lambda: len(published) >= 15, 60, what="the burst to be under way")
    cluster.brokers[0].restart()
    publisher.join(180)
    assert not publisher.is_alive() and len(published) == 50
    assert_converges(cluster, md5s(images), timeout=180)
    for node in cluster.nodes:
        assert node.daemon.poll() is None
        assert "reconnecting in" in node.log.read_text()


@pytest.mark.cluster_config(rsync_bwlimit=10 * 1024)  # 10 MiB/s: kills land mid-transfer
def test_sigkill_of_daemons_at_random_moments_during_transfers(cluster):
    rng = random.Random(20261126)
    for node in cluster.nodes:
        node.start_daemon()
    images = new_images(cluster, 48, 2 * MiB)
    pending = list(images.items())
    deleted = set()
    kills = 0
    while pending:
        for image_id, (md5, size) in pending[:2]:
            cluster.upload(image_id, md5, size)
        pending = pending[2:]
        victim = cluster[rng.choice(["node2", "node3"])]
        threshold = rng.randrange(0, 2 * MiB)  # a random moment of a transfer

        def mid_transfer(victim=victim, threshold=threshold):
            for name in victim.temporaries():
                try:
                    if (victim.images / name).stat().st_size >= threshold:
                        return True
                except FileNotFoundError:
                    pass
            return False

        wait_for(mid_transfer, 30, interval=0.01, what=f"a transfer on {victim.name}")
        victim.stop_daemon(sig=9)
        kills += 1
        if kills % 6 == 0:  # deletes go through the same chaos
            image_id = rng.choice(sorted(set(images) - deleted - {i for i, _ in pending}))
            deleted.add(image_id)
            cluster["node1"].path(image_id).unlink()
            cluster.delete(image_id)
        victim.start_daemon()
    truth = {image_id: md5 for image_id, (md5, _) in images.items() if image_id not in deleted}
    assert_converges(cluster, truth, timeout=180)
    assert kills == 24
    cleaned = sum(node.log.read_text().count("by an interrupted transfer")
                  for node in cluster.nodes[1:])
    assert cleaned >= kills // 2, f"{cleaned} temporaries cleaned after {kills} kills"


# Without the relay, node3 asks the publisher first (tests/test_relay_cluster.py: with it).
@pytest.mark.cluster_config(relay="false")
def test_when_the_publisher_cannot_serve_the_file_another_peer_does(cluster):
    for node in cluster.nodes:
        node.start_daemon()
    data = b"already on node2 " * 50_000
    image_id, md5, size = cluster.new_image("node1", data=data)
    (cluster["node2"].images / image_id).write_bytes(data)
    cluster["node1"].stop_sshd()
    cluster.upload(image_id, md5, size)  # published by node1, whose sshd is down
    assert_converges(cluster, {image_id: md5}, timeout=60)
    log = cluster["node3"].log.read_text()
    assert f"image {image_id}: copy from node1 failed" in log
    assert f"image {image_id}: installed and verified on node3 (from node2)" in log

    # Glance's default publisher_id names no node: straight to the peers.
    other, other_md5, other_size = cluster.new_image("node3", size=MiB)
    cluster.upload(other, other_md5, other_size, publisher="localhost")
    assert_converges(cluster, {image_id: md5, other: other_md5},
                     nodes=[cluster["node2"], cluster["node3"]], timeout=60)
    assert f"image {other}: installed and verified on node2 (from node3)" in \
        cluster["node2"].log.read_text()


@pytest.mark.cluster_config(max_attempts=3)
def test_a_corrupted_source_is_never_installed_then_failed_replay_heals(cluster):
    for node in cluster.nodes:
        node.start_daemon()
    image_id, md5, size = cluster.new_image("node1", size=2 * MiB)
    good = cluster["node1"].path(image_id).read_bytes()
    cluster["node1"].path(image_id).write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    cluster.upload(image_id, md5, size)
    failed_queues = [topology.failed_queue_name(n.name) for n in cluster.nodes[1:]]
    wait_for(lambda: all(cluster.queue_depths().get(q) == 3 for q in failed_queues), 60,
             what="three events per node in the failed queues")
    for node in cluster.nodes[1:]:
        assert node.files() == [], node.name

    listing = cluster["node2"].run("failed", "list", "--format", "json")
    parked = json.loads(listing.stdout)
    assert [(p["image_id"], p["attempts"]) for p in parked] == [(image_id, 3)] * 3
    assert all(f"expected {md5}" in p["error"] for p in parked)
    assert cluster.queue_depths()[failed_queues[0]] == 3  # listing left them in place

    cluster["node1"].path(image_id).write_bytes(good)  # the operator restores the source
    for node in cluster.nodes[1:]:
        replay = node.run("failed", "replay", image_id)
        assert replay.returncode == 0 and replay.stdout.startswith("3 failed events"), replay
    assert_converges(cluster, {image_id: md5}, timeout=60)
    assert all(cluster.queue_depths()[q] == 0 for q in failed_queues)


@pytest.mark.cluster_setup(store_sizes={"node3": "24m"})
@pytest.mark.cluster_config(rsync_bwlimit=8 * 1024, retry_delays="1")
def test_a_full_disk_fails_cleanly_keeps_what_is_there_and_heals_when_space_returns(cluster):
    for node in cluster.nodes:
        node.start_daemon()
    node3 = cluster["node3"]
    first, first_md5, first_size = cluster.new_image("node1", size=14 * MiB)
    cluster.upload(first, first_md5, first_size)
    assert_converges(cluster, {first: first_md5}, timeout=60)

    # Two at once, each fitting alone: the second runs out of space on the
    # way (rsync's ENOSPC) or is refused up front.
    second = [cluster.new_image("node1", size=8 * MiB) for _ in range(2)]
    for image_id, md5, size in second:
        cluster.upload(image_id, md5, size)
    wait_for(lambda: "disk full" in node3.log.read_text(), 60, what="node3 to run out of space")
    assert node3.contents()[first] == first_md5  # what was there is untouched
    truth = {image_id: md5 for image_id, md5, _ in second}
    assert_converges(cluster, {first: first_md5, **truth}, timeout=60,
                     nodes=cluster.nodes[:2])
    assert not converged(cluster, {first: first_md5, **truth}, nodes=[node3])

    cluster["node1"].path(first).unlink()
    cluster.delete(first)  # space comes back; the retries get through
    assert_converges(cluster, truth, timeout=90)


def test_a_node_down_while_20_uploads_and_5_deletes_catches_up_when_back(cluster):
    node3 = cluster["node3"]
    for node in cluster.nodes[:2]:
        node.start_daemon()
    node3.stop_sshd()  # the node is down: no daemon, no sshd
    images = new_images(cluster, 20, 512 * 1024)
    for image_id, (md5, size) in images.items():
        cluster.upload(image_id, md5, size)
    deleted = sorted(images)[:5]
    for image_id in deleted:
        cluster["node1"].path(image_id).unlink()
        cluster.delete(image_id)
    truth = {image_id: md5 for image_id, (md5, _) in images.items() if image_id not in deleted}
    assert_converges(cluster, truth, nodes=cluster.nodes[:2], timeout=90)
    assert cluster.queue_depths()[topology.node_queue_name("node3")] == 20 * 3 + 5

    node3.start_sshd()
    node3.start_daemon()
    assert_converges(cluster, truth, timeout=120)


# RabbitMQ's consumer_timeout at 10 s, checked every second: a broker-wide setting.
@pytest.mark.own_broker(consumer_timeout=10_000, channel_tick_interval=1_000)
@pytest.mark.cluster_config(consumer_timeout=10, rsync_bwlimit=1024)  # 1 MiB/s
def test_a_transfer_longer_than_consumer_timeout_is_neither_lost_nor_restarted(cluster):
    for node in cluster.nodes:
        node.start_daemon()
    image_id, md5, size = cluster.new_image("node1", size=24 * MiB)  # about 24 s
    cluster.upload(image_id, md5, size)
    assert_converges(cluster, {image_id: md5}, timeout=90)
    for node in cluster.nodes[1:]:
        log = node.log.read_text()
        assert len(re.findall(f"image {image_id}: (?:fetching|streaming) from", log)) == 1, \
            node.name
        assert "re-queued so the broker keeps it" in log
        assert "PRECONDITION_FAILED" not in log and "reconnecting" not in log
    depths = cluster.queue_depths()
    assert all(depths[topology.node_queue_name(n.name)] == 0 for n in cluster.nodes)


@pytest.mark.cluster_setup(rabbit_options={"rabbit_quorum_queue": True})
def test_quorum_queues_when_configured(cluster):
    """rabbit_quorum_queue on both sides: Glance's notifier and every node."""
    assert "rabbit_quorum_queue = true" in cluster["node1"].config.read_text()
    image_id, md5, size = cluster.new_image("node1", size=MiB)
    cluster.upload(image_id, md5, size)  # Glance's notifier declares its queue first
    for node in cluster.nodes:
        assert node.run("both").returncode == 0
    assert_converges(cluster, {image_id: md5}, timeout=10)
    out = rabbitmqctl("list_queues", "-p", cluster.vhost, "name", "type", "durable").stdout
    types = {line.split()[0]: line.split()[1:] for line in out.splitlines()}
    ours = {name: kind for name, kind in types.items() if name.startswith(topology.PREFIX)}
    assert ours and all(kind == ["quorum", "true"] for kind in ours.values()), types
    assert types["glance_notifications.info"] == ["quorum", "true"]
    for node in cluster.nodes:
        assert "exists with other arguments" not in node.log.read_text()


# rsync sessions from the publisher (the relay would first ask node2, which has nothing).
@pytest.mark.cluster_config(relay="false")
def test_a_node_catching_up_shares_sessions_and_one_missing_file_fails_only_its_image(cluster):
    node1, node3 = cluster["node1"], cluster["node3"]
    node1.start_daemon()
    images = new_images(cluster, 12, 2 * MiB)
    for image_id, (md5, size) in images.items():
        cluster.upload(image_id, md5, size)
    lost = sorted(images)[5]
    wait_for(lambda: cluster.queue_depths()[topology.node_queue_name("node1")] == 0, 60,
             what="node1 to have seen every event")
    node1.path(lost).unlink()  # lost on the disk of the only node that had it

    node3.start_daemon()
    truth = {image_id: md5 for image_id, (md5, _) in images.items() if image_id != lost}
    assert_converges(cluster, truth, nodes=[node3], timeout=90)
    log = wait_for(lambda: (text := node3.log.read_text()).count(
        f"image {lost}: copy from node2 failed") and text, 30, what="the lost image's attempt")
    sessions = [int(line.split(": ")[-1].split()[0]) for line in log.splitlines()
                if "rsync from node1: " in line and "images in one session" in line]
    assert sessions and max(sessions) > 1, "the backlog never shared a session"
    # rsync's own words about the one file it could not send, for that image alone.
    assert f'image {lost}: copy from node1 failed: rsync from node1 exited 23: rsync: ' \
           f'[sender] link_stat "/var/lib/glance/images/{lost}" failed' in log
    for image_id in truth:
        assert f"image {image_id}: installed and verified on node3 (from node1)" in log
        assert f"image {image_id}: copy from" not in log
    assert not node3.temporaries()
