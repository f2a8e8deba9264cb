"""A message on the bus is not proof, on the real cluster: a forged delete is undone from
the trash, Glance's API refuses a delete of an image it still has, and the trash is purged
once its grace period is over, and early, oldest first, when a store runs short of space."""

import datetime
import json
import uuid

import pytest

from tests.clusterhelpers import dead_letter_reasons, run_both_everywhere
from tests.glancestandin import StandIn
from tools.localcluster import TRASH_DIR, md5_of, wait_for

pytestmark = pytest.mark.cluster

MiB = 1024 * 1024


def forge_delete(cluster, image_id, publisher="image.node2") -> str:
    """An image.delete as anyone with the broker's credentials can send it: not Glance's
    notifier but a plain kombu publish to Glance's exchange and topic, naming a node as its
    publisher. Returns its message id."""
    message_id = str(uuid.uuid4())
    message = {"message_id": message_id, "publisher_id": publisher,
               "event_type": "image.delete", "priority": "INFO",
               "payload": {"id": image_id, "status": "deleted", "deleted": True},
               "timestamp": str(datetime.datetime.now(datetime.timezone.utc))[:26]}
    cluster.publish_raw(json.dumps({"oslo.version": "2.0",
                                    "oslo.message": json.dumps(message)}).encode())
    return message_id


def with_glance_api(cluster, standin):
    for node in cluster.nodes:
        node.config.write_text(node.config.read_text() + "[keystone_authtoken]\n" + "".join(
            f"{key} = {value}\n" for key, value in standin.config().items()))


def uploaded(cluster, sizes):
    """Images uploaded through node1 and replicated everywhere: {id: md5}."""
    truth = {}
    for size in sizes:
        image_id, md5, real_size = cluster.new_image("node1", size=size)
        cluster.upload(image_id, md5, real_size)
        truth[image_id] = md5
    return truth


def run(node, *args, expect=0):
    result = node.run(*args)
    assert result.returncode == expect, (node.name, args, result.stdout, result.stderr,
                                         node.log.read_text()[-3000:])
    return result


def test_a_forged_delete_is_trashed_everywhere_and_restore_or_reconcile_undo_it(cluster):
    truth = uploaded(cluster, (MiB + 3, 2 * MiB, 512 * 1024))
    run_both_everywhere(cluster)
    assert all(node.has(i, md5) for node in cluster.nodes for i, md5 in truth.items())
    original = {i: cluster["node1"].path(i).read_bytes() for i in truth}

    messages = {image_id: forge_delete(cluster, image_id) for image_id in truth}
    run_both_everywhere(cluster)

    for node in cluster.nodes:  # gone from every store, kept in every trash
        assert not any(node.path(i).exists() for i in truth), node.name
        assert node.trashed() == sorted(truth), node.name
        for image_id, md5 in truth.items():
            assert md5_of(node.images / TRASH_DIR / image_id) == md5
    image_id = next(iter(truth))
    shown = json.loads(run(cluster["node3"], "show", image_id, "--format", "json").stdout)
    trash = shown["trash"]
    assert (trash["event_type"], trash["message_id"], trash["publisher"], trash["md5_from"]) \
        == ("image.delete", messages[image_id], "image.node2", "verified")
    assert trash["purge_at"] == pytest.approx(trash["trashed_at"] + 24 * 3600)
    text = run(cluster["node3"], "show", image_id).stdout
    assert f"published by image.node2), applied by the sync worker; {len(original[image_id])} " \
        f"bytes, md5 {truth[image_id]} (verified by this node); purged " in text

    # node1 and node2: restore, one image at a time.
    for node in cluster.nodes[:2]:
        for image_id in truth:
            out = run(node, "restore", image_id).stdout
            assert out.startswith(f"image {image_id} restored on {node.name} from the trash")
            assert "size and md5 checked" in out
        run(node, "restore", image_id, expect=1)  # restored already: not in the trash
    # node3: one reconcile, which finds them on the peers and restores its own copies.
    result = run(cluster["node3"], "reconcile", "--fix", "--min-age", "0", "--format", "json")
    actions = {f["image_id"]: f["action"] for f in json.loads(result.stdout)["findings"]}
    assert sorted(actions) == sorted(truth)
    for image_id, md5 in truth.items():
        assert actions[image_id].startswith(
            f"restored from this node's trash (size and md5 checked, md5 {md5}; node1, node2 "
            "still had it; no answer from Glance's API to go by"), actions[image_id]

    for node in cluster.nodes:  # byte-identical copies, and an empty trash
        assert node.trashed() == [], node.name
        for image_id, data in original.items():
            assert node.path(image_id).read_bytes() == data, (node.name, image_id)
    run(cluster["node2"], "reconcile")  # the stores agree
    # Their deletions are forgotten: the next event for them is applied again.
    assert "deleted:    no" in run(cluster["node3"], "show", image_id).stdout


def test_glance_s_api_refuses_a_delete_of_an_active_image_and_waits_while_it_cannot_tell(
        cluster):
    with StandIn() as glance:
        with_glance_api(cluster, glance)
        truth = uploaded(cluster, (MiB, MiB + 1))
        kept, later = truth
        glance.images.update({kept: "active", later: "active"})
        run_both_everywhere(cluster)
        doctor = json.loads(cluster["node1"].run("doctor", "--format", "json").stdout)
        check = next(c for c in doctor["checks"] if c["name"] == "delete protection")
        assert check["status"] == "PASS", check
        assert check["detail"].startswith("Glance's API is asked before each delete")

        cluster.delete(kept, truth[kept])  # Glance says otherwise: still active
        for node in cluster.nodes:
            run(node, "both", expect=1)  # a refused delete needs a human
            assert node.has(kept, truth[kept]) and node.trashed() == [], node.name
        reasons = dead_letter_reasons(cluster)
        assert reasons == ["image still active in Glance (Glance's API: status active)"] * 3

        # Glance's API down: the delete waits, retried, the file in place.
        glance.glance_status = 503
        glance.images[later] = "deleted"
        cluster.delete(later, truth[later])
        for node in cluster.nodes:
            run(node, "both", expect=1)
            assert node.has(later, truth[later]), node.name
        assert "not deleted until Glance's API confirms it: Glance's API answered 503" in \
            cluster["node2"].log.read_text()
        glance.glance_status = None  # back: the retry applies it

        def applied(node):
            assert node.run("sync-images").returncode in (0, 1)
            return node.trashed() == [later] and not node.path(later).exists()
        for node in cluster.nodes:
            wait_for(lambda node=node: applied(node), 60, interval=0.5,
                     what=f"the confirmed delete on {node.name}")
            assert node.has(kept, truth[kept])


@pytest.mark.cluster_config(deleted_image_grace=8)
def test_the_daemon_purges_the_trash_once_the_grace_period_is_over(cluster):
    for node in cluster.nodes:
        node.start_daemon()
    truth = uploaded(cluster, (MiB,))
    image_id, md5 = next(iter(truth.items()))
    wait_for(lambda: all(node.has(image_id, md5) for node in cluster.nodes), 60,
             what="the image everywhere")
    cluster.delete(image_id, md5)
    wait_for(lambda: all(node.trashed() == [image_id] for node in cluster.nodes), 60,
             what="the image in every trash")
    wait_for(lambda: all(node.trashed() == [] for node in cluster.nodes), 60, interval=0.5,
             what="the trash purged when the grace period ends")
    for node in cluster.nodes:
        assert not node.path(image_id).exists()
        assert f"image {image_id}: purged from the trash on {node.name}, its grace period " \
            "over (deleted_image_grace 8 s; trashed " in node.log.read_text(), node.name
    run(cluster["node1"], "restore", image_id, expect=1)  # gone for good


@pytest.mark.cluster_setup(store_sizes={"node3": "32m"})
def test_a_store_short_of_space_purges_the_oldest_trash_first(cluster):
    node3 = cluster["node3"]
    # node3 only: the others' stores share this machine's disk, whatever its free share.
    node3.write_config({"trash_min_free_percent": 40})
    for node in cluster.nodes:
        node.start_daemon()
    truth = uploaded(cluster, (6 * MiB, 6 * MiB, 6 * MiB))  # 18 of node3's 32 MiB
    wait_for(lambda: all(node.has(i, md5) for node in cluster.nodes
                         for i, md5 in truth.items()), 60, what="the images everywhere")
    order = list(truth)
    for image_id in order:  # deleted one after the other: the first is the oldest
        cluster.delete(image_id, truth[image_id])
        wait_for(lambda image_id=image_id: all(image_id in node.trashed()
                                               for node in cluster.nodes), 60,
                 what="the delete applied everywhere")
    assert node3.trashed() == sorted(order)  # 14 MiB free (44 %): nothing purged yet

    extra = uploaded(cluster, (5 * MiB,))  # 9 MiB free (28 %) on node3 once it is there
    wait_for(lambda: all(node.has(i, md5) for node in cluster.nodes
                         for i, md5 in extra.items()), 60, what="the new image everywhere")
    wait_for(lambda: node3.trashed() == sorted(order[1:]), 60, interval=0.5,
             what="node3's oldest trashed image purged for space")
    log = node3.log.read_text()
    assert f"image {order[0]}: purged from the trash on node3 before its grace period " \
        "ended: " in log and "below trash_min_free_percent (40 %); oldest first" in log
    for node in cluster.nodes[:2]:  # no threshold to fall below: nothing goes early
        assert node.trashed() == sorted(order), node.name
