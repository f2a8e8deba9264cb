"""The fan-out against the real RabbitMQ: formats, flags, confirms, returns."""

import json
import subprocess
import threading

import kombu
import pytest
from oslo_config import cfg

from glance_image_sync import service
from glance_image_sync.broker import topology
from glance_image_sync.cmd import commands as cli
from glance_image_sync.fanout import notifications
from glance_image_sync.fanout.consumer import fanout_loop
from tests.fixtures import notification_files
from tests.test_notifications import EXPECTED
from tools.localcluster import rabbitmqctl, wait_for

pytestmark = pytest.mark.broker
NODES = ("node1", "node2", "node3")


def settings_for(vhost, tmp_path, **options):
    values = {"api_nodes": ",".join(NODES), "host": "node1",
              "transport_url": f"rabbit://guest:guest@127.0.0.1:5672/{vhost}",
              "state_dir": str(tmp_path / "state"), **options}
    path = tmp_path / "test.conf"
    path.write_text("[DEFAULT]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()))
    return service.prepare(cfg.ConfigOpts(), ["--config-file", str(path), "both"],
                           cli.COMMAND_OPT)


def url(vhost):
    return f"amqp://guest:guest@127.0.0.1:5672/{vhost}"


def drain(vhost, queue):
    """Every message in ``queue``: [(body, headers)], acked."""
    found = []
    with kombu.Connection(url(vhost)) as connection:
        channel = connection.channel()
        while (message := channel.basic_get(queue)) is not None:
            found.append((message.body, message.headers))
            channel.basic_ack(message.delivery_tag)
    return found


def exchange_flags(vhost):
    out = rabbitmqctl("list_exchanges", "-p", vhost, "name", "durable").stdout
    return dict(line.split() for line in out.splitlines() if line.startswith("glance"))


def publish(vhost, bodies, routing_key="glance_notifications.info"):
    with kombu.Connection(url(vhost)) as connection:
        producer = connection.Producer()
        for body in bodies:
            producer.publish(body, exchange="glance", routing_key=routing_key,
                             content_type="application/json", serializer=None)


def test_every_captured_notification_is_fanned_out_as_its_event(vhost, tmp_path):
    settings = settings_for(vhost, tmp_path)
    loop = fanout_loop(settings, once=True)
    loop.run()  # declares the exchange and queue the way Glance would
    publish(vhost, [body for _, body in notification_files()])
    loop.run()
    loop.close()

    expected = [(name, kind, image) for name, (kind, image) in sorted(EXPECTED.items())
                if kind != "ignored"]
    for node in NODES:
        events = [json.loads(body) for body, _ in drain(vhost, topology.node_queue_name(node))]
        assert len(events) == len(expected)
        # A delete carries what Glance said of the file, where it said it (the trash
        # records it); compared here is what each node must do.
        got = sorted((e["action"], e["image_id"],
                      e["checksum"] if e["action"] == "present" else None,
                      e["size"] if e["action"] == "present" else None) for e in events)
        want = sorted((kind, image[0], image[1] if kind == "present" else None,
                       image[2] if kind == "present" else None)
                      for _, kind, image in expected)
        assert got == want
    assert loop.component.rejected == 0
    assert drain(vhost, "glance_notifications.info") == []


def test_glances_exchange_is_never_made_durable_and_glance_can_still_publish(vhost, tmp_path):
    loop = fanout_loop(settings_for(vhost, tmp_path), once=True)
    loop.run()
    loop.close()
    assert exchange_flags(vhost) == {"glance": "false"}
    # Glance (oslo.messaging, amqp_durable_queues = false) publishes without a 406.
    _oslo_notify(vhost)
    assert len(drain(vhost, "glance_notifications.info")) == 1


def test_an_existing_durable_setup_is_used_as_it_is(vhost, tmp_path):
    # Glance with amqp_durable_queues = true declared everything durable first.
    _oslo_notify(vhost, durable=True)
    loop = fanout_loop(settings_for(vhost, tmp_path), once=True)  # configured non-durable
    loop.run()
    loop.close()
    assert exchange_flags(vhost) == {"glance": "true"}
    assert loop.component.handled == 1
    assert len(drain(vhost, topology.node_queue_name("node2"))) == 1


def _oslo_notify(vhost, durable=False):
    """One image.upload published by oslo.messaging in a separate process."""
    script = f"""
import oslo_messaging
from oslo_config import cfg
conf = cfg.ConfigOpts()
conf([])
oslo_messaging.set_transport_defaults("glance")
transport = oslo_messaging.get_notification_transport(
    conf, url="rabbit://guest:guest@127.0.0.1:5672/{vhost}")
conf.set_override("amqp_durable_queues", {durable}, group="oslo_messaging_rabbit")
notifier = oslo_messaging.Notifier(transport, publisher_id="image.node2",
                                   driver="messagingv2", topics=["glance_notifications"])
notifier.info({{}}, "image.upload", {{"id": "b90e9b0f-36ce-43c1-b08c-9b4201f6571f",
    "status": "active", "checksum": "9b8f6225e89197b8d67aafd6f91ce7bf", "size": 4194304}})
transport.cleanup()
"""
    import sys
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60,
                   capture_output=True)


def test_a_copy_that_cannot_be_routed_leaves_the_notification_for_a_redelivery(vhost,
                                                                              tmp_path):
    settings = settings_for(vhost, tmp_path)
    stop = threading.Event()
    loop = fanout_loop(settings, stop_event=stop)
    thread = threading.Thread(target=loop.run)
    thread.start()
    try:
        wait_for(lambda: loop.connected, 20, what="the fan-out to connect")
        # An operator deletes node3's queue while the fan-out runs.
        rabbitmqctl("delete_queue", "-p", vhost, topology.node_queue_name("node3"))
        publish(vhost, [body for name, body in notification_files()
                        if name == "real-glance-33/04-image.upload.json"])
        # The copy to node3 comes back unroutable: the notification is not
        # acked; the fan-out reconnects, declares node3's queue again, and the
        # redelivered notification reaches every node.
        wait_for(lambda: loop.component.handled >= 1, 30, what="the redelivery")
    finally:
        loop.stop()
        thread.join(30)
        loop.close()
    assert not thread.is_alive()
    for node in NODES:
        assert len(drain(vhost, topology.node_queue_name(node))) >= 1, node
    assert drain(vhost, "glance_notifications.info") == []


def test_a_body_in_a_hostile_encoding_is_dead_lettered_as_the_bytes_that_came(vhost, tmp_path):
    """py-amqp would decode a body with the codec its content_encoding names;
    raw_unicode_escape gives text that cannot be encoded back, which once
    stopped the fan-out at that message, every time it was redelivered."""
    settings = settings_for(vhost, tmp_path)
    loop = fanout_loop(settings, once=True)
    loop.run()
    hostile = [("raw_unicode_escape", b"\\ud800 not json"), ("latin-1", b"caf\xe9"),
               ("utf-16", '{"event_type": "image.upload"}'.encode("utf-16"))]
    with kombu.Connection(url(vhost)) as connection:
        channel = connection.channel()
        for encoding, body in hostile:
            channel.basic_publish(channel.prepare_message(
                body, content_type="application/json", content_encoding=encoding),
                exchange="glance", routing_key="glance_notifications.info")
    publish(vhost, [body for name, body in notification_files()
                    if name == "real-glance-33/04-image.upload.json"])
    loop.run()
    loop.close()

    assert loop.component.rejected == 3
    assert loop.component.handled == 4
    for node in NODES:  # the good notification behind them went through
        assert len(drain(vhost, topology.node_queue_name(node))) == 1
    with kombu.Connection(url(vhost)) as connection:
        channel = connection.channel()
        channel.auto_decode = False
        parked = []
        while (message := channel.basic_get(topology.DEAD_LETTER_QUEUE)) is not None:
            parked.append((message.properties.get("content_encoding"), message.body))
            channel.basic_ack(message.delivery_tag)
    assert parked == hostile
    assert drain(vhost, "glance_notifications.info") == []


def test_a_message_that_meets_a_bug_is_dead_lettered_and_the_rest_go_on(vhost, tmp_path,
                                                                      monkeypatch):
    """A daemon that stopped on it would meet it again after every restart."""
    settings = settings_for(vhost, tmp_path)
    loop = fanout_loop(settings, once=True)
    loop.run()
    parse = notifications.parse

    def parse_with_a_bug(body, nodes):
        if b"sacrificial" in bytes(body):
            raise KeyError("a bug")
        return parse(body, nodes)

    monkeypatch.setattr(notifications, "parse", parse_with_a_bug)
    good = [body for name, body in notification_files()
            if name == "real-glance-33/04-image.upload.json"]
    publish(vhost, [b'{"sacrificial": true}'] + good)
    loop.run()
    loop.close()

    assert loop.component.handled == 2
    for node in NODES:
        assert len(drain(vhost, topology.node_queue_name(node))) == 1
    assert drain(vhost, topology.DEAD_LETTER_QUEUE) == [
        (b'{"sacrificial": true}',
         {"x-gis-reason": "internal error: KeyError: 'a bug'",
          "x-gis-queue": "glance_notifications.info", "x-gis-node": "node1"})]
