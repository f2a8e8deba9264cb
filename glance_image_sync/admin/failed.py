"""``glance-image-sync failed``: list, replay or purge parked messages (``parked``).

``replay`` moves this node's failed events back to its queue with a fresh
attempt count; with ``--dead-letter``, each dead letter goes back to the queue
it was taken from (its ``x-gis-queue`` header: Glance's notification queue or
a node's queue, nothing else), to be read again after a fix. Each message
moved is acked where it was only once the broker confirmed and routed its
copy, so a failure part of the way loses nothing; what moved and what did not
is reported (a message sent when the broker failed, but never confirmed, is
kept and may have arrived as well: events are idempotent). ``purge`` removes
messages (those of some images, or all) and says how many.

Exit status: 0 when everything asked for was done (also when there was
nothing to do), 1 when something was not (it stays where it was) or the
broker cannot be reached.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field

from glance_image_sync.admin import parked
from glance_image_sync.admin.tables import plural
from glance_image_sync.broker import confirmed, topology
from glance_image_sync.broker import connection as broker
from glance_image_sync.exceptions import EXIT_FAILED, EXIT_OK
from glance_image_sync.sync.worker import ATTEMPT_HEADER

REPLAYED_HEADER = "x-gis-replayed"
# Messages taken, published and settled at a time, so a failure part of the way
# leaves all but the current chunk either moved or in place.
CHUNK = 100


@dataclass
class Moved:
    moved: int = 0
    refused: list = field(default_factory=list)  # "image id: why"
    error: str | None = None  # the broker failure that stopped the move
    in_doubt: int = 0  # sent when it stopped, never confirmed: may have arrived too


def _what(args) -> tuple:
    """(queue, words for its messages) of the command's queue."""
    if args.dead_letter:
        return topology.DEAD_LETTER_QUEUE, "dead letter"
    return None, "failed event"


def replay_target(message, source: str, node: str, nodes, topo) -> tuple:
    """(routing key, headers) where a parked message goes back to, or (None, why)."""
    if source != topology.DEAD_LETTER_QUEUE:
        return topology.node_queue_name(node), {ATTEMPT_HEADER: 0, REPLAYED_HEADER: True}
    came_from = parked.Parked.from_message(message, nodes).came_from
    allowed = {topology.notification_queue_name(topo),
               *(topology.node_queue_name(n) for n in nodes.all)}
    if came_from not in allowed:
        return None, f"came from {came_from or 'no queue named'}, not a queue it may go back to"
    return came_from, {REPLAYED_HEADER: True}


def move(connection, source: str, nodes, choose, target_of, chunk: int | None = None) -> Moved:
    """Move the messages ``choose(parked)`` picks from ``source`` to ``target_of(message)``."""
    chunk = chunk or CHUNK
    result = Moved()
    channel = broker.raw_channel(connection)
    batch = confirmed.Batch(connection)
    try:
        while True:
            taken = 0
            while taken < chunk:
                message = channel.basic_get(source, no_ack=False)
                if message is None:
                    break
                taken += 1
                item = parked.Parked.from_message(message, nodes)
                if choose(item):  # else it stays, unacked, and goes back when the channel closes
                    _publish_back(batch, channel, message, item, target_of, result)
            batch.wait()
            if taken < chunk:
                return result
    except broker.ERRORS as exc:
        result.error = str(exc) or type(exc).__name__
        # What the broker confirmed before the failure is moved, if its ack can
        # still be sent; the rest is in doubt.
        with contextlib.suppress(*broker.ERRORS):
            batch.run_settled()
        result.in_doubt = batch.unsettled
        return result
    finally:
        with contextlib.suppress(*broker.ERRORS):
            channel.close()  # what was not acked goes back to the source queue
        batch.close()


def _publish_back(batch, channel, message, item, target_of, result) -> None:
    routing_key, headers = target_of(message)
    if routing_key is None:
        result.refused.append(f"{item.image_id}: {headers}")
        return

    def done(ok, reason):
        if ok:
            channel.basic_ack(message.delivery_tag)
            result.moved += 1
        else:
            result.refused.append(f"{item.image_id}: {reason}")

    batch.publish(message.body, routing_key, on_done=done, headers=headers,
                  content_type=message.content_type or "application/json",
                  content_encoding=message.content_encoding)


def purge(connection, source: str, choose, nodes) -> int:
    """Remove the messages ``choose(parked)`` picks from ``source``; how many."""
    channel = broker.raw_channel(connection)
    removed = 0
    try:
        while True:
            message = channel.basic_get(source, no_ack=False)
            if message is None:
                return removed
            if choose(parked.Parked.from_message(message, nodes)):
                channel.basic_ack(message.delivery_tag)
                removed += 1
    finally:
        channel.close()


def main(args, settings, out=None) -> int:
    """The command: ``failed list``, ``failed replay`` or ``failed purge``."""
    out = out or sys.stdout
    node, nodes = settings.nodes.this, settings.nodes
    queue, words = _what(args)
    queue = queue or topology.failed_queue_name(node)
    ids = set(getattr(args, "image_ids", None) or ())

    def choose(item):
        return not ids or item.image_id in ids

    try:
        with broker.connect(settings.broker) as connection:
            if not parked.exists(connection, queue):
                out.write(f"no {words}s: {queue} does not exist yet (no fan-out has run "
                          f"since api_nodes named {node})\n" if not args.dead_letter
                          else f"no {words}s: {queue} does not exist yet\n")
                return EXIT_OK
            if args.action == "list":
                found = parked.browse(connection, queue, nodes)
                out.write(parked.render(found, args.format, f"no {words}s in {queue}") + "\n")
                return EXIT_OK
            if args.action == "purge":
                removed = purge(connection, queue, choose, nodes)
                out.write(f"purged {plural(removed, words)} from {queue}\n")
                return EXIT_OK
            result = move(connection, queue, nodes, choose,
                          lambda m: replay_target(m, queue, node, nodes, settings.topology))
    except broker.ERRORS as exc:
        print(f"glance-image-sync: cannot reach the broker: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return _report(out, result, queue, words)


def _report(out, result: Moved, queue: str, words: str) -> int:
    out.write(f"{plural(result.moved, words)} moved back from {queue}\n")
    for refused in result.refused:
        out.write(f"  not moved, left in {queue}: {refused}\n")
    if result.error:
        out.write(f"stopped by a broker error: {result.error}; the {words}s not moved "
                  f"stay in {queue}\n")
    if result.in_doubt:
        out.write(f"  {plural(result.in_doubt, words)} sent but not confirmed: kept in "
                  f"{queue}, and may have arrived too (applying an event twice changes "
                  "nothing)\n")
    return EXIT_FAILED if result.refused or result.error else EXIT_OK
