"""The operator commands' command lines: ``status``, ``reconcile``, ``failed``.

They take no run lock: each works beside a running daemon.
"""

from __future__ import annotations

from glance_image_sync.admin import failed, reconcile, status


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
        "failed", help="events that ran out of attempts: list them, replay them")
    actions = parser.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="show this node's failed events")
    listing.add_argument("--dead-letter", action="store_true",
                         help="show the messages rejected as malformed or hostile instead")
    listing.add_argument("--format", choices=["table", "json"], default="table")
    again = actions.add_parser("replay", help="put failed events back in this node's queue")
    again.add_argument("image_ids", nargs="*", metavar="IMAGE_ID",
                       help="only these images (default: every failed event)")
    parser.set_defaults(run=lambda conf, settings: failed.main(conf.command, settings))
