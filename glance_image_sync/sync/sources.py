"""Where a node fetches a new image from: the publisher, or the node before it.

Without the relay, every node copies from the publisher, whose uplink then
carries N-1 copies: the time until all N nodes have an image grows with N.
With it (``relay = true``, the default), an image travels along a chain, as
HDFS writes a block through its replicas: the publisher, then the nodes after
it in ``api_nodes``, wrapping around. The first node after the publisher
copies from it with rsync; every further node streams from the node before it
while that one is still receiving (``transfer.stream``), so each uplink
carries about one copy at a time, and every node has the image in about the
time one copy takes, plus a moment per hop.

Each node verifies its own copy (size and md5) before installing it, and the
node before it ends the stream only once its own copy has verified; a copy
that fails verification is installed nowhere. When the node before it has no
copy within ``relay_wait`` seconds, or its copy is abandoned or stalls, the
node falls back to what it does without the relay: the publisher first, then
any other peer's installed copy (rsync; never a stream, so no two nodes can
wait for each other). An image whose publisher is unknown is copied the plain
way too.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Source:
    node: str
    relay: bool = False  # streamed, possibly while the node is still receiving it


def sources(nodes, publisher: str | None, relay: bool) -> tuple[Source, ...]:
    """Where to fetch an image from, best first."""
    plain = tuple(Source(node) for node in nodes.sources_for(publisher))
    if not relay or publisher is None or publisher == nodes.this:
        return plain
    upstream = nodes.upstream(publisher)
    if upstream == publisher:
        return plain
    return (Source(upstream, relay=True), *plain)
