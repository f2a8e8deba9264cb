"""Publishing a few messages from an operator command, each confirmed and routed.

The operator commands (``reconcile``, ``failed``) are not consumers with a
loop of their own: ``Batch`` publishes through the same ``ConfirmingPublisher``
as the daemon and then reads the connection until every publish is settled,
running each ``on_done`` once py-amqp's dispatch has returned.

Contract: ``wait`` returns once every ``on_done`` ran; it raises a broker
error (``connection.ERRORS``) if the connection fails first, or
``socket.timeout`` if the broker settles nothing for ``timeout`` seconds.
Publishes not settled then are in doubt (the broker may have them): the
caller reports them as not done.
"""

from __future__ import annotations

import collections
import contextlib

from glance_image_sync.broker.connection import ERRORS
from glance_image_sync.broker.publisher import ConfirmingPublisher

SETTLE_TIMEOUT = 30


class Batch:
    def __init__(self, connection):
        self.connection = connection
        self._settled = collections.deque()
        self.publisher = ConfirmingPublisher(connection, defer=self._settled.append)

    def publish(self, body: bytes, routing_key: str, on_done, **properties) -> None:
        """``on_done(ok, reason)`` as in ``ConfirmingPublisher.publish``."""
        self.publisher.publish(body, routing_key, on_done=on_done, **properties)

    def wait(self, timeout: float = SETTLE_TIMEOUT) -> None:
        while True:
            self.run_settled()
            if not self.publisher.pending:
                return
            self.connection.drain_events(timeout=timeout)

    def run_settled(self) -> None:
        """Run the ``on_done`` of every publish the broker has settled so far.

        One that raises (an ack on a channel that died) stays, and counts as
        ``unsettled``.
        """
        while self._settled:
            self._settled[0]()
            self._settled.popleft()

    @property
    def unsettled(self) -> int:
        """Publishes whose outcome was not acted on: in doubt after a failure."""
        return self.publisher.pending + len(self._settled)

    def close(self) -> None:
        with contextlib.suppress(*ERRORS):  # a dead connection closed it already
            self.publisher.channel.close()


def publish_all(connection, messages, timeout: float = SETTLE_TIMEOUT) -> dict:
    """Publish ``messages`` ([(routing_key, body)], persistent); {routing_key: reason or None}.

    A routing key whose publish was confirmed and routed maps to None; one that
    was refused or unroutable, to the reason. Raises as ``Batch.wait`` does.
    """
    results = {}
    batch = Batch(connection)
    try:
        for routing_key, body in messages:
            batch.publish(body, routing_key,
                          on_done=lambda ok, reason, key=routing_key: results.__setitem__(
                              key, None if ok else reason))
        batch.wait(timeout)
    finally:
        batch.close()
    return results
