"""The ``glance-image-sync`` command: one bootstrap, then the subcommand asked for.

``daemon``
    the long-running service: the fan-out and this node's sync worker as
    event-driven consumers, under systemd (``Type=notify``) or, with
    ``--daemonize``, detached with a pidfile (``cmd.daemon``).

One-shot commands for cron (``*/5 * * * * glance-image-sync both``;
``cmd.oneshot``): ``duplicate-notifications``, ``sync-images``, ``both``.

For operators (``cmd.admin``): ``status``, ``reconcile``, ``failed list``,
``failed replay``, ``failed purge``, ``forget-node``; and (``cmd.node``)
``doctor``, ``show``, ``ssh-keys``.

Exit status: 0 when everything was applied, 1 when something failed or was
rejected (it is logged, and retried or kept where an operator finds it),
2 for a configuration error or a wrong command line, 78 when the broker
refuses the credentials. A run that finds another one running exits 0.
"""

from __future__ import annotations

import signal
import sys
import threading

from oslo_config import cfg

from glance_image_sync import service
from glance_image_sync.cmd import admin, daemon, node, oneshot
from glance_image_sync.exceptions import (
    EXIT_BROKER_REFUSED,
    EXIT_CONFIG,
    EXIT_USAGE,
    BrokerRefused,
    ConfigError,
    UsageError,
)

PROG = service.PROG


def _add_commands(subparsers):
    for module in (daemon, oneshot, admin, node):
        module.add_parsers(subparsers)


COMMAND_OPT = cfg.SubCommandOpt("command", title="commands", handler=_add_commands)


def main(argv=None) -> int:
    conf = cfg.ConfigOpts()
    handling = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if handling else None
    try:
        settings = service.prepare(conf, sys.argv[1:] if argv is None else argv, COMMAND_OPT)
        return conf.command.run(conf, settings)
    except ConfigError as exc:
        print(f"{PROG}: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokerRefused as exc:
        print(f"{PROG}: configuration error: {exc}", file=sys.stderr)
        return EXIT_BROKER_REFUSED
    finally:
        if handling:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum, _frame):
    """SIGTERM as an exit that runs the cleanup on the way out.

    Left to its default, SIGTERM ends the process at once: a cron run or a
    ``reconcile`` would leave its ssh connections to peers open (and rsync
    temporaries for the next run to remove). The daemon handles it itself.
    """
    raise SystemExit(128 + signum)
