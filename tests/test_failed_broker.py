"""``failed list``, ``replay`` and ``purge`` against the real RabbitMQ: first runs, dead
letters, and a replay that the broker stops part of the way."""

import json
import socket
import uuid

import kombu
import pytest

from glance_image_sync.admin.tables import plural
from glance_image_sync.broker import confirmed, topology
from glance_image_sync.cmd import commands as cli
from glance_image_sync.events import Action, ImageEvent
from glance_image_sync.fanout.consumer import fanout_loop
from glance_image_sync.sync.worker import ATTEMPT_HEADER, ERROR_HEADER
from tests.test_fanout_broker import drain, publish, settings_for, url
from tools.localcluster import rabbitmqctl

pytestmark = pytest.mark.broker


def run(vhost, tmp_path, capsys, *args):
    settings_for(vhost, tmp_path)  # writes tmp_path/test.conf
    code = cli.main(["--config-file", str(tmp_path / "test.conf"), *args])
    out, err = capsys.readouterr()
    return code, out, err


def park(vhost, image_ids, queue=None):
    """Failed events of node1 for ``image_ids``, as the worker parks them."""
    queue = queue or topology.failed_queue_name("node1")
    with kombu.Connection(url(vhost)) as connection:
        producer = connection.Producer()
        for image_id in image_ids:
            event = ImageEvent(Action.PRESENT, image_id, source="node2", checksum="0" * 32,
                               size=1, event_type="image.upload")
            producer.publish(event.to_wire(), exchange="", routing_key=queue,
                             headers={ATTEMPT_HEADER: 10, ERROR_HEADER: "node2: timeout"},
                             content_type="application/json", serializer=None,
                             declare=[kombu.Queue(queue, durable=True)])


@pytest.mark.parametrize("args, expected", [
    (["failed", "list"], "no failed events: glance_image_sync.node1.failed does not exist yet"),
    (["failed", "list", "--dead-letter"],
     "no dead letters: glance_image_sync.dead_letter does not exist yet"),
    (["failed", "replay"], "no failed events: glance_image_sync.node1.failed does not exist"),
    (["failed", "purge", "--all"], "no failed events"),
])
def test_before_any_fan_out_ran_there_is_nothing_failed(vhost, tmp_path, capsys, args,
                                                        expected):
    code, out, err = run(vhost, tmp_path, capsys, *args)
    assert (code, err) == (0, "")
    assert out.startswith(expected) and len(out.splitlines()) == 1


def test_a_dead_letter_shows_its_image_and_goes_back_where_it_came_from(vhost, tmp_path,
                                                                        capsys):
    settings = settings_for(vhost, tmp_path)
    loop = fanout_loop(settings, once=True)
    loop.run()  # declares every queue, Glance's too
    image_id = str(uuid.uuid4())
    hostile = {"event_type": "image.upload", "priority": "INFO", "publisher_id": "image.a;b",
               "payload": {"id": image_id, "status": "active", "checksum": "0" * 32,
                           "size": 1}}
    publish(vhost, [json.dumps({"oslo.version": "2.0", "oslo.message": json.dumps(hostile)}),
                    b"\xff not even UTF-8"])
    loop.run()
    loop.close()

    code, out, _ = run(vhost, tmp_path, capsys, "failed", "list", "--dead-letter",
                       "--format", "json")
    listed = json.loads(out)
    assert code == 0 and [item["image_id"] for item in listed] == [image_id, "-"]
    assert listed[0]["came_from"] == "glance_notifications.info"
    assert "does not name a host" in listed[0]["error"]

    # After a fix (here: none is needed to see it parsed again), back to Glance's queue.
    code, out, _ = run(vhost, tmp_path, capsys, "failed", "replay", "--dead-letter", image_id)
    assert (code, out) == (0, "1 dead letter moved back from glance_image_sync.dead_letter\n")
    back = drain(vhost, "glance_notifications.info")
    assert len(back) == 1 and image_id in str(back[0][0])
    assert back[0][1]["x-gis-replayed"] is True

    code, out, _ = run(vhost, tmp_path, capsys, "failed", "purge", "--dead-letter", "--all")
    assert (code, out) == (0, "purged 1 dead letter from glance_image_sync.dead_letter\n")
    assert drain(vhost, topology.DEAD_LETTER_QUEUE) == []


def test_a_dead_letter_that_names_no_queue_of_ours_is_not_replayed(vhost, tmp_path, capsys):
    settings_for(vhost, tmp_path)
    with kombu.Connection(url(vhost)) as connection:
        connection.Producer().publish(
            b"{}", exchange="", routing_key=topology.DEAD_LETTER_QUEUE, serializer=None,
            headers={"x-gis-reason": "event: not an object", "x-gis-queue": "elsewhere"},
            declare=[kombu.Queue(topology.DEAD_LETTER_QUEUE, durable=True)])
    code, out, _ = run(vhost, tmp_path, capsys, "failed", "replay", "--dead-letter")
    assert code == 1
    assert "0 dead letters moved back" in out
    assert "came from elsewhere, not a queue it may go back to" in out
    assert len(drain(vhost, topology.DEAD_LETTER_QUEUE)) == 1


def test_replay_and_purge_by_image_with_counts(vhost, tmp_path, capsys):
    ids = [str(uuid.uuid4()) for _ in range(4)]
    park(vhost, ids)
    code, out, _ = run(vhost, tmp_path, capsys, "failed", "purge", ids[0], ids[1])
    assert (code, out) == (0, "purged 2 failed events from glance_image_sync.node1.failed\n")
    node_queue = topology.node_queue_name("node1")
    with kombu.Connection(url(vhost)) as connection:
        kombu.Queue(node_queue, durable=True)(connection.default_channel).declare()
    code, out, _ = run(vhost, tmp_path, capsys, "failed", "replay", ids[2])
    assert (code, out) == (0, "1 failed event moved back from "
                              "glance_image_sync.node1.failed\n")
    replayed = drain(vhost, node_queue)
    assert [json.loads(body)["image_id"] for body, _ in replayed] == [ids[2]]
    assert replayed[0][1][ATTEMPT_HEADER] == 0
    left = drain(vhost, topology.failed_queue_name("node1"))
    assert [json.loads(body)["image_id"] for body, _ in left] == [ids[3]]


def test_a_replay_stopped_by_the_broker_says_what_moved_and_loses_nothing(vhost, tmp_path,
                                                                          capsys,
                                                                          monkeypatch):
    ids = [str(uuid.uuid4()) for _ in range(5)]
    park(vhost, ids)
    node_queue = topology.node_queue_name("node1")
    with kombu.Connection(url(vhost)) as connection:
        kombu.Queue(node_queue, durable=True)(connection.default_channel).declare()
    # The node queue takes two more, then refuses (a full queue, as a broker would).
    rabbitmqctl("set_policy", "-p", vhost, "--apply-to", "queues", "full", f"^{node_queue}$",
                '{"max-length": 2, "overflow": "reject-publish"}')
    code, out, _ = run(vhost, tmp_path, capsys, "failed", "replay")
    assert code == 1
    lines = out.splitlines()
    assert lines[0] == "2 failed events moved back from glance_image_sync.node1.failed"
    assert sum("not moved, left in glance_image_sync.node1.failed" in line
               and "refused it (nack)" in line for line in lines) == 3
    moved = [json.loads(body)["image_id"] for body, _ in drain(vhost, node_queue)]
    left = [json.loads(body)["image_id"] for body, _ in
            drain(vhost, topology.failed_queue_name("node1"))]
    assert sorted(moved + left) == sorted(ids) and len(moved) == 2
    rabbitmqctl("clear_policy", "-p", vhost, "full")

    # A socket timeout while the second chunk's confirms are awaited.
    park(vhost, left)
    waits = []
    real_wait = confirmed.Batch.wait

    def wait(self, timeout=confirmed.SETTLE_TIMEOUT):
        waits.append(timeout)
        if len(waits) == 2:
            raise socket.timeout("timed out")
        return real_wait(self, timeout)

    monkeypatch.setattr(confirmed.Batch, "wait", wait)
    monkeypatch.setattr("glance_image_sync.admin.failed.CHUNK", 2)
    code, out, _ = run(vhost, tmp_path, capsys, "failed", "replay")
    assert code == 1
    moved = [json.loads(body)["image_id"] for body, _ in drain(vhost, node_queue)]
    still = [json.loads(body)["image_id"] for body, _ in
             drain(vhost, topology.failed_queue_name("node1"))]
    # Nothing lost: every event is still parked or moved; only those in doubt are in both.
    assert set(moved) | set(still) == set(left) and len(moved) == len(set(moved))
    doubt = set(moved) & set(still)
    # The second chunk's confirms may all have come in while it was published (py-amqp
    # reads them then): its events are then moved, and none is in doubt.
    assert len(moved) >= 2 and len(doubt) <= 2
    lines = out.splitlines()
    assert lines[:2] == [
        f"{plural(len(moved) - len(doubt), 'failed event')} moved back from "
        "glance_image_sync.node1.failed",
        "stopped by a broker error: timed out; the failed events not moved stay in "
        "glance_image_sync.node1.failed"]
    assert lines[2:] == ([f"  {plural(len(doubt), 'failed event')} sent but not confirmed: "
                          "kept in glance_image_sync.node1.failed, and may have arrived too "
                          "(applying an event twice changes nothing)"] if doubt else [])


def test_an_unreachable_broker_is_one_line_and_exit_1(tmp_path, capsys):
    path = tmp_path / "c.conf"
    path.write_text("[DEFAULT]\napi_nodes = node1,node2\nhost = node1\n"
                    "transport_url = rabbit://guest:guest@127.0.0.1:1/\n")
    assert cli.main(["--config-file", str(path), "failed", "list"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("glance-image-sync: cannot reach the broker") and \
        len(err.splitlines()) == 1

