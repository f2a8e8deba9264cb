"""The cron commands: ``duplicate-notifications``, ``sync-images``, ``both``.

Each drains its queue and exits; the run lock keeps two runs (or a run and
the daemon) from working on one node at once.
"""

from __future__ import annotations

from oslo_log import log as logging

from glance_image_sync.admin.tables import plural
from glance_image_sync.exceptions import (
    EXIT_BROKER_REFUSED,
    EXIT_FAILED,
    EXIT_OK,
    AlreadyRunning,
    BrokerRefused,
    BrokerUnavailable,
)
from glance_image_sync.fanout.consumer import fanout_loop
from glance_image_sync.metrics import Exporter
from glance_image_sync.state import access
from glance_image_sync.state.runlock import RunLock
from glance_image_sync.sync.session import sync_loop

LOG = logging.getLogger(__name__)


def duplicate_notifications(settings) -> bool:
    loop = fanout_loop(settings, once=True)
    try:
        loop.run()
    finally:
        loop.close()
    LOG.info("duplicate-notifications: %s handled, %d rejected",
             plural(loop.component.handled, "notification"), loop.component.rejected)
    return loop.component.rejected == 0


def sync_images(settings) -> bool:
    with sync_loop(settings, once=True) as loop:
        try:
            loop.run()
        finally:
            loop.close()
            Exporter(settings.metrics, loop.component.metrics.registry).write_textfile()
    worker = loop.component
    LOG.info("sync-images: %s handled, %s, %d rejected", plural(worker.handled, "event"),
             plural(worker.failed_attempts, "failed attempt"), worker.rejected)
    return worker.failed_attempts == 0 and worker.rejected == 0


STEPS = {
    "duplicate-notifications": (
        [duplicate_notifications],
        "copy Glance's notifications into every node's queue, then exit"),
    "sync-images": (
        [sync_images], "apply this node's queued events to its image store, then exit"),
    "both": ([duplicate_notifications, sync_images], "duplicate-notifications, then sync-images"),
}


def add_parsers(subparsers) -> None:
    for name, (steps, text) in STEPS.items():
        subparsers.add_parser(name, help=text).set_defaults(
            run=lambda conf, settings, steps=steps: run(settings, steps))


def run(settings, steps) -> int:
    access.check_state_dir(settings.store.state_dir)
    if sync_images in steps:
        access.check_store(settings.store.datadir)
    try:
        with RunLock.in_dir(settings.store.state_dir):
            ok = True
            for step in steps:
                ok = step(settings) and ok
            return EXIT_OK if ok else EXIT_FAILED
    except AlreadyRunning as exc:
        LOG.info("not running: %s", exc)
        return EXIT_OK
    except BrokerUnavailable as exc:
        status, message = EXIT_FAILED, f"giving up: {exc}"
    except BrokerRefused as exc:
        status, message = EXIT_BROKER_REFUSED, f"configuration error: {exc}"
    # Logged outside the except block: oslo.log would append the traceback.
    LOG.error("%s", message)
    return status
