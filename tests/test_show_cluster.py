"""show on the real cluster: an image installed, verified, retrying, failed, deleted."""

import json

import pytest

from tools.localcluster import wait_for

pytestmark = pytest.mark.cluster


def show(node, image_id, *args) -> tuple:
    result = node.run("show", image_id, "--format", "json", *args)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


@pytest.mark.cluster_config(max_attempts=2, retry_delays=10)
def test_show_tells_what_this_node_knows_of_an_image(cluster):
    node1, node2, _ = cluster.nodes
    image_id, md5, size = cluster.new_image("node1", size=1024 * 1024 + 3)
    cluster.upload(image_id, md5, size)
    assert node1.run("both").returncode == 0
    assert node2.run("sync-images").returncode == 0

    code, doc = show(node2, image_id)
    assert code == 0, doc["problems"]
    assert doc["on_disk"]["size"] == size and doc["on_disk"]["mode"] == "0640"
    assert (doc["on_disk"]["verified"], doc["on_disk"]["md5"], doc["on_disk"]["matches"]) == (
        "by the sync worker", md5, True)
    event = doc["last_event"]
    assert (event["event_type"], event["ok"], event["attempt"], event["detail"]) == (
        "image.upload", True, 1, "installed from node1")  # activate and update changed nothing
    assert doc["queues"] == {"retrying": [], "failed": [], "error": None}
    assert doc["deleted"] is None
    # On the node it was uploaded to, the first event found it in place, and verified it.
    code, doc = show(node1, image_id)
    assert doc["last_event"]["detail"] == "already in place"
    assert doc["on_disk"]["verified"] == "by the sync worker" and doc["on_disk"]["matches"]

    text = node2.run("show", image_id, "--verify").stdout
    assert f"md5:        {md5}, matches the last event's (computed now)" in text
    assert "queues:     in none of this node's retry queues nor its failed queue" in text

    # Nowhere to fetch from: the event retries, then fails, and show finds it each time.
    lost, lost_md5, lost_size = cluster.new_image("node1", size=64 * 1024)
    cluster.upload(lost, lost_md5, lost_size)
    assert node1.run("duplicate-notifications").returncode == 0
    node1.stop_sshd()
    assert node2.run("sync-images").returncode == 1
    code, doc = show(node2, lost)
    assert code == 0 and doc["on_disk"] is None
    assert doc["last_event"]["ok"] is False and "node1" in doc["last_event"]["detail"]
    retrying = doc["queues"]["retrying"]
    assert len(retrying) == 3 and {r["attempts"] for r in retrying} == {1}
    assert all(r["queue"].startswith("glance_image_sync.node2.retry.") for r in retrying)

    def parked():
        node2.run("sync-images")
        return cluster.queue_depths().get("glance_image_sync.node2.failed") == 3

    wait_for(parked, 60, interval=0.5, what="the three events parked in the failed queue")
    code, doc = show(node2, lost)
    assert code == 1
    assert len(doc["queues"]["failed"]) == 3 and doc["queues"]["retrying"] == []
    assert doc["last_event"]["attempt"] == 2
    assert f"glance-image-sync failed replay {lost}" in doc["problems"][0]
    assert cluster.queue_depths()["glance_image_sync.node2.failed"] == 3  # only looked at
    text = node2.run("show", lost).stdout
    assert "queues:     failed in glance_image_sync.node2.failed: image.upload, attempt 2" in text
    assert "NEEDS ATTENTION" in text

    node1.start_sshd()
    cluster.delete(image_id)
    assert node1.run("duplicate-notifications").returncode == 0
    assert node2.run("sync-images").returncode == 0
    code, doc = show(node2, image_id)
    assert doc["on_disk"] is None and doc["deleted"] is not None
    assert (doc["last_event"]["event_type"], doc["last_event"]["detail"]) == (
        "image.delete", "moved to the trash")
    assert (doc["trash"]["event_type"], doc["trash"]["publisher"]) == ("image.delete",
                                                                       "image.node1")
    text = node2.run("show", image_id).stdout
    assert "on disk:    no such file" in text and "deleted:    yes, remembered since" in text
    assert "trash:      trashed " in text and "published by image.node1" in text
