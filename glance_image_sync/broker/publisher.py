"""Publishing with broker confirms, without ever waiting inside a callback.

kombu's ``confirm_publish`` waits for each confirm inside ``basic_publish``;
called from a consumer callback that wait reads (and dispatches) the next
deliveries re-entrantly, and it costs a round trip per message. Here the
channel is put in confirm mode once and ``publish`` only sends: the broker's
``basic.ack`` / ``basic.nack`` / ``basic.return`` arrive later through the
connection's normal event loop and settle each publish.

Contract: every message is published ``mandatory``; ``on_done(ok, reason)`` is
called exactly once per publish, on the connection thread: ``ok`` when the
broker confirmed it *and* routed it to a queue, otherwise ``ok`` is False
with the reason (nacked, or returned as unroutable). If the connection dies
before that, it is never called: the caller must then leave its source
message unacked so the broker delivers it again.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

from amqp.exceptions import RecoverableConnectionError

from glance_image_sync.broker.publishframes import PublishEncoder


class _Pending:
    __slots__ = ("exchange", "routing_key", "on_done", "returned")

    def __init__(self, exchange, routing_key, on_done):
        self.exchange, self.routing_key, self.on_done = exchange, routing_key, on_done
        self.returned = None


class ConfirmingPublisher:
    def __init__(self, connection):
        """``connection`` is a connected kombu Connection (py-amqp transport)."""
        self.channel = connection.channel()
        self.channel.confirm_select()
        self.channel.events["basic_ack"].add(self._on_ack)
        self.channel.events["basic_nack"].add(self._on_nack)
        self.channel.events["basic_return"].add(self._on_return)
        self._connection = self.channel.connection  # py-amqp's: frames are written to it
        self._encoder = PublishEncoder(self.channel.channel_id, self._connection.frame_max)
        self._tags = itertools.count(1)
        # delivery tag -> _Pending, in publish order (the order of confirms).
        self._pending = OrderedDict()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def publish(self, body: bytes, routing_key: str, on_done, exchange: str = "",
                headers=None, content_type: str = "application/json",
                content_encoding: str | None = "utf-8",
                expiration_ms: int | None = None) -> None:
        """Publish ``body`` (bytes) to ``routing_key``; see the module's contract."""
        properties = {"content_type": content_type, "content_encoding": content_encoding,
                      "delivery_mode": 2}  # persistent
        if headers:
            properties["application_headers"] = dict(headers)
        if expiration_ms is not None:
            properties["expiration"] = str(expiration_ms)
        if not self.channel.is_open or self._connection.transport is None:
            raise RecoverableConnectionError("publish: the channel or connection is closed")
        frames = self._encoder.encode(body, exchange, routing_key, properties, mandatory=True)
        self._pending[next(self._tags)] = _Pending(exchange, routing_key, on_done)
        # Written as they are, not through basic_publish, which would encode
        # each copy's arguments and properties afresh.
        self._connection.transport.write(frames)
        self._connection.bytes_sent += 1  # as py-amqp counts: heartbeats see traffic

    def _settle(self, delivery_tag: int, multiple: bool, nacked: bool) -> None:
        if multiple:
            tags = list(itertools.takewhile(lambda t: t <= delivery_tag, self._pending))
        else:
            tags = [delivery_tag] if delivery_tag in self._pending else []
        for tag in tags:
            entry = self._pending.pop(tag)
            if nacked:
                entry.on_done(False, "the broker refused it (nack)")
            elif entry.returned is not None:
                entry.on_done(False, entry.returned)
            else:
                entry.on_done(True, "")

    def _on_ack(self, delivery_tag, multiple):
        self._settle(delivery_tag, multiple, nacked=False)

    def _on_nack(self, delivery_tag, multiple):
        self._settle(delivery_tag, multiple, nacked=True)

    def _on_return(self, exc, exchange, routing_key, message):
        # RabbitMQ handles a channel's publishes in order and sends basic.return
        # before the basic.ack of the same message: the message returned is the
        # oldest one to that destination not yet known to be returned.
        for entry in self._pending.values():
            if (entry.returned is None and entry.routing_key == routing_key
                    and entry.exchange == exchange):
                entry.returned = (f"unroutable: no queue {routing_key!r} on exchange "
                                  f"{exchange!r} ({exc})")
                return
