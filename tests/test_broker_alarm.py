"""A broker memory alarm, raised on a RabbitMQ node of the tests' own.

RabbitMQ then blocks every connection that publishes: it stops reading it.
Whatever the fan-out has written stays in the socket's buffers, and a write
beyond them cannot go on. The loop's thread must never wait there: it serves
heartbeats and timers, and the daemon feeds systemd's watchdog only while both
loops show progress. Nor should the fan-out lose its connection over it, and
nothing may be lost once the alarm clears.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import amqp
import kombu
import pytest

from glance_image_sync.broker import connection, topology
from glance_image_sync.fanout.consumer import fanout_loop
from tests.fixtures import notification_files
from tests.helpers import settings_for, write_config
from tests.notifysocket import NotifySocket
from tests.oslonotify import delete_event, notify
from tools.localcluster import wait_for
from tools.rabbitnodes import RabbitNodes

pytestmark = pytest.mark.broker
UPLOAD = next(body for name, body in notification_files()
              if name == "real-glance-33/04-image.upload.json")


@pytest.fixture(scope="module")
def alarm_broker():
    if os.geteuid() != 0:
        pytest.skip("a RabbitMQ node of the tests' own needs root")
    with RabbitNodes(1) as nodes:
        yield nodes


@pytest.fixture
def broker_vhost(alarm_broker):
    name = f"gis-alarm-{uuid.uuid4().hex[:8]}"
    alarm_broker.ctl("add_vhost", name)
    alarm_broker.ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    yield name
    alarm_broker.ctl("delete_vhost", name, check=False)


@contextlib.contextmanager
def memory_alarm(broker):
    """A memory alarm on the node for the block's duration (a watermark of ~0 bytes)."""
    node = broker[0]
    node.ctl("set_vm_memory_high_watermark", "0.000001")
    try:
        wait_for(lambda: "Memory alarm on node" in node.ctl("status").stdout, 30,
                 interval=0.5, what="the memory alarm")
        yield
    finally:
        node.ctl("set_vm_memory_high_watermark", "0.4")


def depths(broker, vhost):
    out = broker.ctl("list_queues", "-p", vhost, "name", "messages").stdout
    return {line.split()[0]: int(line.split()[1]) for line in out.splitlines()
            if len(line.split()) == 2 and line.split()[1].isdigit()}


def blocked_connections(broker):
    return broker.ctl("list_connections", "state").stdout.split().count("blocked")


def publish_uploads(url, count):
    """``count`` upload notifications as Glance sends them, each for another image."""
    message = json.loads(UPLOAD)
    inner = json.loads(message["oslo.message"])
    with kombu.Connection(url) as connection:
        producer = connection.Producer()
        for _ in range(count):
            inner["payload"]["id"] = str(uuid.uuid4())
            inner["message_id"] = str(uuid.uuid4())
            body = json.dumps({**message, "oslo.message": json.dumps(inner)})
            producer.publish(body, exchange="glance", routing_key="glance_notifications.info",
                             content_type="application/json", serializer=None)


def test_a_blocked_broker_keeps_the_fan_outs_connection_and_thread(alarm_broker,
                                                                   broker_vhost, tmp_path,
                                                                   capsys):
    """The fan-out to 200 nodes of 260 notifications would write far more than the
    socket's buffers hold. Before, its writes into the blocked connection timed out
    ('basic_publish: timed out', py-amqp) or the broker dropped it, and it reconnected
    every few seconds for as long as the alarm lasted, each time taking its 256
    notifications again and writing their copies into a connection nobody read."""
    nodes = [f"node{n}" for n in range(1, 201)]
    url = f"amqp://guest:guest@{alarm_broker[0].address}/{broker_vhost}"
    # heartbeat 10 s: an idle loop turns at least every 2.5 s.
    settings = settings_for(tmp_path, api_nodes=",".join(nodes), retry_delays="3600",
                            heartbeat=10,
                            transport_url=f"rabbit://guest:guest@{alarm_broker[0].address}/"
                                          f"{broker_vhost}")
    first = fanout_loop(settings, once=True)
    first.run()  # declares every queue
    first.close()
    publish_uploads(url, 260)
    capsys.readouterr()

    stop = threading.Event()
    loop = fanout_loop(settings, stop_event=stop)
    thread = threading.Thread(target=loop.run)
    try:
        with memory_alarm(alarm_broker):
            thread.start()
            wait_for(lambda: blocked_connections(alarm_broker) >= 1, 30, interval=0.2,
                     what="the broker to block the fan-out's connection")
            # The loop's thread goes on turning for as long as the broker blocks it.
            started, gaps = time.monotonic(), []

            def watched_for_long_enough():
                gaps.append(time.monotonic() - loop.last_progress)
                return time.monotonic() - started > 8

            wait_for(watched_for_long_enough, 20, interval=0.2, what="8 s of watching")
            assert max(gaps) < 4.0, f"the loop's thread stalled {max(gaps):.1f} s"
            # oslo.log's handler (set up by settings_for) writes to stderr.
            during = capsys.readouterr().err
            assert during.count("fan-out: connected to") == 1, during
            assert "reconnecting" not in during, during
            assert loop.blocked is not None  # py-amqp's connection.blocked, recorded
        # Once the alarm clears, every copy is made and every notification acked.
        wait_for(lambda: (d := depths(alarm_broker, broker_vhost))["glance_notifications.info"]
                 == 0 and all(d[topology.node_queue_name(n)] == 260 for n in nodes), 120,
                 interval=0.5, what="every copy of every notification")
    finally:
        loop.stop()
        if thread.is_alive():
            thread.join(15)
        loop.close()
    assert not thread.is_alive(), "the loop did not stop"


def test_a_write_into_a_blocked_connection_fails_after_the_write_timeout(alarm_broker,
                                                                       broker_vhost, tmp_path):
    """The last bound: a write that cannot go on once the socket's buffers are full
    fails within connection.WRITE_TIMEOUT (the loop then reconnects). Measured:
    after about 1 s, with ETIMEDOUT: py-amqp sets TCP_USER_TIMEOUT to 1000 ms."""
    settings = settings_for(tmp_path, transport_url=f"rabbit://guest:guest@"
                                                    f"{alarm_broker[0].address}/{broker_vhost}")
    with memory_alarm(alarm_broker):
        conn, _ = connection.connect(settings.broker)
        try:
            channel = conn.channel()
            body = b"x" * (64 * 1024)
            written, failure = 0, None
            while failure is None and written < 256 * 1024 * 1024:
                started = time.monotonic()
                try:
                    channel.basic_publish(amqp.Message(body), exchange="",
                                          routing_key="routed nowhere")
                except connection.ERRORS as exc:
                    failure = exc
                written += len(body)
            waited = time.monotonic() - started
        finally:
            connection.close(conn, graceful=False)
    assert failure is not None, f"{written} bytes written into a blocked connection"
    assert waited <= connection.WRITE_TIMEOUT + 1, (waited, written, repr(failure))


def test_the_daemon_rides_out_an_alarm_under_the_watchdog_and_loses_nothing(
        alarm_broker, broker_vhost, tmp_path):
    (tmp_path / "images").mkdir()
    glance_url = f"rabbit://guest:guest@{alarm_broker[0].address}/{broker_vhost}"
    config = write_config(tmp_path, transport_url=glance_url,
                          log_file=str(tmp_path / "gis.log"))
    # Glance's notifications wait while no daemon runs (the queue is Glance's own).
    result = notify(glance_url, [delete_event(str(uuid.uuid4())) for _ in range(50)])
    assert result.returncode == 0, result.stderr
    notify_socket = NotifySocket(tmp_path / "notify.sock")
    argv = [sys.executable, "-m", "glance_image_sync", "--config-file", str(config)]
    daemon = None
    try:
        with memory_alarm(alarm_broker):
            daemon = subprocess.Popen(
                [*argv, "daemon"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                text=True, env={"NOTIFY_SOCKET": notify_socket.path,
                                "WATCHDOG_USEC": "2000000", "PATH": "/usr/bin:/bin"})
            wait_for(lambda: any("broker blocked" in t for t in notify_socket.texts()), 30,
                     what="STATUS to say the broker blocks")
            status = subprocess.run([*argv, "status"], capture_output=True, text=True,
                                    timeout=60)
            assert status.returncode == 1
            assert "broker blocked: the broker blocks publishers" in status.stdout
            blocked_at = time.monotonic()
            wait_for(lambda: time.monotonic() - blocked_at > 6, 10, what="6 s blocked")
            pings = [t for t in notify_socket.times_of("WATCHDOG=1") if t >= blocked_at - 1]
            assert len(pings) >= 5 and max(b - a for a, b in zip(pings, pings[1:])) < 2.0
            assert daemon.poll() is None
        wait_for(lambda: (d := depths(alarm_broker, broker_vhost))["glance_notifications.info"]
                 == 0 and d["glance_image_sync.node2"] == d["glance_image_sync.node3"] == 50
                 and d["glance_image_sync.node1"] == 0, 60, interval=0.5,
                 what="every notification fanned out and node1's events applied")
        wait_for(lambda: "broker blocked" not in notify_socket.texts()[-1], 10,
                 what="STATUS to forget the alarm")
    finally:
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            code = daemon.wait(30)
        notify_socket.close()
    assert code == 0
    log = (tmp_path / "gis.log").read_text()
    assert "Traceback" not in log + daemon.stderr.read()
    assert "blocks publishing (connection blocked, see broker logs)" in log
    assert "takes publishes again" in log
