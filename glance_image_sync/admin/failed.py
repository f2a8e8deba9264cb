"""The failed and dead-letter queues, for an operator: what is there, and replay.

``glance_image_sync.<node>.failed`` holds the events that ran out of attempts
on a node, each with its attempt count and last error in its headers.
``glance_image_sync.dead_letter`` holds messages rejected as malformed or
hostile, with the reason. Listing only looks: messages are taken unacked and
go back, in order, when the channel closes. Replaying moves failed events back
to the node's queue with a fresh attempt count; each is acked in the failed
queue only once the broker confirmed and routed its copy.
"""

from __future__ import annotations

import collections
import json
import sys
from dataclasses import asdict, dataclass

from glance_image_sync import events
from glance_image_sync.admin.tables import table
from glance_image_sync.broker import connection as broker
from glance_image_sync.broker import topology
from glance_image_sync.broker.consumer import NODE_HEADER, QUEUE_HEADER, REASON_HEADER
from glance_image_sync.broker.publisher import ConfirmingPublisher
from glance_image_sync.exceptions import EXIT_FAILED, EXIT_OK, BrokerUnavailable, Rejected
from glance_image_sync.sync.worker import ATTEMPT_HEADER, ERROR_HEADER

REPLAYED_HEADER = "x-gis-replayed"
LIST_LIMIT = 10_000


@dataclass
class Parked:
    """One message in a failed or dead-letter queue, as an operator reads it."""

    image_id: str
    action: str
    event_type: str
    attempts: int | None
    error: str

    @classmethod
    def from_message(cls, message, nodes) -> Parked:
        headers = message.headers or {}
        try:
            event = events.from_wire(message.body, nodes)
            image_id, action, event_type = (event.image_id, event.action.value,
                                            event.event_type)
        except Rejected:
            image_id, action, event_type = "-", "-", "-"
        error = headers.get(ERROR_HEADER) or headers.get(REASON_HEADER) or ""
        if headers.get(QUEUE_HEADER):
            error = f"{error} (from {headers[QUEUE_HEADER]} on {headers.get(NODE_HEADER)})"
        attempts = headers.get(ATTEMPT_HEADER)
        return cls(image_id, action, event_type,
                   attempts if isinstance(attempts, int) else None, str(error))


def browse(connection, queue_name: str, nodes, limit: int = LIST_LIMIT) -> list:
    """Up to ``limit`` messages of a queue, left in place."""
    channel = broker.raw_channel(connection)
    try:
        found = []
        while len(found) < limit:
            message = channel.basic_get(queue_name, no_ack=False)
            if message is None:
                break
            found.append(Parked.from_message(message, nodes))
        return found
    finally:
        channel.close()  # the unacked messages go back to the queue


def replay(connection, node: str, nodes, image_ids=None) -> int:
    """Move failed events (all, or those of ``image_ids``) back to the node queue."""
    settled = collections.deque()
    publisher = ConfirmingPublisher(connection, defer=settled.append)
    channel = broker.raw_channel(connection)
    moved = []
    try:
        while True:
            message = channel.basic_get(topology.failed_queue_name(node), no_ack=False)
            if message is None:
                break
            if image_ids and Parked.from_message(message, nodes).image_id not in image_ids:
                continue  # stays, unacked, and goes back when the channel closes

            def done(ok, reason, message=message):
                if not ok:
                    raise RuntimeError(f"replay of a failed event refused: {reason}")
                channel.basic_ack(message.delivery_tag)
                moved.append(message)

            publisher.publish(message.body, topology.node_queue_name(node), on_done=done,
                              headers={ATTEMPT_HEADER: 0, REPLAYED_HEADER: True},
                              content_type=message.content_type or "application/json")
        # Confirms may have come in while basic_get waited for its answer:
        # run what they settled before asking whether any are still due.
        while True:
            while settled:
                settled.popleft()()
            if not publisher.pending:
                break
            connection.drain_events(timeout=30)
    finally:
        channel.close()
        publisher.channel.close()
    return len(moved)


def render(parked: list, fmt: str) -> str:
    if fmt == "json":
        return json.dumps([asdict(item) for item in parked], indent=2)
    if not parked:
        return "(empty)"
    rows = [("IMAGE", "ACTION", "EVENT", "ATTEMPTS", "LAST ERROR")]
    rows += [(p.image_id, p.action, p.event_type,
              "-" if p.attempts is None else str(p.attempts), p.error[:120]) for p in parked]
    return "\n".join(table(rows))


def main(args, settings, out=None) -> int:
    """The command: ``failed list`` or ``failed replay``."""
    out = out or sys.stdout
    node = settings.nodes.this
    try:
        connection, _ = broker.connect(settings.broker)
    except BrokerUnavailable as exc:
        unreachable = exc
    else:
        try:
            if args.action == "replay":
                moved = replay(connection, node, settings.nodes, set(args.image_ids) or None)
                out.write(f"{moved} failed events of {node} back in "
                          f"{topology.node_queue_name(node)}\n")
                return EXIT_OK
            queue = (topology.DEAD_LETTER_QUEUE if args.dead_letter
                     else topology.failed_queue_name(node))
            out.write(render(browse(connection, queue, settings.nodes), args.format) + "\n")
            return EXIT_OK
        finally:
            broker.close(connection)
    print(f"glance-image-sync: cannot reach the broker: {unreachable}", file=sys.stderr)
    return EXIT_FAILED
