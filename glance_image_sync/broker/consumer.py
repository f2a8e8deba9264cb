"""What the fan-out and the sync worker share: consuming one queue safely.

A ``QueueConsumer`` consumes with manual acks and a prefetch limit, publishes
through a ``ConfirmingPublisher`` on the same connection (its own channel, no
waiting), and moves messages it cannot use to the dead-letter queue: the
original body, with the reason in the ``x-gis-reason`` header, acked only
once the broker confirmed the copy.

A delivery is handled once py-amqp's dispatch has returned (``call_soon``),
as is every confirm: a handler may publish, ack, or raise ``Reconnect``, none
of which may happen inside the dispatch of a frame.

Deliveries remember the connection they came on. After a reconnect, work that
finishes for a delivery of the old connection is not acked (the broker has
already put the message back, and it will be handled again, idempotently).
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

from kombu import Consumer
from oslo_log import log as logging

from glance_image_sync.broker import connection as broker
from glance_image_sync.broker import topology
from glance_image_sync.broker.publisher import ConfirmingPublisher
from glance_image_sync.exceptions import Reconnect

LOG = logging.getLogger(__name__)

REASON_HEADER = "x-gis-reason"
QUEUE_HEADER = "x-gis-queue"
NODE_HEADER = "x-gis-node"


@dataclass
class Delivery:
    message: object
    generation: int
    received: float = field(default_factory=time.monotonic)
    settled: bool = False  # acked (or about to be, at the end of this loop turn)
    refreshing: bool = False  # re-queued for consumer_timeout; its copy will do


class AckBatch:
    """The acks of one channel, sent once per turn of the loop.

    A run of consecutive delivery tags goes as one ``basic.ack(multiple)``;
    tags finished out of order (a long transfer ahead of them) go one by one,
    so they never wait for it.
    """

    def __init__(self, channel):
        self.channel = channel
        self._unacked = collections.deque()  # delivered, not acked; ascending
        self._ready = set()

    def delivered(self, tag) -> None:
        self._unacked.append(tag)

    def ack(self, tag) -> None:
        self._ready.add(tag)

    def flush(self) -> None:
        if not self._ready:
            return
        upto = None
        while self._unacked and self._unacked[0] in self._ready:
            upto = self._unacked.popleft()
            self._ready.discard(upto)
        if upto is not None:
            self.channel.basic_ack(upto, multiple=True)
        for tag in sorted(self._ready):
            self.channel.basic_ack(tag)
            self._unacked.remove(tag)
        self._ready.clear()


class QueueConsumer:
    name = "consumer"
    prefetch = 64

    def __init__(self, settings):
        self.settings = settings
        self.nodes = settings.nodes
        self.loop = None
        self.publisher = None
        self.channel = None
        self.acks = None
        self.queue = None
        self.generation = 0
        self.in_flight = 0
        self.handled = 0
        self.rejected = 0
        self.mismatches = {}  # queue or exchange name -> the Mismatch found declaring it

    # -- to be provided by subclasses -------------------------------------

    def declare(self, connection, channel):
        """Declare what is needed; return the kombu Queue to consume."""
        raise NotImplementedError

    def on_delivery(self, delivery: Delivery) -> None:
        raise NotImplementedError

    # -- the component interface of ConnectionLoop ------------------------

    def start(self, connection, loop) -> None:
        self.loop = loop
        self.generation += 1
        self.in_flight = 0
        self.channel = broker.raw_channel(connection)
        self.acks = AckBatch(self.channel)
        self.queue = self.declare(connection, self.channel).bind(self.channel)
        self.publisher = ConfirmingPublisher(connection, defer=loop.call_soon,
                                             blocked=lambda: loop.blocked is not None)
        self.channel.basic_qos(prefetch_size=0, prefetch_count=self.prefetch, a_global=False)
        Consumer(self.channel, queues=[self.queue], on_message=self._on_message,
                 auto_declare=False, no_ack=False).consume()
        LOG.info("%s: consuming %s", self.name, self.queue.name)

    def connection_lost(self) -> None:
        if self.publisher is not None:
            self.publisher.discard()
        self.channel = self.publisher = self.acks = None
        self.in_flight = 0

    def flush(self) -> None:
        """End of a turn of the loop: send the acks it decided."""
        if self.acks is not None:
            self.acks.flush()

    def next_deadline(self):
        return None

    def on_unblocked(self) -> None:
        """The broker takes publishes again: send those held meanwhile."""
        if self.publisher is not None:
            self.publisher.resume()

    def on_timer(self) -> None:
        pass

    def is_drained(self) -> bool:
        self.flush()
        if self.in_flight or self.publisher.pending:
            return False
        # Deliveries sent before the declare-ok are dispatched while waiting
        # for it, so in_flight is up to date when it returns.
        ready = self.queue.queue_declare(passive=True).message_count
        return ready == 0 and not self.in_flight and not self.publisher.pending

    def set_nodes(self, nodes) -> None:
        """Take a reloaded api_nodes (on the connection thread)."""
        self.nodes = nodes

    def report(self, mismatches) -> None:
        """Log each queue declared with other arguments once: it is used as it is."""
        for mismatch in mismatches:
            if mismatch.name not in self.mismatches:
                LOG.error("%s: %s", self.name, mismatch)
            self.mismatches[mismatch.name] = mismatch

    # -- helpers -----------------------------------------------------------

    def _on_message(self, message) -> None:
        self.in_flight += 1
        self.acks.delivered(message.delivery_tag)
        delivery = Delivery(message, self.generation)
        # Handled once py-amqp's dispatch has returned: a handler publishes,
        # and may raise Reconnect, which must not unwind through the dispatch
        # of a frame with py-amqp's state half updated.
        self.loop.call_soon(lambda: self._handle(delivery))

    def _handle(self, delivery) -> None:
        if delivery.generation != self.generation:
            return  # its connection is gone; the broker delivers it again
        try:
            self.on_delivery(delivery)
        except (Reconnect, *broker.ERRORS):
            raise
        except Exception as exc:  # noqa: BLE001 - one message must not stop every node's sync
            # A bug met by one message: stopping would only meet it again on the
            # redelivery after the restart, with every other message stuck behind.
            LOG.exception("%s: unexpected error while handling a message", self.name)
            if self.current(delivery):
                self.dead_letter(delivery, f"internal error: {type(exc).__name__}: {exc}")

    def current(self, delivery: Delivery) -> bool:
        """Whether the delivery can still be acked (same connection, not settled)."""
        return delivery.generation == self.generation and not delivery.settled

    def finish(self, delivery: Delivery, ack: bool = True) -> None:
        """Done with a delivery: ack it, or leave it for the broker to redeliver."""
        if delivery.generation != self.generation:
            return  # its connection is gone; the broker redelivers it
        self.in_flight -= 1
        self.handled += 1
        if ack and not delivery.settled:
            self.settle(delivery)

    def settle(self, delivery: Delivery) -> None:
        """Ack it (at the end of this turn of the loop); never twice."""
        delivery.settled = True
        self.acks.ack(delivery.message.delivery_tag)

    def forward(self, delivery: Delivery, routing_key: str, headers: dict,
                what: str, expiration_ms: int | None = None) -> None:
        """Publish a copy (confirmed, routed), then ack the original."""
        message = delivery.message
        generation = self.generation

        def done(ok, reason):
            if ok:
                self.finish(delivery)
            elif generation == self.generation:
                LOG.error("%s: could not put a message in %s (%s); reconnecting to declare "
                          "the queues again", self.name, what, reason)
                raise Reconnect(f"{what}: {reason}")

        self.publisher.publish(message.body, routing_key, on_done=done, headers=headers,
                               content_type=message.content_type or "application/json",
                               content_encoding=message.content_encoding,
                               expiration_ms=expiration_ms)

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        self.rejected += 1
        LOG.warning("%s: message rejected (%s); moved to %s", self.name, reason,
                    topology.DEAD_LETTER_QUEUE)
        self.forward(delivery, topology.DEAD_LETTER_QUEUE,
                     {REASON_HEADER: reason[:1000], QUEUE_HEADER: self.queue.name,
                      NODE_HEADER: self.nodes.this},
                     "the dead-letter queue")
