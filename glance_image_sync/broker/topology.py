"""Exchanges and queues: their names and how they are declared, nothing else.

::

  exchange <notification_exchange> (Glance's; topic)
    └─ queue <notification_topic>.info        Glance declares it; the fan-out reads it
  default exchange
    ├─ glance_image_sync.<node>               durable, one per api node: its events
    ├─ glance_image_sync.<node>.retry.<N>s    holds a failed event N seconds, then
    │                                         dead-letters it back to the node queue
    ├─ glance_image_sync.<node>.failed        events that ran out of attempts
    └─ glance_image_sync.dead_letter          messages rejected as malformed or hostile

``glance_image_sync.<node>.info`` was the 2013 tool's per-node queue: never
declared here, only reported by ``status`` when it is left over.

Glance's exchange and queue are never declared with flags of our choosing when
they exist: a durable re-declaration of a non-durable exchange makes every later
Glance publish fail with 406 PRECONDITION_FAILED (and Glance only logs it). We
declare them passively and create them, with Glance's flags from the
configuration, only when they are missing.
"""

from __future__ import annotations

from kombu import Exchange, Queue

PREFIX = "glance_image_sync"
DEAD_LETTER_QUEUE = f"{PREFIX}.dead_letter"


def node_queue_name(node: str) -> str:
    return f"{PREFIX}.{node}"


def retry_queue_name(node: str, delay: int) -> str:
    # The delay is in the name: a changed retry_delays makes new queues
    # instead of a 406 on the old ones' x-message-ttl.
    return f"{PREFIX}.{node}.retry.{delay}s"


def failed_queue_name(node: str) -> str:
    return f"{PREFIX}.{node}.failed"


def legacy_queue_name(node: str) -> str:
    """A node's queue as the 2013 cron tool named it; nothing reads it any more."""
    return f"{PREFIX}.{node}.info"


def notification_queue_name(topology) -> str:
    return f"{topology.topic}.info"


def notification_exchange(topology) -> Exchange:
    return Exchange(topology.exchange, type="topic", durable=topology.durable,
                    auto_delete=False)


def notification_queue(topology) -> Queue:
    name = notification_queue_name(topology)
    return Queue(name, exchange=notification_exchange(topology), routing_key=name,
                 durable=topology.durable, auto_delete=False)


def _own_queue(name: str, topology, **arguments) -> Queue:
    if topology.queue_type == "quorum":
        arguments["x-queue-type"] = "quorum"
    return Queue(name, durable=True, auto_delete=False, queue_arguments=arguments or None)


def node_queues(node: str, topology) -> list:
    """A node's queue, its retry queues and its failed queue."""
    main = node_queue_name(node)
    retries = [
        _own_queue(retry_queue_name(node, delay), topology,
                   **{"x-message-ttl": delay * 1000,
                      "x-dead-letter-exchange": "",
                      "x-dead-letter-routing-key": main})
        for delay in sorted(set(topology.retry_delays))
    ]
    return [_own_queue(main, topology), *retries,
            _own_queue(failed_queue_name(node), topology)]


def dead_letter_queue(topology) -> Queue:
    return _own_queue(DEAD_LETTER_QUEUE, topology)


def declare_notification_queue(connection, topology) -> Queue:
    """Make sure Glance's notification queue exists and is bound; return it.

    Passive first, so an existing exchange or queue keeps the flags Glance gave
    it. A passive declaration of a missing entity closes its channel, so each
    try gets a fresh one.
    """
    queue = notification_queue(topology)
    if _exists(connection, lambda channel: queue.bind(channel).queue_declare(passive=True)):
        return queue
    if not _exists(connection, lambda channel: queue.exchange.bind(channel).declare(passive=True)):
        with connection.channel() as channel:
            queue.exchange.bind(channel).declare()
    with connection.channel() as channel:
        bound = queue.bind(channel)
        bound.queue_declare()
        bound.queue_bind()
    return queue


def _exists(connection, passive_declare) -> bool:
    with connection.channel() as channel:
        try:
            passive_declare(channel)
        except connection.channel_errors as exc:
            if getattr(exc, "code", None) == 404:
                return False
            raise
    return True


def declare_own_queues(channel, nodes, topology) -> None:
    """Declare every node's queues and the dead-letter queue (idempotent)."""
    for node in nodes:
        for queue in node_queues(node, topology):
            queue.bind(channel).declare()
    dead_letter_queue(topology).bind(channel).declare()
