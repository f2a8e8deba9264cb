"""The command lines of this node's checks and set-up: ``doctor``, ``show``, ``ssh-keys``.

They take no run lock: each works beside a running daemon.
"""

from __future__ import annotations

from glance_image_sync.admin import doctor, show, sshkeys


def add_parsers(subparsers) -> None:
    parser = subparsers.add_parser(
        "doctor", help="check this node, the broker and every peer at once; exit 1 when a "
        "check fails")
    parser.add_argument("--format", choices=["table", "json"], default="table")
    parser.add_argument(
        "--unit", metavar="UNIT",
        help="check this systemd unit's sandbox (ReadWritePaths) even when doctor does not "
        "run under systemd (default: the unit doctor runs in, if any)")
    parser.set_defaults(run=lambda conf, settings: doctor.main(conf.command, settings))

    parser = subparsers.add_parser(
        "show", help="what this node knows of one image: on disk, last event, queues, "
        "deletion")
    parser.add_argument("image_id", metavar="IMAGE_ID", type=show.image_id_argument)
    parser.add_argument("--verify", action="store_true",
                        help="read the file and compute its md5 now (default: the sync "
                        "worker's verification, if the file has not changed since)")
    parser.add_argument("--format", choices=["table", "json"], default="table")
    parser.set_defaults(run=lambda conf, settings: show.main(conf.command, settings))

    parser = subparsers.add_parser(
        "ssh-keys", help="print the authorized_keys line each peer needs for this node's key, "
        "and the known_hosts lines of the peers' host keys")
    parser.add_argument("--public-key", required=True, metavar="FILE",
                        help="this node's public key for glance-image-sync (the .pub of the "
                        "IdentityFile in ssh_config_file)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--host-keys", metavar="DIR",
                        help="a directory of <node>.pub files: each peer's host public key "
                        "(its /etc/ssh/ssh_host_ed25519_key.pub)")
    source.add_argument("--known-hosts", metavar="FILE",
                        help="a known-hosts file (e.g. from ssh-keyscan, checked) to take "
                        "the peers' host keys from")
    parser.add_argument("--format", choices=["text", "json"], default="text")
    parser.set_defaults(run=lambda conf, settings: sshkeys.main(conf.command, settings))
