"""The sync worker's loop, with the store, transfers and threads it works with.

Opened and closed together: the daemon and the one-shot ``sync-images`` run
the same code.
"""

from __future__ import annotations

from contextlib import contextmanager

from oslo_log import log as logging

from glance_image_sync.broker.loop import ConnectionLoop
from glance_image_sync.exceptions import ConfigError, StoreError
from glance_image_sync.glanceapi import GlanceApi
from glance_image_sync.metrics import Metrics
from glance_image_sync.state.nodestate import NodeState
from glance_image_sync.state.records import ImageRecords
from glance_image_sync.state.tombstones import Tombstones
from glance_image_sync.store.images import ImageStore
from glance_image_sync.store.trash import Trash
from glance_image_sync.sync.apply import ImageSync
from glance_image_sync.sync.ordering import OrderedDispatcher
from glance_image_sync.sync.trashkeeper import TrashKeeper
from glance_image_sync.sync.worker import SyncWorker
from glance_image_sync.transfer import masters
from glance_image_sync.transfer.sessions import Rsync

LOG = logging.getLogger(__name__)


@contextmanager
def sync_loop(settings, stop_event=None, once=False):
    """A ready sync worker's loop; what a killed run left is cleaned up first.

    Its temporaries are removed and its ssh connections to peers closed; at
    the end, ours are.

    Call while holding the run lock (one worker per node). Other processes
    may write into the store meanwhile (``reconcile --fix``): the sweeps at
    start and stop remove only this process's temporaries and those of
    processes that are gone (``store.owner``). The trash is purged of what is
    due: once at the start of a one-shot run, on a thread of its own in the
    daemon (``TrashKeeper``).
    """
    try:
        store = ImageStore(settings.store)
    except StoreError as exc:
        raise ConfigError(str(exc)) from None
    rsync = Rsync(settings.transfer)
    dispatcher = OrderedDispatcher(settings.max_parallel)
    keeper = None
    try:
        for name in store.remove_temporaries():
            LOG.warning("removed %s, left in %s by an interrupted transfer", name,
                        settings.store.datadir)
        masters.close_all(rsync.settings)
        tombstones = Tombstones(settings.store.state_dir, settings.store.deleted_memory)
        tombstones.prune()
        records = ImageRecords(settings.store.state_dir, settings.store.deleted_memory)
        records.prune()
        metrics = Metrics(settings)
        trash = Trash(store)
        metrics.watch_trash(trash)
        keeper = TrashKeeper(trash, settings.deletes, metrics, settings.nodes.this)
        store.make_room = keeper.make_room
        if once:
            keeper.tend_quietly()
        else:
            keeper.start()
        api = GlanceApi(settings.glance_api) if settings.glance_api.configured else None
        image_sync = ImageSync(settings.nodes, store, rsync, tombstones, metrics,
                               trash=trash if settings.deletes.grace else None, api=api,
                               # A cron run's peers are not receiving the image with it:
                               # it copies from the publisher, in shared rsync sessions.
                               records=records, relay=settings.transfer.relay and not once,
                               relay_wait=settings.transfer.relay_wait)
        worker = SyncWorker(settings, image_sync, dispatcher, metrics,
                            NodeState(settings.store.state_dir), records)
        loop = ConnectionLoop("sync", worker, settings.broker, stop_event, once)
        yield loop
    finally:
        if keeper is not None:
            keeper.stop()
        rsync.cancel_all()
        dispatcher.shutdown()
        rsync.close()
        for name in store.remove_temporaries():
            LOG.info("removed %s of an abandoned transfer", name)
        store.close()
