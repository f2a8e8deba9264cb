"""How many messages wait in the queues of glance-image-sync, and who reads them.

Read-only: every queue is looked at with a passive declaration on a short
connection of its own, so nothing is created, re-declared or consumed, and a
queue that does not exist is reported as missing (RabbitMQ closes the channel
of a passive declaration that finds nothing; the next queue gets a new one).
``status`` and the metrics both read the broker through here.
"""

from __future__ import annotations

from dataclasses import dataclass

from glance_image_sync.broker import connection as brokers
from glance_image_sync.broker import topology
from glance_image_sync.exceptions import BrokerUnavailable


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

    def all_queues(self):
        yield self.notifications
        for node in self.nodes:
            yield node.queue
            yield from node.retrying
            yield node.failed
        yield self.dead_letter


def overview(settings, known_nodes=()) -> Overview:
    """Every queue of the cluster as the broker sees it now; BrokerUnavailable if unreachable.

    ``known_nodes``: names queues were once declared for (``state.knownnodes``);
    those not in api_nodes whose queues still exist are ``departed``.
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
    found = read(settings.broker, names + legacy)
    queues = {node: NodeQueues(node, found[main], tuple(found[r] for r in retries),
                               found[failed])
              for node, (main, retries, failed) in per_node.items()}
    return Overview(
        notifications=found[names[0]],
        nodes=tuple(queues[node] for node in settings.nodes.all),
        dead_letter=found[topology.DEAD_LETTER_QUEUE],
        departed=tuple(queues[node] for node in departed if queues[node].exists),
        legacy=tuple(found[name] for name in legacy if found[name].exists),
    )


def read(broker, names) -> dict:
    """{name: QueueStats} for each queue name; BrokerUnavailable if unreachable."""
    try:
        with brokers.connect(broker) as connection:
            return _declare_passively(connection, names)
    except brokers.ERRORS as exc:
        reason = str(exc) or type(exc).__name__
    raise BrokerUnavailable(f"{broker.redacted()}: {reason}")


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
