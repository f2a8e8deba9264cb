"""Publishing with broker confirms, without ever waiting for one.

kombu's ``confirm_publish`` waits for each confirm inside ``basic_publish``:
called from a consumer's handler, that wait reads (and dispatches) the next
deliveries re-entrantly, and it costs a round trip per message. Here the
channel is put in confirm mode once and ``publish`` only sends
(``basic_publish(mandatory=True)``); the broker's ``basic.ack``,
``basic.nack`` and ``basic.return`` arrive later through py-amqp's event
hooks, in whatever turn of the loop reads them, and settle each publish.

Contract: ``on_done(ok, reason)`` is called exactly once per publish, on the
connection's thread and never inside py-amqp's dispatch of a frame (it is
handed to ``defer``): ``ok`` when the broker confirmed the message *and*
routed it to a queue, otherwise False with the reason (nacked, or returned as
unroutable). If the connection dies first it is never called: the caller
then leaves its source message unacked, so the broker delivers it again.

While ``blocked()`` says the broker blocks publishing (a resource alarm),
publishes are held in order and sent by ``resume()``: a blocked broker
stops reading the connection, and writing into it would only fill the
socket's buffers until the write times out. RabbitMQ says so only once it
has read a publish, so the bytes published and not yet confirmed are
bounded too (``MAX_UNCONFIRMED_BYTES``): beyond, publishes are held until
confirms come back, and a blocked broker finds at most that much in the
socket's buffers.
"""

from __future__ import annotations

import collections
import itertools
from collections import OrderedDict

import amqp

# Publishes sent and not yet confirmed, in body bytes, before the next waits for
# confirms: far below what a connection's socket buffers hold, and far above
# what confirms in flight need to keep the fan-out's pace.
MAX_UNCONFIRMED_BYTES = 1 << 20


class _Pending:
    __slots__ = ("exchange", "routing_key", "on_done", "returned", "size")

    def __init__(self, exchange, routing_key, on_done, size=0):
        self.exchange, self.routing_key, self.on_done = exchange, routing_key, on_done
        self.returned = None
        self.size = size


class Confirmations:
    """Which publishes a confirm or a return settles: bookkeeping, no I/O.

    A channel in confirm mode numbers its publishes 1, 2, 3, ...; the broker
    confirms them by that number, several at once with ``multiple``.
    """

    def __init__(self):
        self._tags = itertools.count(1)
        # delivery tag -> _Pending, in publish order (the order of confirms).
        self._pending = OrderedDict()
        self.unconfirmed_bytes = 0

    def __len__(self) -> int:
        return len(self._pending)

    def published(self, exchange: str, routing_key: str, on_done, size: int = 0) -> int:
        """Record a publish (of ``size`` body bytes) just sent; return its delivery tag."""
        tag = next(self._tags)
        self._pending[tag] = _Pending(exchange, routing_key, on_done, size)
        self.unconfirmed_bytes += size
        return tag

    def returned(self, exchange: str, routing_key: str, reason: str) -> None:
        """A basic.return: the oldest unsettled publish to that destination is unroutable.

        RabbitMQ handles a channel's publishes in order and sends basic.return
        before the basic.ack of the same message.
        """
        for entry in self._pending.values():
            if (entry.returned is None and entry.routing_key == routing_key
                    and entry.exchange == exchange):
                entry.returned = reason
                return

    def settle(self, delivery_tag: int, multiple: bool, nacked: bool) -> list:
        """A basic.ack or basic.nack: [(on_done, ok, reason)] of each publish it settles."""
        if multiple:
            tags = list(itertools.takewhile(lambda t: t <= delivery_tag, self._pending))
        else:
            tags = [delivery_tag] if delivery_tag in self._pending else []
        settled = []
        for tag in tags:
            entry = self._pending.pop(tag)
            self.unconfirmed_bytes -= entry.size
            if nacked:
                settled.append((entry.on_done, False, "the broker refused it (nack)"))
            elif entry.returned is not None:
                settled.append((entry.on_done, False, entry.returned))
            else:
                settled.append((entry.on_done, True, ""))
        return settled


class ConfirmingPublisher:
    def __init__(self, connection, defer, blocked=None):
        """``connection``: a connected kombu Connection; ``defer(fn)`` runs ``fn()``
        on the connection's thread once py-amqp's dispatch has returned;
        ``blocked()``: True while the broker blocks publishing."""
        self.channel = connection.channel()
        self.channel.confirm_select()
        self.channel.events["basic_ack"].add(self._on_ack)
        self.channel.events["basic_nack"].add(self._on_nack)
        self.channel.events["basic_return"].add(self._on_return)
        self.confirmations = Confirmations()
        self._defer = defer
        self._blocked = blocked or (lambda: False)
        self._held = collections.deque()  # (message, exchange, routing key, on_done)

    @property
    def pending(self) -> int:
        """Publishes not settled yet: sent and unconfirmed, or held."""
        return len(self.confirmations) + len(self._held)

    def publish(self, body: bytes, routing_key: str, on_done, exchange: str = "",
                headers=None, content_type: str = "application/json",
                content_encoding: str | None = "utf-8",
                expiration_ms: int | None = None) -> None:
        """Publish ``body`` (bytes) to ``routing_key``, persistent; see the module's contract."""
        properties = {"content_type": content_type, "delivery_mode": 2}
        if content_encoding is not None:
            properties["content_encoding"] = content_encoding
        if headers:
            properties["application_headers"] = dict(headers)
        if expiration_ms is not None:
            properties["expiration"] = str(expiration_ms)
        message = amqp.Message(body, **properties)
        self._held.append((message, exchange, routing_key, on_done))
        self.resume()

    def discard(self) -> None:
        """The connection is gone: forget what is held (its sources are redelivered)."""
        self._held.clear()

    def resume(self) -> None:
        """Send what is held, in order, as far as the broker and the window allow."""
        while self._held and not self._blocked() and (
                not self.confirmations
                or self.confirmations.unconfirmed_bytes < MAX_UNCONFIRMED_BYTES):
            message, exchange, routing_key, on_done = self._held.popleft()
            self.confirmations.published(exchange, routing_key, on_done, len(message.body))
            self.channel.basic_publish(message, exchange=exchange, routing_key=routing_key,
                                       mandatory=True)

    def _settled(self, delivery_tag, multiple, nacked) -> None:
        for on_done, ok, reason in self.confirmations.settle(delivery_tag, multiple, nacked):
            self._defer(lambda on_done=on_done, ok=ok, reason=reason: on_done(ok, reason))
        if self._held:  # the window opened: send on, once the dispatch has returned
            self._defer(self.resume)

    # py-amqp's event hooks: called inside its dispatch, so they only record.

    def _on_ack(self, delivery_tag, multiple):
        self._settled(delivery_tag, multiple, nacked=False)

    def _on_nack(self, delivery_tag, multiple):
        self._settled(delivery_tag, multiple, nacked=True)

    def _on_return(self, exc, exchange, routing_key, message):
        self.confirmations.returned(
            exchange, routing_key,
            f"unroutable: no queue {routing_key!r} on exchange {exchange!r} ({exc})")
