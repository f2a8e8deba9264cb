"""The ``glance-image-sync`` command.

``serve`` is what a peer's ssh key runs (its forced command) for every
transfer from this node: it starts without the configuration or the libraries
the other commands load (``transfer.serve``). Every other command goes
through one bootstrap (``cmd.commands``).
"""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        from glance_image_sync.transfer import serve

        return serve.main(argv[1:])
    from glance_image_sync.cmd import commands

    return commands.main(argv)
