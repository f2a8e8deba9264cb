"""Operator tools on the real three-node cluster: metrics after real transfers,
status after real syncs, and reconcile on stores made to differ in every way."""

import hashlib
import json
import os
import time
import uuid

import pytest

from glance_image_sync.state.tombstones import Tombstones
from tests.clusterhelpers import free_port, parse, queue_messages, scrape, scrape_until
from tools.localcluster import STORE_GID, STORE_UID

pytestmark = pytest.mark.cluster


def transfers(peer, result):
    return ("glance_image_sync_transfers_total", (("peer", peer), ("result", result)))


APPLIED_OK = ("glance_image_sync_events_applied_total", (("result", "ok"),))
APPLIED_FAILED = ("glance_image_sync_events_applied_total", (("result", "failed"),))
RECEIVED_PRESENT = ("glance_image_sync_events_received_total", (("action", "present"),))
def last_success(node):
    return ("glance_image_sync_last_success_timestamp_seconds", (("node", node),))


def last_error(node):
    return ("glance_image_sync_last_error_timestamp_seconds", (("node", node),))
BROKER_UP = ("glance_image_sync_broker_up", ())


def test_the_metrics_endpoint_counts_real_transfers(cluster):
    port = free_port()
    node2 = cluster["node2"]
    textfile = node2.dir / "node2.prom"
    node2.write_config({"metrics_listen_port": port, "metrics_textfile": textfile})
    started = time.time()
    node2.start_daemon()  # its fan-out serves every node's queue; only node2 syncs
    before = scrape(port)
    assert before[BROKER_UP] == 1
    assert before[APPLIED_OK] == 0
    assert last_success("node2") not in before

    image_id, md5, size = cluster.new_image("node1", size=3 * 1024 * 1024 + 5)
    cluster.upload(image_id, md5, size)
    got = scrape_until(port, lambda got: got[APPLIED_OK] >= 3,
                       "upload, activate and update applied on node2")
    assert node2.has(image_id, md5)
    assert got[RECEIVED_PRESENT] == 3
    assert got[transfers("node1", "ok")] == 1  # one copy; the later events were no-ops
    assert got[("glance_image_sync_transferred_bytes_total", (("peer", "node1"),))] == size
    assert got[("glance_image_sync_transfer_seconds_count", ())] == 1
    assert 0 < got[("glance_image_sync_transfer_seconds_sum", ())] < 60
    assert got[queue_messages("glance_image_sync.node2")] == 0
    assert got[("glance_image_sync_queue_consumers", (("queue", "glance_image_sync.node2"),))] \
        == 1
    assert got[queue_messages("glance_image_sync.node1")] == 3  # no daemon there
    assert got[queue_messages("glance_image_sync.node3")] == 3
    assert started <= got[last_success("node2")] <= time.time()
    assert last_error("node2") not in got

    cluster["node1"].stop_sshd()
    lost, lost_md5, lost_size = cluster.new_image("node1", size=1024 * 1024)
    cluster.upload(lost, lost_md5, lost_size)
    # One scrape is no snapshot: the counters are collected before the state
    # file (after a query to the broker), so an attempt that ends in between
    # shows in the last error only. Wait until both say so.
    got = scrape_until(port, lambda got: last_error("node2") in got and got[APPLIED_FAILED] >= 1,
                       "a failed attempt recorded")
    assert got[transfers("node1", "failed")] >= 1
    assert got[transfers("node1", "ok")] == 1
    assert got[last_error("node2")] >= got[last_success("node2")]
    assert node2.stop_daemon() == 0
    with pytest.raises(OSError):
        scrape(port)  # the endpoint stops with the daemon
    written = parse(textfile.read_text())  # written once more on the way out
    assert written[transfers("node1", "ok")] == 1
    assert written[transfers("node1", "failed")] >= got[transfers("node1", "failed")]


def test_a_cron_run_writes_a_textfile_and_status_reads_the_last_sync(cluster):
    node1, node3 = cluster["node1"], cluster["node3"]
    textfile = node3.dir / "textfile" / "glance-image-sync.prom"
    textfile.parent.mkdir()
    node3.write_config({"metrics_textfile": textfile})
    image_id, md5, size = cluster.new_image("node1", size=2 * 1024 * 1024)
    cluster.upload(image_id, md5, size)
    started = time.time()

    assert node1.run("duplicate-notifications").returncode == 0
    assert node3.run("sync-images").returncode == 0
    assert node3.has(image_id, md5)

    got = parse(textfile.read_text())
    assert got[transfers("node1", "ok")] == 1
    assert got[("glance_image_sync_transferred_bytes_total", (("peer", "node1"),))] == size
    assert got[APPLIED_OK] == 3
    assert got[BROKER_UP] == 1
    assert got[queue_messages("glance_image_sync.node3")] == 0
    assert got[queue_messages("glance_image_sync.node1")] == 3
    assert started <= got[last_success("node3")] <= time.time()
    assert [name for name in os.listdir(textfile.parent)] == [textfile.name]

    result = node3.run("status", "--format", "json")
    doc = json.loads(result.stdout)
    assert result.returncode == 0, doc["problems"]
    assert doc["last_success"]["image_id"] == image_id
    assert started <= doc["last_success"]["time"] == got[last_success("node3")]
    # node1 runs no daemon: its three events wait with nothing consuming them.
    result = node1.run("status")
    assert result.returncode == 1
    assert "3 events wait in glance_image_sync.node1 and nothing consumes it" in result.stdout


# -- reconcile -----------------------------------------------------------------


def put(node, image_id, data, mode=0o640):
    path = node.path(image_id)
    path.write_bytes(data)
    os.chmod(path, mode)
    os.chown(path, STORE_UID, STORE_GID)


def reconcile(node, *args):
    result = node.run("reconcile", "--format", "json", *args)
    return result.returncode, json.loads(result.stdout), result.stderr


def found(doc) -> dict:
    return {f["image_id"]: f for f in doc["findings"]}


def test_reconcile_finds_fixes_and_prunes_only_what_it_may(cluster):
    node1, node2, node3 = cluster.nodes
    ids = {name: str(uuid.uuid4()) for name in
           ("both_peers", "only_node2", "here_only", "size_agreed", "size_unknown",
            "md5_disagree", "deleted_here")}
    data = {name: os.urandom(256 * 1024 + n) for n, name in enumerate(ids)}
    put(node2, ids["both_peers"], data["both_peers"])
    put(node3, ids["both_peers"], data["both_peers"])
    put(node2, ids["only_node2"], data["only_node2"], mode=0o644)
    put(node1, ids["here_only"], data["here_only"])
    put(node1, ids["size_agreed"], data["size_agreed"][:1000])  # a truncated copy
    put(node2, ids["size_agreed"], data["size_agreed"])
    put(node3, ids["size_agreed"], data["size_agreed"])
    put(node1, ids["size_unknown"], data["size_unknown"])
    put(node2, ids["size_unknown"], data["size_unknown"][:-1])
    put(node2, ids["md5_disagree"], data["md5_disagree"])
    put(node3, ids["md5_disagree"], bytes(len(data["md5_disagree"])))  # same size
    put(node2, ids["deleted_here"], data["deleted_here"])
    Tombstones(str(node1.state), 3600).add(ids["deleted_here"])
    kinds = {"both_peers": "missing here", "only_node2": "missing here",
             "here_only": "here only", "size_agreed": "size mismatch",
             "size_unknown": "size mismatch", "md5_disagree": "missing here",
             "deleted_here": "missing here"}
    before = {node.name: node.files() for node in cluster.nodes}

    # Report only: every difference, nothing touched.
    code, doc, _ = reconcile(node1)
    assert code == 1
    assert {i: f["finding"] for i, f in found(doc).items()} == {
        ids[name]: kind for name, kind in kinds.items()}
    assert found(doc)[ids["size_agreed"]]["here_size"] == 1000
    assert found(doc)[ids["size_agreed"]]["peer_sizes"] == {
        "node2": len(data["size_agreed"]), "node3": len(data["size_agreed"])}
    assert all(f["action"] is None for f in doc["findings"])
    assert {node.name: node.files() for node in cluster.nodes} == before

    # --fix leaves files that just changed to the events.
    code, doc, _ = reconcile(node1, "--fix")
    assert code == 1
    assert {node.name: node.files() for node in cluster.nodes} == before
    assert "recently" in found(doc)[ids["both_peers"]]["action"]

    code, doc, progress = reconcile(node1, "--fix", "--min-age", "0")
    assert code == 1  # some differences need a human
    actions = {name: found(doc)[ids[name]] for name in kinds}
    for name in ("both_peers", "only_node2", "size_agreed"):
        assert actions[name]["resolved"], actions[name]
        assert node1.path(ids[name]).read_bytes() == data[name], name
        st = node1.path(ids[name]).stat()
        assert (st.st_uid, st.st_gid) == (STORE_UID, STORE_GID)
    md5 = hashlib.md5(data["both_peers"]).hexdigest()
    assert actions["both_peers"]["action"] == (
        f"fetched from node2, md5 {md5} (as computed on node2 and node3)")
    assert "(as computed on node2 only)" in actions["only_node2"]["action"]
    assert node1.path(ids["only_node2"]).stat().st_mode & 0o777 == 0o644  # the source's mode
    assert "only one peer has it" in actions["size_unknown"]["action"]
    assert node1.path(ids["size_unknown"]).read_bytes() == data["size_unknown"]
    assert "peers disagree on its md5" in actions["md5_disagree"]["action"]
    assert "deleted here earlier" in actions["deleted_here"]["action"]
    assert not node1.path(ids["md5_disagree"]).exists()
    assert not node1.path(ids["deleted_here"]).exists()
    # No evidence that Glance deleted it (no tombstone, no API): copied out, never removed.
    assert actions["here_only"]["action"].startswith(
        "copied to the peers: queued for node2, node3 to fetch from node1 and verify (md5 "
        f"{hashlib.md5(data['here_only']).hexdigest()})"), actions["here_only"]
    assert actions["here_only"]["resolved"] and node1.path(ids["here_only"]).exists()
    assert len([line for line in progress.splitlines() if line.startswith("[")]) == 7
    assert node1.temporaries() == []
    assert {n.name: n.files() for n in cluster.nodes[1:]} == {
        n: before[n] for n in ("node2", "node3")}  # peers are only read
    for node in cluster.nodes:
        assert node.run("both").returncode == 0
    for node in (node2, node3):
        assert node.path(ids["here_only"]).read_bytes() == data["here_only"]

    # What is left needs a human, and is still reported as such.
    code, doc, _ = reconcile(node1)
    assert code == 1
    assert set(found(doc)) == {ids["size_unknown"], ids["md5_disagree"], ids["deleted_here"]}
    result = node1.run("reconcile")
    assert "3 differences (2 missing here, 1 size mismatch); 0 resolved, 3 left" in \
        result.stdout
