"""Start-up: options registered, command line and files parsed, logging set up.

``prepare`` is the one bootstrap every command goes through; it returns the
parsed ``conf`` and the ``Settings`` read from it, or raises ``ConfigError``.
"""

from __future__ import annotations

import importlib.metadata
import os

from oslo_config import cfg
from oslo_log import log as logging

from glance_image_sync import opts
from glance_image_sync.exceptions import ConfigError
from glance_image_sync.settings import Settings

DEFAULT_CONFIG_FILE = "/etc/glance/glance-image-sync.conf"
PROG = "glance-image-sync"

LOG = logging.getLogger(__name__)


def prepare(conf, argv, command_opt) -> Settings:
    opts.register_opts(conf)
    logging.register_options(conf)
    # kombu and py-amqp at DEBUG dump connection internals; keep them quiet
    # even in a debug run.
    logging.set_defaults(default_log_levels=logging.get_default_log_levels() + ["kombu=WARN"])
    conf.register_cli_opt(command_opt)
    default_files = [DEFAULT_CONFIG_FILE] if os.path.exists(DEFAULT_CONFIG_FILE) else []
    try:
        conf(argv, project="glance", prog=PROG, version=_version(),
             default_config_files=default_files)
        setup_logging(conf)
        settings = Settings.from_conf(conf)
    except cfg.Error as exc:
        raise ConfigError(str(exc)) from None
    if conf.debug:
        conf.log_opt_values(LOG, logging.DEBUG)  # transport_url is secret: shown as ****
    return settings


def setup_logging(conf) -> None:
    if conf.use_journal:
        try:
            import systemd.journal  # noqa: F401
        except ImportError:
            raise ConfigError("use_journal needs the systemd Python bindings "
                              "(python3-systemd, or pip install glance-image-sync[journal]); "
                              "under systemd, stdout already reaches the journal") from None
    logging.setup(conf, PROG)


def _version() -> str:
    try:
        return importlib.metadata.version("glance-image-sync")
    except importlib.metadata.PackageNotFoundError:  # run from a tree, not installed
        return "unknown"
