"""``glance-image-sync daemon``: the supervisor, in the foreground or detached."""

from __future__ import annotations

from glance_image_sync import service
from glance_image_sync.daemon.supervisor import Supervisor
from glance_image_sync.exceptions import ConfigError, UsageError
from glance_image_sync.state import access
from glance_image_sync.state.runlock import RunLock


def add_parsers(subparsers) -> None:
    parser = subparsers.add_parser(
        "daemon", help="run the fan-out and this node's sync worker until stopped")
    parser.add_argument("--daemonize", action="store_true",
                        help="detach from the terminal (for hosts without systemd)")
    parser.add_argument("--pidfile", help="with --daemonize: write the daemon's pid here")
    parser.set_defaults(run=run)


def run(conf, settings) -> int:
    if conf.command.pidfile and not conf.command.daemonize:
        raise UsageError("--pidfile needs --daemonize (under systemd, the unit tracks the "
                         "process)")
    # Before detaching: a problem is reported once, where the operator sees it.
    access.check_state_dir(settings.store.state_dir)
    access.check_store(settings.store.datadir)
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
