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

Glance's exchange and queue are declared exactly as oslo.messaging's notifier
declares them for the same [oslo_messaging_rabbit] settings (type, durability,
auto-delete, x-arguments), so whichever side starts first, the other's
declaration is equivalent and Glance's publishes never fail. Our own queues
are durable, and quorum queues with rabbit_quorum_queue.

RabbitMQ refuses to declare an existing queue again with other arguments
(406 PRECONDITION_FAILED, and the channel is closed). Then the tool does not
fight: ``declare`` returns a ``Mismatch`` naming the setting that differs, and
the queue is used as it is.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import amqp
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
    """Glance's exchange, as oslo.messaging's notifier declares it."""
    return Exchange(topology.exchange, type="topic", durable=topology.durable,
                    auto_delete=topology.auto_delete)


def notification_queue(topology) -> Queue:
    """Glance's queue, as oslo.messaging's notifier declares it (routing key: its name)."""
    name = notification_queue_name(topology)
    return Queue(name, exchange=notification_exchange(topology), routing_key=name,
                 durable=topology.durable, auto_delete=topology.auto_delete,
                 queue_arguments=dict(topology.notification_arguments))


def _own_queue(name: str, topology, **arguments) -> Queue:
    if topology.quorum:
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


# The [oslo_messaging_rabbit] option behind each property RabbitMQ compares.
SETTING_OF = {
    "durable": "amqp_durable_queues",
    "auto_delete": "amqp_auto_delete",
    "x-queue-type": "rabbit_quorum_queue",
    "x-delivery-limit": "rabbit_quorum_delivery_limit",
    "x-max-in-memory-length": "rabbit_quorum_max_memory_length",
    "x-max-in-memory-bytes": "rabbit_quorum_max_memory_bytes",
}
_INEQUIVALENT = re.compile(r"inequivalent arg '([^']+)'")


@dataclass(frozen=True)
class Mismatch:
    """An exchange or queue that exists with other properties than ours."""

    kind: str  # "queue" or "exchange"
    name: str
    setting: str  # the option whose value differs from the one it was declared with
    detail: str  # the broker's words

    def __str__(self) -> str:
        return (f"{self.kind} {self.name} exists with other arguments than "
                f"[oslo_messaging_rabbit] {self.setting} gives it ({self.detail}); it is "
                f"used as it is: set {self.setting} as Glance has it (or pass Glance's "
                "glance-api.conf as the first --config-file), or delete the queue")


def _mismatch(kind, name, exc) -> Mismatch:
    detail = " ".join(str(getattr(exc, "reply_text", "") or exc).split())
    found = _INEQUIVALENT.search(detail)
    arg = found.group(1) if found else "?"
    return Mismatch(kind, name, SETTING_OF.get(arg, arg), detail)


class Declarer:
    """Declares on a channel of its own, replaced when a refused declaration closes it."""

    def __init__(self, connection):
        self.connection = connection
        self.mismatches = []
        self._channel = None

    def _run(self, kind, name, declare):
        if self._channel is None:
            self._channel = self.connection.channel()
        try:
            declare(self._channel)
        except amqp.exceptions.PreconditionFailed as exc:
            self._channel = None  # the broker closed it
            self.mismatches.append(_mismatch(kind, name, exc))

    def exchange(self, exchange) -> None:
        self._run("exchange", exchange.name, lambda channel: exchange.bind(channel).declare())

    def queue(self, queue, bind=False) -> None:
        """The queue (and its binding, with ``bind``); a refused declaration is recorded."""
        self._run("queue", queue.name, lambda channel: queue.bind(channel).queue_declare())
        if bind:
            self._run("binding", queue.name, lambda channel: queue.bind(channel).queue_bind())

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def declare_notification_queue(connection, topology) -> tuple:
    """(Glance's queue, [Mismatch]): exchange, queue and binding declared as Glance's notifier
    would; an existing one with other arguments is left as it is, and reported once."""
    queue = notification_queue(topology)
    with Declarer(connection) as declarer:
        declarer.exchange(queue.exchange)
        declarer.queue(queue, bind=True)
        mismatches = declarer.mismatches
        if mismatches:
            # RabbitMQ names the first property that differs ('durable', when a
            # quorum queue meets a classic declaration): the setting that would
            # make our declaration equivalent is the one to name.
            setting = _differing_setting(declarer, topology)
            first = next((m for m in mismatches if m.kind == "queue"), mismatches[0])
            name = first.name
            if first.kind == "queue" and any(m.kind == "exchange" for m in mismatches):
                name += f" (and its exchange {queue.exchange.name})"
            mismatches = [dataclasses.replace(first, name=name,
                                              setting=setting or first.setting)]
    return queue, mismatches


def check_notification_queue(declarer, topology) -> None:
    """Declare Glance's existing queue again (no binding, no exchange): a refused
    declaration is recorded in ``declarer``, naming the setting that differs."""
    before = len(declarer.mismatches)
    declarer.queue(notification_queue(topology))
    if len(declarer.mismatches) > before:
        found = declarer.mismatches.pop()
        setting = _differing_setting(declarer, topology)
        del declarer.mismatches[before:]
        declarer.mismatches.append(dataclasses.replace(found, setting=setting or found.setting))


def _differing_setting(declarer, topology) -> str | None:
    """The one setting whose other value declares Glance's existing queue equivalently."""
    quorum = not topology.quorum
    arguments = dict(topology.notification_arguments)
    if quorum:
        arguments["x-queue-type"] = "quorum"
    else:
        arguments = {k: v for k, v in arguments.items()
                     if k not in ("x-queue-type", "x-delivery-limit", "x-max-in-memory-length",
                                  "x-max-in-memory-bytes")}
    candidates = [("rabbit_quorum_queue", dataclasses.replace(
        topology, quorum=quorum, durable=durable,
        notification_arguments=tuple(sorted(arguments.items()))))
        for durable in ((True,) if quorum else (True, False))]
    if not topology.quorum:
        candidates.append(("amqp_durable_queues",
                           dataclasses.replace(topology, durable=not topology.durable)))
    candidates.append(("amqp_auto_delete",
                       dataclasses.replace(topology, auto_delete=not topology.auto_delete)))
    for setting, other in candidates:
        before = len(declarer.mismatches)
        declarer.queue(notification_queue(other))
        if len(declarer.mismatches) == before:
            return setting
    return None


def declare_own_queues(connection, nodes, topology) -> list:
    """Declare every node's queues and the dead-letter queue (idempotent); [Mismatch]."""
    with Declarer(connection) as declarer:
        for node in nodes:
            for queue in node_queues(node, topology):
                declarer.queue(queue)
        declarer.queue(dead_letter_queue(topology))
    return declarer.mismatches
