"""The cron workflow on a real three-node cluster: RabbitMQ, sshd, rsync.

Glance's side is played by oslo.messaging's own Notifier (driver messagingv2,
publisher_id image.node1) and by files written into node1's store; every node
then runs ``glance-image-sync both`` in its own mount namespace.
"""

import json
import os
import stat

import pytest

from glance_image_sync.broker import topology
from tests.clusterhelpers import (
    dead_letter_reasons,
    run_both_everywhere,
    sshd_logins,
    store_snapshot,
)
from tools.localcluster import STORE_GID, STORE_UID, md5_of, wait_for

pytestmark = pytest.mark.cluster


def test_an_upload_reaches_every_node_verified_and_a_delete_removes_it(cluster):
    image_id, md5, size = cluster.new_image("node1", size=3 * 1024 * 1024 + 17, mode=0o640)
    cluster.upload(image_id, md5, size)

    run_both_everywhere(cluster)

    source = cluster["node1"].path(image_id).read_bytes()
    for node in cluster.nodes:
        path = node.path(image_id)
        assert path.read_bytes() == source, node.name
        st = path.stat()
        assert stat.S_IMODE(st.st_mode) == 0o640, node.name
        assert (st.st_uid, st.st_gid) == (STORE_UID, STORE_GID), node.name
        assert node.files() == [image_id], f"{node.name}: stray files {node.files()}"

    cluster.delete(image_id, md5, size)
    run_both_everywhere(cluster)
    for node in cluster.nodes:
        assert node.files() == [], node.name
    depths = cluster.queue_depths()
    assert all(depths[topology.node_queue_name(n.name)] == 0 for n in cluster.nodes)
    assert depths["glance_notifications.info"] == 0


def test_replaying_the_whole_sequence_changes_nothing(cluster):
    kept, kept_md5, kept_size = cluster.new_image("node2", size=1024 * 1024)
    gone, gone_md5, gone_size = cluster.new_image("node1", size=1024 * 1024)
    cluster.upload(kept, kept_md5, kept_size, publisher="node2")
    cluster.upload(gone, gone_md5, gone_size)
    run_both_everywhere(cluster)
    cluster.delete(gone, gone_md5, gone_size)
    run_both_everywhere(cluster)
    before = store_snapshot(cluster)
    assert all(set(files) == {kept} for files in before.values())
    logins = sshd_logins(cluster)
    assert logins >= 4  # the first pass did copy (and the count sees logins)

    # Everything again, in the same order: uploads, then the delete.
    cluster.upload(kept, kept_md5, kept_size, publisher="node2")
    cluster.upload(gone, gone_md5, gone_size)
    cluster.delete(gone, gone_md5, gone_size)
    run_both_everywhere(cluster)
    # And the upload of the deleted image alone, as a late redelivery would.
    cluster.upload(gone, gone_md5, gone_size)
    run_both_everywhere(cluster)

    assert store_snapshot(cluster) == before
    assert sshd_logins(cluster) == logins, "a replay must not transfer anything"


@pytest.mark.cluster_config(max_attempts=3)
def test_a_copy_whose_md5_is_not_the_events_is_never_installed(cluster):
    image_id, md5, size = cluster.new_image("node1", size=2 * 1024 * 1024)
    with open(cluster["node1"].path(image_id), "r+b") as f:  # bit rot after the upload
        f.seek(1000)
        byte = f.read(1)[0]
        f.seek(1000)
        f.write(bytes([byte ^ 0xFF]))  # changed whatever it was (0xff in 1 of 256 images)
    corrupt = cluster["node1"].path(image_id).read_bytes()
    assert md5_of(cluster["node1"].path(image_id)) != md5
    cluster.upload(image_id, md5, size)
    assert cluster["node1"].run("duplicate-notifications").returncode == 0

    def every_event_parked():
        # Retries come back after 1 s and 2 s: cron runs pick them up until
        # each of the three events ran out of attempts on each node.
        for node in cluster.nodes:
            result = node.run("sync-images")
            assert result.returncode in (0, 1), result.stderr
            assert node.files() == ([image_id] if node.name == "node1" else []), node.files()
        depths = cluster.queue_depths()
        return all(depths[topology.failed_queue_name(n.name)] == 3 for n in cluster.nodes)

    wait_for(every_event_parked, 90, interval=0.5, what="every event in a failed queue")
    depths = cluster.queue_depths()
    assert sum(depths.values()) == 9 + depths["notifications.info"], depths
    for node in cluster.nodes[1:]:
        assert f"md5 {md5}" not in node.log.read_text()  # never "verified"
        assert f"expected {md5}" in node.log.read_text()
        assert node.run("sync-images").returncode == 0  # nothing left to fail
    assert cluster["node1"].path(image_id).read_bytes() == corrupt  # Glance's file, untouched


def test_hostile_notifications_touch_no_file_and_run_no_program(cluster):
    run_both_everywhere(cluster)  # declares every queue
    image_id, md5, size = cluster.new_image("node1", size=64 * 1024)
    canary = cluster.base / "etc" / "x"
    canary.parent.mkdir()
    canary.write_text("untouched")
    before = store_snapshot(cluster)
    logins = sshd_logins(cluster)

    cluster.notify("image.delete", "../../etc/x", status="deleted", deleted=True)
    cluster.notify("image.upload", "../../etc/x", md5, size)
    # Publishers that are no host name. (A well-formed one outside api_nodes is a node
    # this one does not know yet, applied from the peers: tests/test_cluster_nodes.py.)
    cluster.notify("image.upload", image_id, md5, size, publisher="evil.example.org:22")
    cluster.notify("image.delete", image_id, publisher="attacker;id")
    cluster.notify("image.upload", image_id, "$(touch /tmp/pwned)", size)
    cluster.publish_raw(b"{this is not json")
    cluster.publish_raw(json.dumps({"oslo.version": "2.0", "oslo.message": json.dumps({
        "event_type": "image.delete", "priority": "INFO", "publisher_id": "image.node1",
        "payload": "/var/lib/glance/images/" + image_id})}).encode())
    # Forged directly into a node's queue, past the fan-out.
    cluster.publish_raw(json.dumps({"version": 1, "action": "absent", "image_id": "*",
                                    "source": "node1"}).encode(),
                        routing_key=topology.node_queue_name("node2"), exchange="")

    for node, status in (("node1", 1), ("node2", 1), ("node3", 0)):
        assert cluster[node].run("both").returncode == status, node
    assert "message rejected" in cluster["node1"].log.read_text()

    assert store_snapshot(cluster) == before
    assert canary.read_text() == "untouched"
    assert not os.path.exists("/tmp/pwned")
    assert sshd_logins(cluster) == logins
    reasons = dead_letter_reasons(cluster)
    assert len(reasons) == 8, reasons
    for expected in ["is not a UUID", "publisher_id 'image.evil.example.org:22' does not name a "
                     "host", "publisher_id 'image.attacker;id' does not name a host",
                     "not 32 hex digits",
                     "not JSON", "event: image id '*' is not a UUID"]:
        assert any(expected in reason for reason in reasons), (expected, reasons)


def test_a_second_run_while_one_holds_the_lock_exits_quietly(cluster):
    from glance_image_sync.state.runlock import RunLock

    with RunLock.in_dir(str(cluster["node2"].state)):
        result = cluster["node2"].run("both")
    assert result.returncode == 0
    assert "holds" in cluster["node2"].log.read_text()


# One transfer at a time: transfers that start together before the first
# connection is up each open their own.
@pytest.mark.cluster_config(ssh_control_persist=30, max_parallel_transfers=1)
def test_reused_ssh_connections_replicate_and_log_in_once_per_peer(cluster):
    images = [cluster.new_image("node1", size=256 * 1024) for _ in range(4)]
    for image_id, md5, size in images:
        cluster.upload(image_id, md5, size)
    run_both_everywhere(cluster)
    for node in cluster.nodes[1:]:
        assert all(node.has(image_id, md5) for image_id, md5, _ in images), node.name
        # The connection was closed when the run ended (tests/test_ssh_masters.py).
        assert not any(name.startswith("ssh-") for name in os.listdir(node.state)), node.name
    # Four images to each of two peers, over one ssh connection per peer.
    assert (cluster["node1"].dir / "sshd.log").read_text().count("Accepted publickey") == 2
