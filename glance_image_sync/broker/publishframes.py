"""basic.publish as AMQP 0-9-1 frames, with what repeats encoded once.

The fan-out sends three copies of every notification, each to a routing key
and with properties it has sent thousands of times before. py-amqp encodes
the method arguments and the properties afresh for each copy, which is most
of what a publish costs. ``PublishEncoder`` keeps the method frame of each
destination and the encoded properties of each property set, so a publish
is a few bytes joined. The encoding itself is py-amqp's (``dumps`` and the
property table of ``amqp.Message``); the tests check the frames byte for byte
against py-amqp's own frame writer.
"""

from __future__ import annotations

import struct

import amqp
from amqp import spec
from amqp.serialization import dumps

_METHOD, _HEADER, _BODY = 1, 2, 3
_FRAME_END = b"\xce"
_FRAME_OVERHEAD = 8  # type, channel, size; the end octet
# basic.publish: ticket, exchange, routing key, mandatory, immediate.
_PUBLISH_ARGUMENTS = "Bssbb"
# Destinations and property sets are few (one per node queue, a dead-letter
# queue); a bound keeps a misuse from growing without end.
_CACHE_LIMIT = 1024


class PublishEncoder:
    def __init__(self, channel_id: int, frame_max: int):
        self.channel_id = channel_id
        self.body_chunk = frame_max - _FRAME_OVERHEAD
        self._methods = {}
        self._properties = {}

    def encode(self, body: bytes, exchange: str, routing_key: str, properties: dict,
               mandatory: bool = True) -> bytes:
        """The frames of one publish, ready to write to the connection."""
        if isinstance(body, str):  # as py-amqp's own frame writer takes one
            encoding = properties.setdefault("content_encoding", "utf-8")
            body = body.encode(encoding)
        parts = [self._method(exchange, routing_key, mandatory),
                 self._frame(_HEADER, struct.pack(">HHQ", spec.Basic.Publish[0], 0, len(body))
                             + self._encoded_properties(properties))]
        for start in range(0, len(body), self.body_chunk):
            parts.append(self._frame(_BODY, body[start:start + self.body_chunk]))
        return b"".join(parts)

    def _method(self, exchange, routing_key, mandatory) -> bytes:
        key = (exchange, routing_key, mandatory)
        frame = self._methods.get(key)
        if frame is None:
            arguments = dumps(_PUBLISH_ARGUMENTS, (0, exchange, routing_key, mandatory, False))
            frame = self._frame(_METHOD, struct.pack(">HH", *spec.Basic.Publish) + arguments)
            _remember(self._methods, key, frame)
        return frame

    def _encoded_properties(self, properties: dict) -> bytes:
        try:
            key = tuple(sorted(properties.items()))
            hash(key)
        except TypeError:  # headers (a dict): encoded each time
            return encode_properties(properties)
        encoded = self._properties.get(key)
        if encoded is None:
            encoded = encode_properties(properties)
            _remember(self._properties, key, encoded)
        return encoded

    def _frame(self, kind: int, payload: bytes) -> bytes:
        return b"".join((struct.pack(">BHI", kind, self.channel_id, len(payload)), payload,
                         _FRAME_END))


def encode_properties(properties: dict) -> bytes:
    """Basic's content properties: the flag word, then the values that are set."""
    if len(amqp.Message.PROPERTIES) > 15:  # a second flag word: not in AMQP 0-9-1's Basic
        raise ValueError("more content properties than one flag word holds")
    flags, kinds, values = 0, [], []
    for position, (name, kind) in enumerate(amqp.Message.PROPERTIES):
        value = properties.get(name)
        if value is not None:
            flags |= 1 << (15 - position)
            kinds.append(kind)
            values.append(value)
    return struct.pack(">H", flags) + dumps("".join(kinds), values)


def _remember(cache: dict, key, value) -> None:
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    cache[key] = value
