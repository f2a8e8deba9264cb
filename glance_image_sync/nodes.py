"""Node names: which glance-api node a host name or publisher_id means.

Glance's notifier names its host as ``socket.gethostname()`` returns it (short
or fully qualified, depending on the machine), and operators write
``api_nodes`` either way. A name matches a node when both are equal, or when
one is a short name equal to the other's first label. The node is always
reported as written in ``api_nodes``: that spelling names its queue and is what
ssh connects to.
"""

from __future__ import annotations

import re

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")

# Glance's default publisher_id is "image.localhost" on every node: it names
# no node, so the image has to be found on whichever peer has it.
UNKNOWN_PUBLISHER_HOST = "localhost"


def normalize_hostname(name: object) -> str | None:
    """The host name in canonical form, or None when it is not one.

    Only letters, digits, hyphens and dots: a name that passes can be handed to
    ssh and used in a queue name. ASCII is checked before case folding, since
    Unicode folds some look-alikes onto ASCII (KELVIN SIGN lower-cases to "k").
    """
    if not isinstance(name, str) or not 0 < len(name) <= 253 or not name.isascii():
        return None
    name = name.lower()
    if name.endswith("."):
        name = name[:-1]
    if not _HOSTNAME_RE.fullmatch(name):
        return None
    return name


def same_host(a: str, b: str) -> bool:
    """Whether two canonical host names can mean the same machine."""
    if a == b:
        return True
    if "." in a and "." in b:
        return False
    return a.split(".", 1)[0] == b.split(".", 1)[0]


class Nodes:
    """The api_nodes of the cluster, and this node among them."""

    def __init__(self, names, this_host):
        canonical = []
        for raw in names:
            name = normalize_hostname(raw.strip())
            if name is None:
                raise ValueError(f"api_nodes: {raw!r} is not a host name")
            for other in canonical:
                if same_host(name, other):
                    raise ValueError(f"api_nodes: {raw!r} and {other!r} name the same node")
            canonical.append(name)
        if not canonical:
            raise ValueError("api_nodes is empty: list every glance-api node")
        self.all = tuple(canonical)
        me = self.resolve(this_host)
        if me is None:
            raise ValueError(
                f"host {this_host!r} is not one of api_nodes ({', '.join(self.all)}); "
                "set host in [DEFAULT] to this node's entry"
            )
        self.this = me

    @staticmethod
    def canonical(name: object) -> str | None:
        """``normalize_hostname``: the host name in canonical form, or None."""
        return normalize_hostname(name)

    def resolve(self, name: object) -> str | None:
        """The node ``name`` means, or None when it means none (or several)."""
        name = normalize_hostname(name)
        if name is None:
            return None
        if name in self.all:
            return name
        matches = [node for node in self.all if same_host(name, node)]
        return matches[0] if len(matches) == 1 else None

    def peers(self) -> tuple[str, ...]:
        """Every node but this one, in api_nodes order."""
        return tuple(node for node in self.all if node != self.this)

    def sources_for(self, publisher: str | None) -> tuple[str, ...]:
        """Where to fetch an image from, best first.

        The publisher wrote the file, so it is asked first; any other peer's
        copy that verifies is as good. This node is never a source of its own.
        """
        peers = self.peers()
        if publisher is None or publisher == self.this:
            return peers
        return (publisher,) + tuple(node for node in peers if node != publisher)

    def chain(self, publisher: str) -> tuple[str, ...]:
        """The order a new image travels in with the relay: the publisher, then the
        nodes after it in api_nodes, wrapping around."""
        start = self.all.index(publisher)
        return self.all[start:] + self.all[:start]

    def upstream(self, publisher: str) -> str:
        """The node before this one in ``chain(publisher)``: where it streams from."""
        chain = self.chain(publisher)
        return chain[chain.index(self.this) - 1]
