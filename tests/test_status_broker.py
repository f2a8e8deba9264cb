"""``glance-image-sync status`` against the real RabbitMQ, with known queue contents."""

import json
import pathlib
import subprocess
import sys

import kombu
import pytest
from oslo_config import cfg

from glance_image_sync import service
from glance_image_sync.broker import topology
from glance_image_sync.cmd import commands as cli
from glance_image_sync.state import nodestate
from tools.localcluster import wait_for

pytestmark = pytest.mark.broker
NODES = ("node1", "node2", "node3")
PROGRAM = pathlib.Path(sys.executable).with_name("glance-image-sync")
IMAGE = "b90e9b0f-36ce-43c1-b08c-9b4201f6571f"


@pytest.fixture
def node1(vhost, tmp_path):
    """node1's configuration in a fresh vhost with every queue declared; yields its path."""
    (tmp_path / "state").mkdir()
    path = tmp_path / "node1.conf"
    path.write_text("[DEFAULT]\n" + "".join(f"{k} = {v}\n" for k, v in {
        "api_nodes": ",".join(NODES), "host": "node1",
        "transport_url": f"rabbit://guest:guest@127.0.0.1:5672/{vhost}",
        "state_dir": str(tmp_path / "state"),
        "retry_delays": "3600",  # retried events stay put while the test looks
    }.items()))
    settings = service.prepare(cfg.ConfigOpts(), ["--config-file", str(path), "both"],
                               cli.COMMAND_OPT)
    with kombu.Connection(url(vhost)) as connection:
        topology.declare_notification_queue(connection, settings.topology)
        topology.declare_own_queues(connection, NODES, settings.topology)
    return path


def url(vhost):
    return f"amqp://guest:guest@127.0.0.1:5672/{vhost}"


def put(vhost, queue, count):
    with kombu.Connection(url(vhost)) as connection:
        producer = connection.Producer()
        for n in range(count):
            producer.publish(json.dumps({"n": n}), routing_key=queue, retry=True)


def status(config, *args):
    result = subprocess.run([str(PROGRAM), "--config-file", str(config), "status", *args],
                            capture_output=True, text=True, timeout=60)
    return result.returncode, result.stdout


def test_status_shows_every_queue_as_the_broker_holds_it_and_names_the_problems(
        vhost, node1):
    put(vhost, "glance_image_sync.node1", 2)  # and nothing consumes node1's queue
    put(vhost, "glance_image_sync.node1.retry.3600s", 2)
    put(vhost, "glance_image_sync.node2.failed", 1)
    put(vhost, "glance_image_sync.node3", 4)  # another node's business
    put(vhost, topology.DEAD_LETTER_QUEUE, 1)
    put(vhost, "glance_notifications.info", 3)

    code, out = status(node1, "--format", "json")
    assert code == 1
    doc = json.loads(out)
    assert doc["broker"] == {"url": f"amqp://guest:****@127.0.0.1:5672/{vhost}",
                             "reachable": True, "error": None, "blocked": None}
    got = {n["node"]: (n["this"], n["queue"]["messages"], n["queue"]["consumers"],
                       n["retrying"], n["failed"]["messages"]) for n in doc["nodes"]}
    assert got == {"node1": (True, 2, 0, 2, 0), "node2": (False, 0, 0, 0, 1),
                   "node3": (False, 4, 0, 0, 0)}
    assert doc["notifications"]["messages"] == 3
    assert doc["dead_letter"]["messages"] == 1
    assert doc["last_success"] is None and doc["last_error"] is None
    assert len(doc["problems"]) == 3, doc["problems"]
    for expected in ("1 event of node2 ran out of attempts",
                     "2 events wait in glance_image_sync.node1 and nothing consumes it",
                     "1 message rejected as malformed or hostile"):
        assert any(expected in problem for problem in doc["problems"]), expected

    code, table = status(node1)
    assert code == 1
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()
            if line.startswith("node")}
    assert rows == {"node": ["queued", "consumers", "retrying", "failed"],
                    "node1": ["*", "2", "0", "2", "0"], "node2": ["0", "0", "0", "1"],
                    "node3": ["4", "0", "0", "0"]}
    assert "notifications (glance_notifications.info): 3 waiting, 0 consumers" in table
    assert "NEEDS ATTENTION:" in table


def test_status_exits_0_while_a_consumer_works_and_1_after_a_failure(vhost, node1, tmp_path):
    put(vhost, "glance_image_sync.node1", 2)
    with kombu.Connection(url(vhost)) as connection:
        channel = connection.channel()
        channel.basic_qos(0, 1, False)  # holds one, unacked; one stays ready
        channel.basic_consume("glance_image_sync.node1", callback=lambda message: None)
        wait_for(lambda: channel.queue_declare("glance_image_sync.node1", passive=True)
                 .message_count == 1, 10, what="one event delivered")

        code, out = status(node1, "--format", "json")
        doc = json.loads(out)
        assert (code, doc["problems"], doc["ok"]) == (0, [], True)
        assert doc["nodes"][0]["queue"] == {"name": "glance_image_sync.node1", "exists": True,
                                            "messages": 1, "consumers": 1}

        state = nodestate.NodeState(str(tmp_path / "state"))
        state.record_success(IMAGE, "installed from node2", when=1000.0)
        state.record_error(IMAGE, "node2: rsync exited 255", when=2000.0)
        code, table = status(node1)
        assert code == 1
        assert f"image {IMAGE}: node2: rsync exited 255" in table
        assert "the last event applied on node1 failed" in table

        state.record_success(IMAGE, "installed from node3", when=3000.0)
        code, table = status(node1)
        assert code == 0, table
        assert f"image {IMAGE}: installed from node3" in table
        assert "OK: nothing needs attention" in table
