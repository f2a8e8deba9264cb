"""Messages parked in a failed queue or the dead-letter queue, as an operator reads them.

``glance_image_sync.<node>.failed`` holds the events that ran out of attempts
on a node, each with its attempt count and last error in its headers.
``glance_image_sync.dead_letter`` holds messages rejected as malformed or
hostile (or that met an error in this tool), byte for byte, with the reason
and the queue they came from in their headers. Looking only looks: messages
are taken unacked and go back, in order, when the channel closes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from glance_image_sync import events
from glance_image_sync.admin.tables import table
from glance_image_sync.broker import connection as broker
from glance_image_sync.broker.consumer import NODE_HEADER, QUEUE_HEADER, REASON_HEADER
from glance_image_sync.exceptions import Rejected
from glance_image_sync.sync.worker import ATTEMPT_HEADER, ERROR_HEADER

LIST_LIMIT = 10_000


@dataclass
class Parked:
    image_id: str
    action: str
    event_type: str
    attempts: int | None
    error: str
    came_from: str  # the queue a dead letter was taken from, or ""

    @classmethod
    def from_message(cls, message, nodes) -> Parked:
        headers = message.headers or {}
        try:
            event = events.from_wire(message.body, nodes)
            image_id, action, event_type = (event.image_id, event.action.value,
                                            event.event_type)
        except Rejected:
            # A rejected event or a Glance notification: its id, if it has a valid one.
            image_id, action, event_type = image_id_in(message.body) or "-", "-", "-"
        error = str(headers.get(ERROR_HEADER) or headers.get(REASON_HEADER) or "")
        came_from = headers.get(QUEUE_HEADER)
        came_from = came_from if isinstance(came_from, str) else ""
        if came_from:
            error = f"{error} (from {came_from} on {headers.get(NODE_HEADER)})"
        attempts = headers.get(ATTEMPT_HEADER)
        return cls(image_id, action, event_type,
                   attempts if isinstance(attempts, int) else None, error, came_from)


def image_id_in(body) -> str | None:
    """The image id a message names, if it names a valid one anywhere we look.

    An event's ``image_id``; a Glance notification's ``payload.id`` (or the
    payload itself, as Essex sent it), also inside an oslo.messaging v2
    envelope. Only a canonical UUID is returned: this is shown and matched,
    and a message in the dead-letter queue may be hostile.
    """
    try:
        doc = events.load_json(body)
        if isinstance(doc, dict) and isinstance(doc.get("oslo.message"), str):
            doc = events.load_json(doc["oslo.message"])
    except Rejected:
        return None
    if not isinstance(doc, dict):
        return None
    payload = doc.get("payload")
    for candidate in (doc.get("image_id"),
                      payload.get("id") if isinstance(payload, dict) else payload):
        try:
            return events.image_id(candidate)
        except Rejected:
            continue
    return None


def exists(connection, queue_name: str) -> bool:
    """Whether the queue exists (a passive declaration on a channel of its own)."""
    channel = connection.channel()
    try:
        channel.queue_declare(queue=queue_name, passive=True)
    except connection.channel_errors as exc:
        if getattr(exc, "code", None) == 404:
            return False  # the broker closed that channel
        raise
    channel.close()
    return True


def browse(connection, queue_name: str, nodes, limit: int = LIST_LIMIT) -> list:
    """Up to ``limit`` messages of a queue, left in place; [] if it does not exist."""
    if not exists(connection, queue_name):
        return []
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


def render(parked: list, fmt: str, empty: str) -> str:
    if fmt == "json":
        return json.dumps([asdict(item) for item in parked], indent=2)
    if not parked:
        return empty
    rows = [("IMAGE", "ACTION", "EVENT", "ATTEMPTS", "LAST ERROR")]
    rows += [(p.image_id, p.action, p.event_type,
              "-" if p.attempts is None else str(p.attempts), p.error[:120]) for p in parked]
    return "\n".join(table(rows))
