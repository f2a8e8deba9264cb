"""Wiring: the fan-out and the sync worker, built from Settings.

Shared by the one-shot commands and the daemon, so both run the same code.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

from oslo_log import log as logging

from glance_image_sync.broker.loop import ConnectionLoop
from glance_image_sync.exceptions import ConfigError, StoreError
from glance_image_sync.fanout.consumer import FanOut
from glance_image_sync.metrics import Exporter, Metrics
from glance_image_sync.state.nodestate import NodeState
from glance_image_sync.state.runlock import RunLock
from glance_image_sync.state.tombstones import Tombstones
from glance_image_sync.store.images import ImageStore
from glance_image_sync.sync.apply import ImageSync
from glance_image_sync.sync.ordering import OrderedDispatcher
from glance_image_sync.sync.worker import SyncWorker
from glance_image_sync.telemetry import Telemetry
from glance_image_sync.transfer.rsync import Rsync

LOG = logging.getLogger(__name__)


def run_lock(settings) -> RunLock:
    try:
        os.makedirs(settings.store.state_dir, mode=0o750, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create state_dir {settings.store.state_dir}: "
                          f"{exc.strerror}") from None
    return RunLock.in_dir(settings.store.state_dir)


def fanout_loop(settings, stop_event=None, once=False) -> ConnectionLoop:
    return ConnectionLoop("fan-out", FanOut(settings), settings.broker, stop_event, once)


@contextmanager
def exporting(settings, loop):
    """The sync loop's metrics served and written as configured, while in the block."""
    exporter = Exporter(settings.metrics, loop.component.telemetry.metrics.registry)
    exporter.start()
    try:
        yield exporter
    finally:
        exporter.stop()


def write_metrics(settings, loop) -> None:
    """A one-shot run's metrics into the textfile, if one is configured."""
    Exporter(settings.metrics, loop.component.telemetry.metrics.registry).write_textfile()


@contextmanager
def sync_loop(settings, stop_event=None, once=False):
    """A ready sync worker's loop; temporaries of a killed run are removed first.

    Call only while holding the run lock: it assumes no other process of ours
    is writing into the store.
    """
    try:
        store = ImageStore(settings.store)
    except StoreError as exc:
        raise ConfigError(str(exc)) from None
    rsync = Rsync(settings.transfer)
    dispatcher = OrderedDispatcher(settings.max_parallel)
    try:
        for name in store.remove_temporaries():
            LOG.warning("removed %s, left in %s by an interrupted transfer", name,
                        settings.store.datadir)
        tombstones = Tombstones(settings.store.state_dir, settings.store.deleted_memory)
        tombstones.prune()
        telemetry = Telemetry(Metrics(settings), NodeState(settings.store.state_dir))
        image_sync = ImageSync(settings.nodes, store, rsync, tombstones, telemetry)
        worker = SyncWorker(settings, image_sync, dispatcher, telemetry)
        loop = ConnectionLoop("sync", worker, settings.broker, stop_event, once)
        yield loop
    finally:
        rsync.cancel_all()
        dispatcher.shutdown()
        for name in store.remove_temporaries():
            LOG.info("removed %s of an abandoned transfer", name)
        store.close()
