"""doctor's checks of the broker and of Glance's notification queue.

* each broker of ``transport_url``: a connection with these credentials (the
  password never shown), over TLS with [oslo_messaging_rabbit] ssl: a
  certificate, CA or host name that does not fit fails here, with the reason;
* Glance's queue, ``<notification_topic>.info``: it exists (a passive
  declaration), and with the arguments oslo.messaging's notifier gives it for
  the [oslo_messaging_rabbit] settings. For that it is declared again as the
  fan-out declares it, only once it was found: the same arguments change
  nothing, other ones make RabbitMQ answer 406 and change nothing either (the
  setting that differs is named);
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
from glance_image_sync.exceptions import BrokerRefused, BrokerUnavailable, NodeStateError
from glance_image_sync.settings import redact_url
from glance_image_sync.state import nodestate
from glance_image_sync.state.records import RECORDS_DIR


def checks(settings) -> list:
    found = [connection_check(settings.broker, url) for url in settings.broker.urls]
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
        with brokers.connected(dataclasses.replace(broker, urls=(url,))) as connection:
            server = connection.connection.server_properties
            version = f"{server.get('product', 'AMQP')} {server.get('version', '')}".strip()
    except BrokerRefused as exc:
        return failed(name, str(exc),
                      f"correct user {user!r} or its password in transport_url ('rabbitmqctl "
                      f"authenticate_user {user} PASSWORD' checks one; RabbitMQ's guest logs "
                      "in from localhost only)")
    except (BrokerUnavailable, *brokers.ERRORS) as exc:
        reason = str(exc) or type(exc).__name__
        if "(530)" in reason:
            fix = (f"create virtual host {vhost!r} or let {user!r} use it: rabbitmqctl "
                   f"set_permissions -p {vhost} {user} '.*' '.*' '.*'")
        elif "SSL" in reason:
            fix = ("check [oslo_messaging_rabbit] ssl_ca_file (the CA that signed the "
                   "broker's certificate), that the certificate names the host of "
                   "transport_url and is in date, and ssl_cert_file/ssl_key_file if the "
                   "broker asks for a client certificate")
        else:
            fix = (f"start RabbitMQ on {parsed.hostname}:{parsed.port or 5672}, or correct "
                   "the host and port in transport_url (and let this node reach them)")
        return failed(name, reason if reason.startswith(shown) else f"{shown}: {reason}", fix)
    tls = " over TLS" if broker.tls else ""
    return passed(name, f"{shown}: logged in as {user}{tls} ({version})")


def queue_check(settings, stats):
    name = "glance queue"
    topo = settings.topology
    if not stats.exists:
        return failed(name, f"{stats.name} does not exist",
                      f"add {topo.topic} to [oslo_messaging_notifications] topics in "
                      "glance-api.conf on every node (README: Setting up Glance) and restart "
                      "glance-api: it declares the queue with its first notification, and "
                      "so does the daemon's fan-out when it starts")
    try:
        with brokers.connected(settings.broker) as connection, \
                topology.Declarer(connection) as declarer:
            topology.check_notification_queue(declarer, topo)
    except (BrokerUnavailable, *brokers.ERRORS) as exc:
        return failed(name, f"{stats.name}: {brokers.describe(exc)}", "run doctor again")
    if declarer.mismatches:
        mismatch = declarer.mismatches[0]
        return failed(name, f"{stats.name} exists with other arguments than "
                      f"[oslo_messaging_rabbit] {mismatch.setting} gives it "
                      f"({mismatch.detail})",
                      f"give glance-image-sync Glance's own {mismatch.setting}: pass Glance's "
                      "glance-api.conf as the first --config-file (README: RabbitMQ as "
                      "clouds run it); if the queue itself is wrong, delete it once it is "
                      "empty (rabbitmqctl delete_queue) and let Glance declare it again")
    kind = "quorum" if topo.quorum else "durable" if topo.durable else "not durable"
    return passed(name, f"{stats.name} exists ({kind}, as [oslo_messaging_rabbit] says): "
                  f"{plural(stats.messages, 'message')} waiting, "
                  f"{plural(stats.consumers, 'consumer')}")


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
