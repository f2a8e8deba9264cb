"""Start-up: options registered, command line and files parsed, logging set up.

``prepare`` is the one bootstrap every command goes through; it returns the
parsed ``conf`` and the ``Settings`` read from it, or raises ``ConfigError``.
"""

from __future__ import annotations

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
        conf(argv, project="glance", prog=PROG, default_config_files=default_files)
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
