"""Stand-ins for the broker side of a consumer, for unit tests of plain logic.

They record what a consumer asks of its channel and publisher; a test then
settles publishes or runs deferred calls by hand, in the order it chooses.
"""

import collections
import itertools
from types import SimpleNamespace

from glance_image_sync.broker.consumer import AckBatch


class Channel:
    def __init__(self):
        self.acks = []  # (delivery tag, multiple)

    def basic_ack(self, delivery_tag, multiple=False):
        self.acks.append((delivery_tag, multiple))


class Publisher:
    def __init__(self):
        self.sent = []  # SimpleNamespace(body, routing_key, headers, expiration_ms, on_done)

    @property
    def pending(self):
        return sum(not p.settled for p in self.sent)

    def publish(self, body, routing_key, on_done, exchange="", headers=None,
                content_type="application/json", content_encoding="utf-8",
                expiration_ms=None):
        self.sent.append(SimpleNamespace(body=body, routing_key=routing_key,
                                         headers=dict(headers or {}), on_done=on_done,
                                         expiration_ms=expiration_ms, settled=False,
                                         content_encoding=content_encoding))

    def discard(self):
        self.discarded = True

    def resume(self):
        self.resumed = getattr(self, "resumed", 0) + 1

    def settle(self, index=-1, ok=True, reason=""):
        """Confirm (or refuse) one publish, as the broker's ack would."""
        entry = self.sent[index]
        entry.settled = True
        entry.on_done(ok, reason)


class Loop:
    """call_soon without a connection: calls wait until the test runs them."""

    def __init__(self):
        self.calls = collections.deque()

    def call_soon(self, fn):
        self.calls.append(fn)

    def run_calls(self):
        while self.calls:
            self.calls.popleft()()


_tags = itertools.count(1)


def message(body=b"{}", headers=None, tag=None):
    return SimpleNamespace(body=body, headers=headers, content_type="application/json",
                           content_encoding="utf-8",
                           delivery_tag=next(_tags) if tag is None else tag)


def attach(consumer, queue_name="queue"):
    """Give ``consumer`` the state start() would, with stand-ins; return them."""
    parts = SimpleNamespace(loop=Loop(), channel=Channel(), publisher=Publisher())
    consumer.loop = parts.loop
    consumer.generation += 1
    consumer.channel = parts.channel
    consumer.acks = AckBatch(parts.channel)
    consumer.publisher = parts.publisher
    consumer.queue = SimpleNamespace(name=queue_name)
    return parts


def deliver(consumer, msg):
    """A delivery as py-amqp's callback hands it over, then handled after the dispatch."""
    consumer._on_message(msg)
    consumer.loop.run_calls()
