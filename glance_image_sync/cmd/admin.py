"""The operator commands' command lines: ``status``, ``reconcile``, ``failed``, ``forget-node``,
``restore``.

They take no run lock: each works beside a running daemon.
"""

from __future__ import annotations

import argparse

from glance_image_sync import events
from glance_image_sync.admin import failed, forget, reconcile, restore, show, status
from glance_image_sync.exceptions import Rejected
from glance_image_sync.nodes import Nodes


def add_parsers(subparsers) -> None:
    parser = subparsers.add_parser(
        "status", help="queues and this node's last sync; exit 1 when something needs a human")
    parser.add_argument("--format", choices=["table", "json"], default="table")
    parser.set_defaults(run=lambda conf, settings: status.main(conf.command, settings))

    parser = subparsers.add_parser(
        "reconcile", help="compare this node's image store with its peers'; exit 1 while "
        "they differ")
    parser.add_argument(
        "--fix", action="store_true",
        help="fetch images missing here, and replace a copy whose size two agreeing peers "
        "contradict (md5 computed on the peers, the copy verified)")
    parser.add_argument(
        "--prune", action="store_true",
        help="remove images no peer has, once every peer answered and no event is queued")
    parser.add_argument(
        "--min-age", type=int, default=reconcile.DEFAULT_MIN_AGE, metavar="SECONDS",
        help="leave files changed less than this long ago to the events (default: "
        "%(default)s)")
    parser.add_argument("--format", choices=["table", "json"], default="table")
    parser.set_defaults(run=lambda conf, settings: reconcile.main(conf.command, settings))

    parser = subparsers.add_parser(
        "failed", help="events that ran out of attempts, and dead letters: list, replay or "
        "purge them")
    actions = parser.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="show this node's failed events")
    _dead_letter_flag(listing, "show the messages rejected as malformed or hostile instead")
    listing.add_argument("--format", choices=["table", "json"], default="table")
    again = actions.add_parser(
        "replay", help="put failed events back in this node's queue (dead letters: back "
        "where they came from)")
    _dead_letter_flag(again, "replay dead letters, each into the queue it was taken from")
    again.add_argument("image_ids", nargs="*", metavar="IMAGE_ID", type=_image_id,
                       help="only these images (default: all)")
    gone = actions.add_parser("purge", help="remove failed events or dead letters for good")
    _dead_letter_flag(gone, "purge dead letters instead")
    which = gone.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="every one of them")
    which.add_argument("image_ids", nargs="*", metavar="IMAGE_ID", type=_image_id, default=[],
                       help="only those of these images")
    parser.set_defaults(run=lambda conf, settings: failed.main(conf.command, settings))


    parser = subparsers.add_parser(
        "forget-node", help="delete the queues of a node removed from api_nodes for good")
    parser.add_argument("node", metavar="NAME", type=_host_name,
                        help="the node, as its queues name it (see 'status')")
    parser.set_defaults(run=lambda conf, settings: forget.main(conf.command, settings))

    parser = subparsers.add_parser(
        "restore", help="put an image back from this node's trash (size and md5 checked) and "
        "forget its deletion; exit 1 when it is not there or a check fails")
    parser.add_argument("image_id", metavar="IMAGE_ID", type=show.image_id_argument)
    parser.set_defaults(run=lambda conf, settings: restore.main(conf.command, settings))


def _host_name(value: str) -> str:
    name = Nodes.canonical(value)
    if name is None:
        raise argparse.ArgumentTypeError(f"{value!r} is not a host name")
    return name


def _dead_letter_flag(parser, text) -> None:
    parser.add_argument("--dead-letter", action="store_true", help=text)


def _image_id(value: str) -> str:
    try:
        return events.image_id(value)
    except Rejected as exc:
        raise argparse.ArgumentTypeError(exc.reason) from None
