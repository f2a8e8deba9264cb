"""The ``glance-image-sync`` command.

``daemon``
    the long-running service: the fan-out and this node's sync worker as
    event-driven consumers, under systemd (``Type=notify``) or, with
    ``--daemonize``, detached with a pidfile.

One-shot commands for cron (``*/5 * * * * glance-image-sync both``):

``duplicate-notifications``
    drain Glance's notification queue into one queue per api node, then exit;
``sync-images``
    drain this node's queue into the local image store, then exit;
``both``
    the two, in that order.

For operators:

``status [--format json]``
    every node's queue, the failed and dead-letter queues, Glance's
    notification queue, and this node's last success and last error; exits 1
    when something needs a human;
``reconcile [--fix] [--prune]``
    this node's store against its peers' (missing here, here only, size
    mismatch); ``--fix`` fetches what is missing, verified; ``--prune`` removes
    what no peer has; exits 1 when differences remain;
``failed list [--dead-letter] [--format json]``, ``failed replay [IMAGE_ID ...]``
    the events that ran out of attempts (or the rejected messages): look at
    them, put them back.

Exit status: 0 when everything was applied, 1 when something failed or was
rejected (it is logged, and retried or kept where an operator finds it),
2 for a configuration error. A run that finds another one running exits 0.
"""

from __future__ import annotations

import sys

from oslo_config import cfg
from oslo_log import log as logging

from glance_image_sync import service
from glance_image_sync.admin import failed, reconcile, status
from glance_image_sync.broker import connection as broker
from glance_image_sync.broker import topology
from glance_image_sync.daemon.supervisor import Supervisor
from glance_image_sync.exceptions import AlreadyRunning, BrokerUnavailable, ConfigError
from glance_image_sync.state.runlock import RunLock
from glance_image_sync.sync import session as app

LOG = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def _add_commands(subparsers):
    daemon = subparsers.add_parser(
        "daemon", help="run the fan-out and this node's sync worker until stopped")
    daemon.add_argument("--daemonize", action="store_true",
                        help="detach from the terminal (for hosts without systemd)")
    daemon.add_argument("--pidfile", help="with --daemonize: write the daemon's pid here")
    subparsers.add_parser("duplicate-notifications",
                          help="copy Glance's notifications into every node's queue, then exit")
    subparsers.add_parser("sync-images",
                          help="apply this node's queued events to its image store, then exit")
    subparsers.add_parser("both", help="duplicate-notifications, then sync-images")
    failed_parser = subparsers.add_parser(
        "failed", help="events that ran out of attempts: list them, replay them")
    actions = failed_parser.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="show this node's failed events")
    listing.add_argument("--dead-letter", action="store_true",
                         help="show the messages rejected as malformed or hostile instead")
    listing.add_argument("--format", choices=["table", "json"], default="table")
    again = actions.add_parser("replay", help="put failed events back in this node's queue")
    again.add_argument("image_ids", nargs="*", metavar="IMAGE_ID",
                       help="only these images (default: every failed event)")
    status_parser = subparsers.add_parser(
        "status", help="queues and this node's last sync; exit 1 when something needs a human")
    status_parser.add_argument("--format", choices=["table", "json"], default="table")
    reconcile_parser = subparsers.add_parser(
        "reconcile", help="compare this node's image store with its peers'; exit 1 while "
        "they differ")
    reconcile_parser.add_argument(
        "--fix", action="store_true",
        help="fetch images missing here, and replace a copy whose size two agreeing peers "
        "contradict (md5 computed on the peers, the copy verified)")
    reconcile_parser.add_argument(
        "--prune", action="store_true",
        help="remove images no peer has, once every peer answered and no event is queued")
    reconcile_parser.add_argument(
        "--min-age", type=int, default=reconcile.DEFAULT_MIN_AGE, metavar="SECONDS",
        help="leave files changed less than this long ago to the events (default: "
        "%(default)s)")
    reconcile_parser.add_argument("--format", choices=["table", "json"], default="table")


COMMAND_OPT = cfg.SubCommandOpt("command", title="commands", handler=_add_commands)


def _duplicate_notifications(settings) -> bool:
    loop = app.fanout_loop(settings, once=True)
    try:
        loop.run()
    finally:
        loop.close()
    LOG.info("duplicate-notifications: %d notifications handled, %d rejected",
             loop.component.handled, loop.component.rejected)
    return loop.component.rejected == 0


def _sync_images(settings) -> bool:
    with app.sync_loop(settings, once=True) as loop:
        try:
            loop.run()
        finally:
            loop.close()
            app.write_metrics(settings, loop)
    worker = loop.component
    LOG.info("sync-images: %d events handled, %d failed attempts, %d rejected",
             worker.handled, worker.failed_attempts, worker.rejected)
    return worker.failed_attempts == 0 and worker.rejected == 0


# Operator commands: no run lock, they work beside a running daemon.
OPERATOR = {
    "status": status.main,
    "reconcile": reconcile.main,
}

ONE_SHOT = {
    "duplicate-notifications": [_duplicate_notifications],
    "sync-images": [_sync_images],
    "both": [_duplicate_notifications, _sync_images],
}


def main(argv=None) -> int:
    conf = cfg.ConfigOpts()
    try:
        settings = service.prepare(conf, sys.argv[1:] if argv is None else argv, COMMAND_OPT)
        if conf.command.name == "daemon":
            return _daemon(conf, settings)
        if conf.command.name == "failed":
            return _failed(conf.command, settings)
        if conf.command.name in OPERATOR:
            return OPERATOR[conf.command.name](conf.command, settings)
        return _one_shot(settings, ONE_SHOT[conf.command.name])
    except ConfigError as exc:
        print(f"glance-image-sync: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def _failed(command, settings) -> int:
    node = settings.nodes.this
    try:
        connection = broker.connect(settings.broker)
    except broker.ERRORS as exc:
        unreachable = exc
    else:
        with connection:
            if command.action == "replay":
                moved = failed.replay(connection, node, settings.nodes,
                                      set(command.image_ids) or None)
                print(f"{moved} failed events of {node} back in "
                      f"{topology.node_queue_name(node)}")
                return EXIT_OK
            queue = (topology.DEAD_LETTER_QUEUE if command.dead_letter
                     else topology.failed_queue_name(node))
            print(failed.render(failed.browse(connection, queue, settings.nodes),
                                command.format))
            return EXIT_OK
    print(f"glance-image-sync: cannot reach the broker: {unreachable}", file=sys.stderr)
    return EXIT_FAILED


def _daemon(conf, settings) -> int:
    if not conf.command.daemonize:
        return Supervisor(conf, settings).run()
    if not (conf.log_file or conf.use_syslog or conf.use_journal):
        raise ConfigError("--daemonize needs log_file, use_syslog or use_journal: "
                          "a detached daemon has no terminal to log to")
    import daemon

    pidfile = RunLock(conf.command.pidfile, remove_on_release=True) \
        if conf.command.pidfile else None
    # DaemonContext closes every descriptor opened before it: logging is set
    # up again inside, and the supervisor opens its sockets, pipes and store
    # only there.
    with daemon.DaemonContext(pidfile=pidfile, umask=0o027, working_directory="/"):
        service.setup_logging(conf)
        return Supervisor(conf, settings).run()


def _one_shot(settings, steps) -> int:
    try:
        with app.run_lock(settings):
            ok = True
            for step in steps:
                ok = step(settings) and ok
            return EXIT_OK if ok else EXIT_FAILED
    except AlreadyRunning as exc:
        LOG.info("not running: %s", exc)
        return EXIT_OK
    except BrokerUnavailable as exc:
        unreachable = exc
    LOG.error("cannot reach the broker: %s", unreachable)
    return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
