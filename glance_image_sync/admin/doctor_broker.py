"""doctor's checks of the broker and of Glance's notification queue.

* each broker of ``transport_url``: a connection with these credentials (the
  password never shown);
* Glance's queue, ``<notification_topic>.info``: it exists (a passive
  declaration), and with the flags the fan-out would give it. For that it is
  declared again, with ``notification_durable``, only once it was found: the
  same flags change nothing, other ones make RabbitMQ answer 406 and change
  nothing either;
* evidence that Glance publishes there. RabbitMQ counts what a queue received
  only in its management API, not over AMQP, so doctor says what it can see:
  notifications waiting in the queue, events waiting in a node's queues, or
  an event this node applied (its state file). None of these: FAIL.
"""

from __future__ import annotations

import dataclasses
import os
import urllib.parse

from glance_image_sync.admin.checks import failed, passed, skipped
from glance_image_sync.admin.tables import iso, plural
from glance_image_sync.broker import connection as brokers
from glance_image_sync.broker import queues as queuestats
from glance_image_sync.broker import topology
from glance_image_sync.exceptions import BrokerUnavailable, NodeStateError
from glance_image_sync.settings import redact_url
from glance_image_sync.state import nodestate
from glance_image_sync.state.records import RECORDS_DIR


def checks(settings) -> list:
    found = [connection_check(settings.broker, url) for url in settings.broker.urls]
    # A TLS check (certificate, CA, host name of [oslo_messaging_rabbit] ssl)
    # belongs here, beside each connection's, once the tool speaks TLS.
    if not any(check.status == "PASS" for check in found):
        return found + [skipped("glance queue", "no broker answered"),
                        skipped("glance publishes", "no broker answered")]
    try:
        overview = queuestats.overview(settings)
    except BrokerUnavailable as exc:
        return found + [failed("glance queue", str(exc), "run doctor again: the broker "
                               "answered a moment ago")]
    found.append(queue_check(settings, overview.notifications))
    found.append(publishing_check(settings, overview))
    return found


def connection_check(broker, url: str):
    name = "broker"
    shown = redact_url(url)
    parsed = urllib.parse.urlsplit(url)
    user, vhost = parsed.username or "guest", parsed.path[1:] or "/"
    try:
        with brokers.connect(dataclasses.replace(broker, urls=(url,))) as connection:
            server = connection.connection.server_properties
            version = f"{server.get('product', 'AMQP')} {server.get('version', '')}".strip()
    except brokers.ERRORS as exc:
        code = getattr(exc, "code", None)
        reason = str(exc) or type(exc).__name__
        if code == 403:
            fix = (f"correct user {user!r} or its password in transport_url ('rabbitmqctl "
                   f"authenticate_user {user} PASSWORD' checks one; RabbitMQ's guest logs "
                   "in from localhost only)")
        elif code == 530:
            fix = (f"create virtual host {vhost!r} or let {user!r} use it: rabbitmqctl "
                   f"set_permissions -p {vhost} {user} '.*' '.*' '.*'")
        else:
            fix = (f"start RabbitMQ on {parsed.hostname}:{parsed.port or 5672}, or correct "
                   "the host and port in transport_url (and let this node reach them)")
        return failed(name, f"{shown}: {reason}", fix)
    return passed(name, f"{shown}: logged in as {user} ({version})")


def queue_check(settings, stats):
    name = "glance queue"
    topo = settings.topology
    if not stats.exists:
        return failed(name, f"{stats.name} does not exist",
                      f"add {topo.topic} to [oslo_messaging_notifications] topics in "
                      "glance-api.conf on every node (README: Setting up Glance) and restart "
                      "glance-api: it declares the queue with its first notification, and "
                      "so does the daemon's fan-out when it starts")
    queue = topology.notification_queue(topo)
    try:
        with brokers.connect(settings.broker) as connection, connection.channel() as channel:
            queue.bind(channel).queue_declare()
    except brokers.ERRORS as exc:
        if getattr(exc, "code", None) != 406:
            return failed(name, f"{stats.name}: {exc}", "run doctor again")
        if "x-queue-type" in str(exc):
            # Glance's rabbit_quorum_queue (Kolla-Ansible sets it): were the queue
            # ever declared by the fan-out instead, Glance's publishes would fail.
            return failed(name, f"{stats.name} is of another type than glance-image-sync "
                          f"declares ({exc})",
                          "give glance-image-sync Glance's [oslo_messaging_rabbit] "
                          "rabbit_quorum_queue, and notification_durable = true, so that it "
                          "declares the queue as Glance does")
        return failed(name, f"{stats.name} exists with other flags than "
                      f"notification_durable = {str(topo.durable).lower()} says ({exc})",
                      "set notification_durable to Glance's [oslo_messaging_rabbit] "
                      "amqp_durable_queues; if the queue itself is wrong, delete it once "
                      "it is empty (rabbitmqctl delete_queue) and let Glance declare it again")
    return passed(name, f"{stats.name} exists ({'durable' if topo.durable else 'not durable'}"
                  f", as notification_durable says): {plural(stats.messages, 'message')} "
                  f"waiting, {plural(stats.consumers, 'consumer')}")


def publishing_check(settings, overview):
    name = "glance publishes"
    waiting = overview.notifications.messages or 0
    if waiting:
        return passed(name, f"{plural(waiting, 'notification')} wait in "
                      f"{overview.notifications.name}")
    events = sum((node.queue.messages or 0) + node.retry_messages + (node.failed.messages or 0)
                 for node in overview.nodes)
    if events:
        return passed(name, f"{plural(events, 'event')} wait in the nodes' queues")
    applied = _last_applied(settings.store.state_dir)
    if applied:
        return passed(name, f"this node applied an event {applied}")
    return failed(name, f"nothing shows it: {overview.notifications.name} and every node's "
                  "queue are empty, and this node never applied an event",
                  "check [oslo_messaging_notifications] in glance-api.conf on every node "
                  "(driver = messagingv2, topics including "
                  f"{settings.topology.topic}, not in disabled_notifications: image.upload, "
                  "image.activate, image.delete; README: Setting up Glance), then upload "
                  "an image and run doctor again")


def _last_applied(state_dir: str) -> str | None:
    try:
        snapshot = nodestate.load(state_dir)
    except NodeStateError:
        snapshot = nodestate.Snapshot()
    times = [r.time for r in (snapshot.last_success, snapshot.last_error) if r]
    if times:
        return f"at {iso(max(times))}"
    try:
        with os.scandir(os.path.join(state_dir, RECORDS_DIR)) as entries:
            if next(entries, None) is not None:
                return "(its per-image records say so)"
    except OSError:
        pass
    return None
