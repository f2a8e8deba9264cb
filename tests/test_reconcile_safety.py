"""reconcile on the real cluster never destroys a live image: here-only images are
removed only on evidence that Glance deleted them, else copied to every peer."""

import json
import os
import subprocess

import pytest

from glance_image_sync.state.tombstones import Tombstones
from tests.glancestandin import StandIn
from tools.localcluster import STORE_GID, STORE_UID, wait_for

pytestmark = pytest.mark.cluster


def reconcile(node, *args):
    result = node.run("reconcile", "--format", "json", *args)
    return result.returncode, json.loads(result.stdout), result.stderr


def actions(doc) -> dict:
    return {f["image_id"]: f["action"] for f in doc["findings"]}


def with_glance_api(node, standin):
    node.config.write_text(node.config.read_text() + "[keystone_authtoken]\n" + "".join(
        f"{key} = {value}\n" for key, value in standin.config().items()))


def test_a_lost_upload_reconciled_on_its_node_first_ends_up_on_every_node(cluster):
    node1, node2, node3 = cluster.nodes
    # Uploaded through node1, its notification lost: the only copy is node1's.
    image_id, md5, size = cluster.new_image("node1", size=3 * 1024 * 1024 + 7)

    code, doc, stderr = reconcile(node1, "--fix", "--prune", "--min-age", "0")
    assert code == 0, (doc, stderr)
    assert actions(doc)[image_id].startswith(
        f"copied to the peers: queued for node2, node3 to fetch from node1 and verify "
        f"(md5 {md5}); no evidence that Glance deleted it"), doc
    assert node1.has(image_id, md5)
    assert node1.temporaries() == []

    # Each peer's own worker (here a cron run) fetches it and verifies the md5.
    for node in (node2, node3):
        result = node.run("sync-images")
        assert result.returncode == 0, (node.name, result.stderr, node.log.read_text()[-2000:])
        assert node.has(image_id, md5), node.name
        assert os.stat(node.path(image_id)).st_uid == STORE_UID
    code, doc, _ = reconcile(node2)
    assert code == 0 and doc["findings"] == [], doc


def test_prune_removes_only_what_a_tombstone_or_glance_calls_gone(cluster):
    node1 = cluster.nodes[0]
    everywhere, _, _ = cluster.new_image("node1", size=64 * 1024)
    for node in cluster.nodes[1:]:
        data = node1.path(everywhere).read_bytes()
        node.path(everywhere).write_bytes(data)
        os.chown(node.path(everywhere), STORE_UID, STORE_GID)
    live, live_md5, _ = cluster.new_image("node1", size=128 * 1024)
    unknown, _, _ = cluster.new_image("node1", size=128 * 1024)
    deleted, _, _ = cluster.new_image("node1", size=128 * 1024)
    tombstoned, _, _ = cluster.new_image("node1", size=128 * 1024)
    Tombstones(str(node1.state), 3600).add(tombstoned)

    with StandIn() as glance:
        glance.images.update({everywhere: "active", live: "active", deleted: "deleted"})
        with_glance_api(node1, glance)

        # --fix alone copies what Glance has and removes nothing.
        code, doc, _ = reconcile(node1, "--fix", "--min-age", "0")
        found = actions(doc)
        assert found[live].startswith("copied to the peers")
        assert "(Glance's API: status active)" in found[live]
        assert found[unknown] == ("not copied: Glance's API: no such image (404); "
                                  "--prune removes it")
        assert found[tombstoned] == "not copied: deleted on this node earlier; --prune removes it"
        assert all(node1.path(i).exists() for i in (unknown, deleted, tombstoned))

        code, doc, _ = reconcile(node1, "--prune", "--min-age", "0")
        found = actions(doc)
        # Into the trash, as a delete: evidence can be wrong ('restore' puts one back).
        assert found[unknown] == "moved to the trash: Glance's API: no such image (404)"
        assert found[deleted] == "moved to the trash: Glance's API: status deleted"
        assert found[tombstoned] == "moved to the trash: deleted on this node earlier"
        assert not any(node1.path(i).exists() for i in (unknown, deleted, tombstoned))
        assert node1.trashed() == sorted((unknown, deleted, tombstoned))
        assert node1.has(live, live_md5)

        # Credentials that cannot see every project's images: Glance calls an image every
        # node has unknown, so its "unknown" is no evidence for anything.
        blind, blind_md5, _ = cluster.new_image("node1", size=64 * 1024)
        glance.images.clear()
        code, doc, stderr = reconcile(node1, "--prune", "--min-age", "0")
        assert actions(doc)[blind].startswith("copied to the peers"), doc
        assert "its credentials may not see every project's images" in actions(doc)[blind]
        assert node1.has(blind, blind_md5)


def test_reconcile_fix_beside_a_daemon_that_starts_stops_and_deletes(cluster):
    node1, node2, node3 = cluster.nodes
    # Slow enough that the daemon starts, works and stops while reconcile's copy arrives.
    node1.write_config({"rsync_bwlimit": 2048})
    image_id, md5, size = cluster.new_image("node2", size=48 * 1024 * 1024)
    node3.path(image_id).write_bytes(node2.path(image_id).read_bytes())
    os.chown(node3.path(image_id), STORE_UID, STORE_GID)

    fix = node1.spawn("reconcile", "--fix", "--min-age", "0", "--format", "json",
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: any(image_id in name for name in node1.temporaries()), 60,
                 what="reconcile's copy under way")
        node1.start_daemon()  # removes the temporaries of gone processes at start-up
        other, other_md5, other_size = cluster.new_image("node2", size=64 * 1024)
        cluster.upload(other, other_md5, other_size, publisher="node2")
        wait_for(lambda: node1.has(other, other_md5), 60, what="the daemon's own install")
        cluster.delete(other, publisher="node2")  # a delete removes that image's temporaries
        wait_for(lambda: not node1.path(other).exists(), 60, what="the daemon's delete")
        assert node1.stop_daemon() == 0  # and a stop, its own
        node1.start_daemon()
        assert node1.stop_daemon() == 0
        assert fix.poll() is None, "reconcile ended before the daemon was done: too fast"
        out, err = fix.communicate(timeout=180)
    finally:
        if fix.poll() is None:
            fix.kill()
            fix.wait()
    assert fix.returncode == 0, (out, err)
    assert node1.owner_files() == []  # every process gave up its own
    doc = json.loads(out)
    assert [f["action"] for f in doc["findings"]] == [
        f"fetched from node2, md5 {md5} (as computed on node2 and node3)"]
    assert node1.has(image_id, md5)
    assert node1.temporaries() == []
