"""How many messages wait in the queues of glance-image-sync, and who reads them.

Read-only: every queue is looked at with a passive declaration on a short
connection of its own, so nothing is created or consumed, and a queue that
does not exist is reported as missing (RabbitMQ closes the channel of a
passive declaration that finds nothing; the next queue gets a new one).
``status`` and the metrics both read the broker through here.

With ``check``, Glance's queue and this node's own queues, where they exist,
are also declared again as the settings declare them: an equivalent
declaration changes nothing, and one that RabbitMQ refuses is a ``Mismatch``
for ``status`` to report.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

import amqp

from glance_image_sync.broker import connection as brokers
from glance_image_sync.broker import topology
from glance_image_sync.exceptions import BrokerUnavailable

PROBE_ROUTING_KEY = f"{topology.PREFIX}.probe (routed nowhere)"
PROBE_TIMEOUT = 5.0


@dataclass(frozen=True)
class QueueStats:
    name: str
    messages: int | None = None  # None: the queue does not exist
    consumers: int | None = None

    @property
    def exists(self) -> bool:
        return self.messages is not None


@dataclass(frozen=True)
class NodeQueues:
    """The queues of one api node: its events, those waiting to retry, those parked."""

    node: str
    queue: QueueStats
    retrying: tuple  # QueueStats of each retry queue
    failed: QueueStats

    @property
    def retry_messages(self) -> int:
        return sum(q.messages or 0 for q in self.retrying)


    @property
    def exists(self) -> bool:
        return any(q.exists for q in (self.queue, *self.retrying, self.failed))

    @property
    def messages(self) -> int:
        return sum(q.messages or 0 for q in (self.queue, *self.retrying, self.failed))


@dataclass(frozen=True)
class Overview:
    notifications: QueueStats
    nodes: tuple  # NodeQueues, in api_nodes order
    dead_letter: QueueStats
    departed: tuple = ()  # NodeQueues of known nodes not in api_nodes whose queues exist
    legacy: tuple = ()  # QueueStats of the 2013 tool's per-node queues that exist
    mismatches: tuple = ()  # topology.Mismatch, with check=True
    blocked: str | None = None  # with check=True: why the broker blocks publishers, if it does

    def all_queues(self):
        yield self.notifications
        for node in self.nodes:
            yield node.queue
            yield from node.retrying
            yield node.failed
        yield self.dead_letter


def overview(settings, known_nodes=(), check=False) -> Overview:
    """Every queue of the cluster as the broker sees it now; BrokerUnavailable if unreachable.

    ``known_nodes``: names queues were once declared for (``state.knownnodes``);
    those not in api_nodes whose queues still exist are ``departed``. ``check``:
    see the module's docstring.
    """
    topo = settings.topology
    names = [topology.notification_queue_name(topo), topology.DEAD_LETTER_QUEUE]
    departed = [node for node in known_nodes if settings.nodes.resolve(node) != node]
    per_node = {}
    for node in (*settings.nodes.all, *departed):
        main, *retries, failed = [q.name for q in topology.node_queues(node, topo)]
        per_node[node] = (main, retries, failed)
        names += [main, *retries, failed]
    legacy = [topology.legacy_queue_name(node) for node in per_node]
    checked = ([topology.dead_letter_queue(topo),
                *topology.node_queues(settings.nodes.this, topo)] if check else [])
    found, mismatches, blocked = inspect(settings.broker, names + legacy, checked,
                                         topo if check else None)
    queues = {node: NodeQueues(node, found[main], tuple(found[r] for r in retries),
                               found[failed])
              for node, (main, retries, failed) in per_node.items()}
    return Overview(
        notifications=found[names[0]],
        nodes=tuple(queues[node] for node in settings.nodes.all),
        dead_letter=found[topology.DEAD_LETTER_QUEUE],
        departed=tuple(queues[node] for node in departed if queues[node].exists),
        legacy=tuple(found[name] for name in legacy if found[name].exists),
        mismatches=tuple(mismatches),
        blocked=blocked,
    )


def read(broker, names) -> dict:
    """{name: QueueStats} for each queue name; BrokerUnavailable if unreachable."""
    return inspect(broker, names)[0]


def inspect(broker, names, check=(), glance=None) -> tuple:
    """({name: QueueStats} for each queue name, [Mismatch] among the ``check`` queues
    that exist, why the broker blocks publishers or None); BrokerUnavailable if
    unreachable. With ``glance`` (TopologySettings), Glance's queue is checked
    too, and whether the broker blocks publishers is asked."""
    blocked = []
    connection, index = brokers.connect(broker, on_blocked=blocked.append,
                                        on_unblocked=blocked.clear)
    try:
        try:
            found = _declare_passively(connection, names)
            with topology.Declarer(connection) as declarer:
                for queue in check:
                    if found[queue.name].exists:
                        declarer.queue(queue)
                if glance is not None and found[topology.notification_queue_name(glance)].exists:
                    topology.check_notification_queue(declarer, glance)
            if glance is not None:
                _probe_publishing(connection, blocked)
            return found, declarer.mismatches, (blocked[0] if blocked else None)
        finally:
            brokers.close(connection, graceful=not blocked)
    except brokers.ERRORS as exc:
        reason = brokers.describe(exc)
    raise BrokerUnavailable(f"{brokers.redact_url(broker.urls[index])}: {reason}")


def _probe_publishing(connection, blocked) -> None:
    """Publish one unroutable message, confirmed: the broker acks it at once, unless a
    resource alarm blocks publishers, when it sends connection.blocked (``blocked``)."""
    channel = connection.channel()
    channel.confirm_select()
    acked = []
    channel.events["basic_ack"].add(lambda *_: acked.append(True))
    # No queue is named so: the default exchange drops it, and nothing changes.
    channel.basic_publish(amqp.Message(b""), exchange="", routing_key=PROBE_ROUTING_KEY)
    deadline = time.monotonic() + PROBE_TIMEOUT
    while not acked and not blocked and time.monotonic() < deadline:
        try:
            connection.drain_events(timeout=max(0.01, deadline - time.monotonic()))
        except socket.timeout:
            break
    if not acked and not blocked:
        blocked.append(f"no confirm of a publish within {PROBE_TIMEOUT:.0f} s")


def _declare_passively(connection, names) -> dict:
    found = {}
    channel = None
    for name in names:
        if channel is None:
            channel = connection.channel()
        try:
            _, messages, consumers = channel.queue_declare(queue=name, passive=True)
        except connection.channel_errors as exc:
            if getattr(exc, "code", None) != 404:
                raise
            channel = None  # the broker closed it
            found[name] = QueueStats(name)
        else:
            found[name] = QueueStats(name, messages, consumers)
    if channel is not None:
        channel.close()
    return found
