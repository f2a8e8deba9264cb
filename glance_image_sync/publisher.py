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
import uuid
from collections import OrderedDict

import amqp

_MESSAGE_ID_PREFIX = "gis-"


class ConfirmingPublisher:
    def __init__(self, connection):
        """``connection`` is a connected kombu Connection (py-amqp transport)."""
        self.channel = connection.channel()
        self.channel.confirm_select()
        self.channel.events["basic_ack"].add(self._on_ack)
        self.channel.events["basic_nack"].add(self._on_nack)
        self.channel.events["basic_return"].add(self._on_return)
        self._tags = itertools.count(1)
        # delivery tag -> (message id, on_done); confirms come in tag order.
        self._pending = OrderedDict()
        self._returned = {}
        self._run = uuid.uuid4().hex[:12]

    @property
    def pending(self) -> int:
        return len(self._pending)

    def publish(self, body: bytes, routing_key: str, on_done, exchange: str = "",
                headers=None, content_type: str = "application/json",
                expiration_ms: int | None = None) -> None:
        tag = next(self._tags)
        message_id = f"{_MESSAGE_ID_PREFIX}{self._run}-{tag}"
        properties = {}
        if expiration_ms is not None:
            properties["expiration"] = str(expiration_ms)
        message = amqp.Message(
            body,
            content_type=content_type,
            content_encoding="utf-8",
            delivery_mode=2,  # persistent
            message_id=message_id,
            application_headers=dict(headers or {}),
            **properties,
        )
        self._pending[tag] = (message_id, on_done)
        self.channel.basic_publish(message, exchange=exchange, routing_key=routing_key,
                                   mandatory=True)

    def _settle(self, delivery_tag: int, multiple: bool, nacked: bool) -> None:
        if multiple:
            tags = list(itertools.takewhile(lambda t: t <= delivery_tag, self._pending))
        else:
            tags = [delivery_tag] if delivery_tag in self._pending else []
        for tag in tags:
            message_id, on_done = self._pending.pop(tag)
            returned = self._returned.pop(message_id, None)
            if nacked:
                on_done(False, "the broker refused it (nack)")
            elif returned is not None:
                on_done(False, returned)
            else:
                on_done(True, "")

    def _on_ack(self, delivery_tag, multiple):
        self._settle(delivery_tag, multiple, nacked=False)

    def _on_nack(self, delivery_tag, multiple):
        self._settle(delivery_tag, multiple, nacked=True)

    def _on_return(self, exc, exchange, routing_key, message):
        # RabbitMQ sends basic.return before the basic.ack of the same
        # message; remember it until that ack settles the publish.
        message_id = message.properties.get("message_id")
        if message_id:
            self._returned[message_id] = (
                f"unroutable: no queue {routing_key!r} on exchange {exchange!r} ({exc})"
            )
