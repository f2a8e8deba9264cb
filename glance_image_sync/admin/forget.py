"""``glance-image-sync forget-node NAME``: delete the queues of a node removed for good.

A node's queues are durable and outlive its removal from ``api_nodes``
(nodes still on the old list keep filling them). This deletes its queue,
its retry queues (those of the current ``retry_delays``), its failed queue
and the 2013 tool's ``glance_image_sync.<node>.info``, with the events in
them, and forgets the name (``knownnodes``). It refuses while NAME is in this
node's ``api_nodes``, and while anything consumes its queue (its daemon still
runs); a consumer that appears meanwhile makes the broker refuse the delete.

Exit status: 0 when the queues are gone (or there were none), 1 when it
refused or the broker could not be reached, 2 for a name that is no host name.
"""

from __future__ import annotations

import sys

from glance_image_sync.admin.tables import plural
from glance_image_sync.broker import connection as broker
from glance_image_sync.broker import queues as queuestats
from glance_image_sync.broker import topology
from glance_image_sync.exceptions import EXIT_FAILED, EXIT_OK, BrokerUnavailable
from glance_image_sync.state import knownnodes


def queue_names(node: str, topo) -> list:
    return [q.name for q in topology.node_queues(node, topo)] + \
        [topology.legacy_queue_name(node)]


def main(args, settings, out=None) -> int:
    out = out or sys.stdout
    node = args.node
    if settings.nodes.resolve(node) is not None:
        out.write(f"not forgetting {node}: it is in api_nodes "
                  f"({', '.join(settings.nodes.all)}); remove it there on every node first\n")
        return EXIT_FAILED
    names = queue_names(node, settings.topology)
    try:
        found = queuestats.read(settings.broker, names)
    except BrokerUnavailable as exc:
        print(f"glance-image-sync: cannot reach the broker: {exc}", file=sys.stderr)
        return EXIT_FAILED
    main_queue = found[topology.node_queue_name(node)]
    if main_queue.consumers:
        out.write(f"not forgetting {node}: {plural(main_queue.consumers, 'consumer')} still "
                  f"read {main_queue.name} (is its daemon still running?)\n")
        return EXIT_FAILED
    deleted = []
    try:
        with broker.connected(settings.broker) as connection:
            for name in names:
                if not found[name].exists:
                    continue
                channel = connection.channel()
                # if_unused: the broker refuses if a consumer came meanwhile.
                dropped = channel.queue_delete(queue=name, if_unused=True)
                channel.close()
                deleted.append(f"{name} ({plural(dropped or 0, 'message')})")
    except (BrokerUnavailable, *broker.ERRORS) as exc:
        out.write(f"stopped by the broker: {broker.describe(exc)}\n")
        if deleted:
            out.write(f"deleted before that: {', '.join(deleted)}\n")
        return EXIT_FAILED
    knownnodes.forget(settings.store.state_dir, node)
    out.write(f"deleted {', '.join(deleted)}\n" if deleted
              else f"no queue of {node} was left\n")
    out.write(f"forgot {node}\n")
    return EXIT_OK
