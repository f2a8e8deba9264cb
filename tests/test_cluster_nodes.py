"""Nodes come and go without loss: an upload through a node not (yet) in api_nodes, a
retry whose source was removed, the queues a removed node leaves, the 2013 tool's."""

import json

import kombu
import pytest

from glance_image_sync.broker import topology
from tests.clusterhelpers import dead_letter_reasons
from tools.localcluster import wait_for

pytestmark = pytest.mark.cluster


def copy_image(source, target, image_id):
    target.path(image_id).write_bytes(source.path(image_id).read_bytes())


def test_an_upload_through_a_node_not_in_api_nodes_reaches_every_node(cluster):
    node1, node2, node3 = cluster.nodes
    # node4 was added to api_nodes on the glance-api nodes it uploads through, not yet here.
    image_id, md5, size = cluster.new_image("node1", size=256 * 1024)
    cluster.upload(image_id, md5, size, publisher="node4")
    assert node1.run("duplicate-notifications").returncode == 0
    assert "publisher node4 is not in api_nodes (node1, node2, node3): the image is " \
        "fetched from the peers" in node1.log.read_text()
    for node in (node2, node3):
        result = node.run("sync-images")
        assert result.returncode == 0, node.log.read_text()[-2000:]
        assert node.has(image_id, md5)
    assert dead_letter_reasons(cluster) == []


def test_a_retry_whose_source_node_was_removed_fetches_from_the_remaining_peers(cluster):
    node1, node2, node3 = cluster.nodes
    image_id, md5, size = cluster.new_image("node3", size=256 * 1024)
    node3.stop_sshd()
    cluster.upload(image_id, md5, size, publisher="node3")
    assert node2.run("both").returncode == 1  # node3 is down, node1 has no copy: retried
    assert not node2.has(image_id)

    # node3 leaves the cluster for good; node1 got the image meanwhile.
    copy_image(node3, node1, image_id)
    node2.write_config({"api_nodes": "node1,node2"})

    def fetched():
        node2.run("sync-images")
        return node2.has(image_id, md5)

    wait_for(fetched, 60, interval=0.5, what="the retry to fetch from node1")
    assert f"image {image_id}: installed and verified on node2 (from node1)" in \
        node2.log.read_text()
    assert dead_letter_reasons(cluster) == []


def test_status_lists_a_removed_node_s_queues_and_forget_node_deletes_them(cluster):
    node1, node2, node3 = cluster.nodes
    image_id, md5, size = cluster.new_image("node1", size=64 * 1024)
    cluster.upload(image_id, md5, size)
    assert node1.run("both").returncode == 0  # queues declared for node1..3, and remembered
    assert (node1.state / "known_nodes").read_text() == "node1\nnode2\nnode3\n"
    assert node2.run("sync-images").returncode == 0
    # The 2013 tool's queue for node2, with a message nobody will read.
    with kombu.Connection(cluster.kombu_url) as connection:
        connection.Producer().publish(
            b"{}", exchange="", routing_key="glance_image_sync.node2.info", serializer=None,
            declare=[kombu.Queue("glance_image_sync.node2.info", durable=True)])

    node1.write_config({"api_nodes": "node1,node2"})  # node3 is removed
    node3.start_daemon()  # ... but still runs with the old list
    result = node1.run("status")
    assert result.returncode == 1
    assert "node3 (not in api_nodes)" in result.stdout
    assert ("node3 is not in api_nodes, but its queues remain (0 events in "
            "glance_image_sync.node3 and its retry and failed queues): if it is gone for "
            "good, run 'glance-image-sync forget-node node3'") in result.stdout
    assert ("glance_image_sync.node2.info is left over from the 2013 tool (1 message); "
            "nothing reads it: remove it with 'rabbitmqctl delete_queue -p "
            f"{cluster.vhost} glance_image_sync.node2.info'") in result.stdout
    doc = json.loads(node1.run("status", "--format", "json").stdout)
    assert [n["node"] for n in doc["departed_nodes"]] == ["node3"]
    assert [q["name"] for q in doc["left_over"]] == ["glance_image_sync.node2.info"]

    refused = node1.run("forget-node", "node2")
    assert refused.returncode == 1 and "it is in api_nodes" in refused.stdout
    refused = node1.run("forget-node", "node3")
    assert refused.returncode == 1
    assert "1 consumer still read glance_image_sync.node3" in refused.stdout
    assert node3.stop_daemon() == 0

    result = node1.run("forget-node", "NODE3")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("deleted glance_image_sync.node3 (0 messages), "
                                    "glance_image_sync.node3.retry.1s (0 messages)")
    assert result.stdout.endswith("forgot node3\n")
    assert not any(name.startswith("glance_image_sync.node3") for name in cluster.queue_depths())
    assert (node1.state / "known_nodes").read_text() == "node1\nnode2\n"
    assert topology.node_queue_name("node2") in cluster.queue_depths()
    status = node1.run("status")
    assert "node3" not in status.stdout
