"""Start-up: options registered, command line and files parsed, logging set up.

``prepare`` is the one bootstrap every command goes through; it returns the
parsed ``conf`` and the ``Settings`` read from it, or raises ``ConfigError``.
"""

from __future__ import annotations

import importlib.metadata
import logging as std_logging
import os

from oslo_config import cfg
from oslo_log import handlers
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
        if not conf.api_nodes:
            raise ConfigError(_no_nodes(conf))
        settings = Settings.from_conf(conf)
    except cfg.Error as exc:
        raise ConfigError(str(exc)) from None
    if conf.debug:
        conf.log_opt_values(LOG, logging.DEBUG)  # transport_url is secret: shown as ****
    return settings


def _no_nodes(conf) -> str:
    """Why api_nodes is empty, with the files that were read."""
    files = list(conf.config_file or []) + ([conf.config_dir] if conf.config_dir else [])
    if not files:
        return (f"api_nodes is empty: no configuration file was read ({DEFAULT_CONFIG_FILE} "
                "does not exist; give one with --config-file)")
    return (f"api_nodes is empty in {', '.join(files)}: list every glance-api node in "
            "[DEFAULT] api_nodes")


def setup_logging(conf) -> None:
    """oslo.log's set-up, with stderr (not oslo.log's stdout) where no file is named.

    stdout carries a command's output only (``reconcile --format json`` stays
    JSON whatever is logged); under systemd stderr reaches the journal as
    stdout did.
    """
    if conf.use_journal:
        try:
            import systemd.journal  # noqa: F401
        except ImportError:
            raise ConfigError("use_journal needs the systemd Python bindings "
                              "(python3-systemd, or pip install glance-image-sync[journal]); "
                              "under systemd, stderr already reaches the journal") from None
    if not (conf.log_file or conf.log_dir or conf.use_journal):
        # oslo.log falls back to stdout when none of these is set.
        conf.set_override("use_stderr", True)
    logging.setup(conf, PROG)
    _replace_handlers(conf)


class ImageJournalHandler(handlers.OSJournalHandler):
    """oslo.log's journal handler, with a record's ``image_id`` as the field IMAGE_ID.

    oslo.log sends only its own fields (code, thread, logger, and a request's
    ids); ``journalctl IMAGE_ID=<id>`` then finds every line about one image.
    """

    custom_fields = (*handlers.OSJournalHandler.custom_fields, "image_id")


def _replace_handlers(conf) -> None:
    """Two handlers that oslo.log's setup put on the root logger, replaced by ours.

    * its journal handler (``use_journal``), by ImageJournalHandler;
    * its ColorHandler on stdout or stderr, unless ``log_color`` asks for it:
      oslo.log before that option (Debian 12's 5.0.1) always used it, and it
      ends every line with a terminal escape, which makes each of the
      daemon's lines binary data in the journal.
    """
    root = std_logging.getLogger()
    for handler in list(root.handlers):
        if type(handler) is handlers.OSJournalHandler:
            ours = ImageJournalHandler(facility=handler.facility)
        elif type(handler) is handlers.ColorHandler and not (
                "log_color" in conf and conf.log_color):
            ours = std_logging.StreamHandler(handler.stream)
        else:
            continue
        ours.setLevel(handler.level)
        ours.setFormatter(handler.formatter)
        root.removeHandler(handler)
        root.addHandler(ours)


def _version() -> str:
    try:
        return importlib.metadata.version("glance-image-sync")
    except importlib.metadata.PackageNotFoundError:  # run from a tree, not installed
        return "unknown"
