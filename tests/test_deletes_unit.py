"""Deletes without a broker: asking Glance first, the trash, refusals dead-lettered, the
burst alarm, the purge schedule, what doctor says protects the images."""

import hashlib
import json
import logging
import os
import types

import pytest

from glance_image_sync import events
from glance_image_sync.admin import doctor_deletes
from glance_image_sync.broker import topology
from glance_image_sync.broker.consumer import REASON_HEADER
from glance_image_sync.events import Action, ImageEvent
from glance_image_sync.exceptions import Rejected
from glance_image_sync.glanceapi import Answer, ImageState
from glance_image_sync.metrics import DeleteRate, Metrics
from glance_image_sync.nodes import Nodes
from glance_image_sync.settings import DeleteSettings, StoreSettings
from glance_image_sync.state.records import ImageRecords
from glance_image_sync.state.tombstones import Tombstones
from glance_image_sync.store.images import ImageStore, file_version
from glance_image_sync.store.trash import TRASH_DIR, Cause, Trash
from glance_image_sync.sync.apply import REFUSED, ImageSync, Outcome
from glance_image_sync.sync.session import sync_loop
from glance_image_sync.sync.trashkeeper import CHECK_EVERY, TrashKeeper
from glance_image_sync.sync.worker import SyncWorker
from tests import fakes
from tests.helpers import NODES, settings_for

IMAGE = "b90e9b0f-36ce-43c1-b08c-9b4201f6571f"
DATA = b"image" * 2000
MD5 = hashlib.md5(DATA).hexdigest()
DELETE = ImageEvent(Action.ABSENT, IMAGE, "node2", event_type="image.delete",
                    message_id="m-7", publisher="image.node2")


class Api:
    """Glance's API as the sync worker sees it: one answer for every image."""

    def __init__(self, state, detail="as told"):
        self.answer = Answer(state, detail)
        self.asked = []
        self.configured = True

    def image_state(self, image_id):
        self.asked.append(image_id)
        return self.answer


@pytest.fixture
def node(tmp_path):
    datadir = tmp_path / "images"
    datadir.mkdir()
    store = ImageStore(StoreSettings(datadir=str(datadir), file_mode=None,
                                     state_dir=str(tmp_path / "state"), deleted_memory=60))
    (datadir / IMAGE).write_bytes(DATA)
    parts = types.SimpleNamespace(
        store=store, path=datadir / IMAGE, trashed=datadir / TRASH_DIR / IMAGE,
        tombstones=Tombstones(str(tmp_path / "state"), 3600),
        records=ImageRecords(str(tmp_path / "state"), 3600), metrics=Metrics())
    yield parts
    store.close()


def sync_for(node, api=None, trash=True):
    return ImageSync(Nodes(list(NODES), "node1"), node.store, None, node.tombstones,
                     node.metrics, trash=Trash(node.store) if trash else None, api=api,
                     records=node.records)


def deletes(metrics, result):
    return metrics.registry.get_sample_value("glance_image_sync_deletes_total",
                                             {"result": result})


def test_a_delete_moves_the_file_to_the_trash_with_who_asked_for_it(node):
    outcome = sync_for(node).apply(DELETE)
    assert outcome == Outcome(True, "moved to the trash", changed=True)
    assert not node.path.exists() and node.trashed.read_bytes() == DATA
    assert IMAGE in node.tombstones
    entry = Trash(node.store).get(IMAGE)
    assert (entry.event_type, entry.message_id, entry.publisher, entry.source) == (
        "image.delete", "m-7", "image.node2", "node2")
    assert deletes(node.metrics, "applied") == 1
    assert sync_for(node).apply(DELETE) == Outcome(True, "was not here")  # a replay


def test_with_no_grace_a_delete_removes_the_file_as_before(node):
    assert sync_for(node, trash=False).apply(DELETE) == Outcome(True, "deleted", changed=True)
    assert not node.path.exists() and not node.trashed.parent.exists()


def test_an_md5_verified_before_a_restart_is_recorded_without_reading_the_file(node):
    version = file_version(os.stat(node.path))
    upload = ImageEvent(Action.PRESENT, IMAGE, "node2", MD5, len(DATA), "image.upload")
    node.records.write(upload, True, "installed from node2", 1, (version, MD5))
    sync_for(node).apply(DELETE)
    entry = Trash(node.store).get(IMAGE)
    assert (entry.md5, entry.md5_from) == (MD5, "verified")


def test_an_image_glance_still_has_stays_and_its_delete_is_refused(node):
    api = Api(ImageState.ACTIVE, "Glance's API: status active")
    outcome = sync_for(node, api).apply(DELETE)
    assert (outcome.ok, outcome.refused) == (False, True)
    assert outcome.detail == f"{REFUSED} (Glance's API: status active)"
    assert node.path.read_bytes() == DATA and IMAGE not in node.tombstones
    assert api.asked == [IMAGE] and deletes(node.metrics, "refused") == 1


def test_when_glance_cannot_tell_the_delete_is_a_failed_attempt_and_the_file_stays(node):
    outcome = sync_for(node, Api(ImageState.CANNOT_TELL, "Glance's API answered 503")).apply(
        DELETE)
    assert (outcome.ok, outcome.refused) == (False, False)  # retried as any failure
    assert "not deleted until Glance's API confirms it: Glance's API answered 503" in \
        outcome.detail
    assert node.path.exists() and IMAGE not in node.tombstones
    assert deletes(node.metrics, "unconfirmed") == 1


def test_a_delete_glance_confirms_is_applied_and_a_replay_is_not_asked_again(node):
    api = Api(ImageState.GONE, "Glance's API: no such image (404)")
    assert sync_for(node, api).apply(DELETE).changed
    assert sync_for(node, api).apply(DELETE) == Outcome(True, "was not here")
    assert api.asked == [IMAGE]


def test_a_burst_of_deletes_is_logged_once_as_an_error_and_raised_as_a_metric(node, caplog):
    logging.getLogger().addHandler(caplog.handler)  # oslo.log's set-up may have removed it
    caplog.set_level(logging.INFO)
    sync = sync_for(node)
    sync.metrics.delete_rate.threshold = 3
    for n in range(5):
        image_id = IMAGE[:-1] + str(n)
        (node.path.parent / image_id).write_bytes(DATA)
        sync.apply(ImageEvent(Action.ABSENT, image_id, None, event_type="image.delete"))
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == ["4 image deletes within a minute on node1, more than "
                      "delete_alarm_threshold (3): a mass delete? Check who sent them "
                      "('glance-image-sync show <image id>'); 'glance-image-sync restore "
                      "<image id>' puts a trashed image back"]
    samples = {s.name: s.value for family in node.metrics.registry.collect()
               for s in family.samples}
    assert samples["glance_image_sync_deletes_last_minute"] == 5
    assert samples["glance_image_sync_delete_burst"] == 1


def test_the_delete_rate_counts_a_sliding_minute_and_a_burst_starts_once():
    now = [0.0]
    rate = DeleteRate(2, clock=lambda: now[0])
    assert [rate.add() for _ in range(4)] == [None, None, 3, None]
    assert rate.burst() == 1 and rate.count() == 4
    now[0] = 61.0
    assert rate.count() == 0 and rate.burst() == 0
    assert [rate.add() for _ in range(3)] == [None, None, 3]  # a new burst, told again


# -- the sync worker ------------------------------------------------------------------


class Inline:
    def submit(self, key, job):
        job()


def test_a_refused_delete_is_dead_lettered_with_the_reason_and_counts_as_rejected(tmp_path):
    settings = settings_for(tmp_path)
    refusal = Outcome(False, f"{REFUSED} (Glance's API: status active)", refused=True)
    image_sync = types.SimpleNamespace(apply=lambda event: refusal, nodes=None)
    worker = SyncWorker(settings, image_sync, Inline())
    parts = fakes.attach(worker, queue_name=topology.node_queue_name("node1"))
    fakes.deliver(worker, fakes.message(body=DELETE.to_wire(), tag=5))
    worker.loop.run_calls()
    sent = parts.publisher.sent[-1]
    assert sent.routing_key == topology.DEAD_LETTER_QUEUE
    assert sent.headers[REASON_HEADER] == "image still active in Glance (Glance's API: " \
        "status active)"
    sent.on_done(True, "")
    worker.flush()
    assert parts.channel.acks == [(5, True)]  # acked once its copy is confirmed
    assert worker.rejected == 1 and worker.failed_attempts == 0
    assert worker.last_error[1:] == (IMAGE, refusal.detail)


# -- the wire format -------------------------------------------------------------------


def test_a_delete_carries_what_glance_said_of_the_file_and_old_events_still_read():
    event = ImageEvent(Action.ABSENT, IMAGE, None, MD5, len(DATA), "image.delete",
                       publisher="image.localhost")
    assert events.from_wire(event.to_wire(), Nodes(list(NODES), "node1")) == event
    old = {"version": 1, "action": "absent", "image_id": IMAGE, "source": "node2",
           "checksum": None, "size": None, "event_type": "image.delete"}
    read = events.from_wire(json.dumps(old).encode(), Nodes(list(NODES), "node1"))
    assert (read.publisher, read.checksum, read.size) == (None, None, None)
    with pytest.raises(Rejected, match="checksum"):
        events.from_wire(json.dumps({**old, "checksum": "x"}).encode(),
                         Nodes(list(NODES), "node1"))


# -- the purge schedule ----------------------------------------------------------------


def test_the_keeper_lists_the_trash_when_something_is_due_or_space_is_short(node, caplog):
    logging.getLogger().addHandler(caplog.handler)
    caplog.set_level(logging.INFO)
    trash = Trash(node.store)
    trash.put(IMAGE, Cause(event_type="image.delete", publisher="image.node2"), now=1000.0)
    now = [1010.0]
    free = [50.0]
    trash.free_percent = lambda: free[0]
    keeper = TrashKeeper(trash, DeleteSettings(grace=100, min_free_percent=10), node.metrics,
                         "node1", clock=lambda: now[0])
    assert keeper.tend() == [] and keeper.next_scan == 1100.0  # the first look lists it
    now[0] = 1050.0
    trash.purge = None  # not due, space enough: the trash is not even listed
    assert keeper.tend() == []
    del trash.purge
    now[0] = 1100.0
    assert [(e.image_id, why) for e, why in keeper.tend()] == [(IMAGE, "expired")]
    assert node.metrics.registry.get_sample_value("glance_image_sync_trash_purged_total",
                                                  {"reason": "expired"}) == 1
    assert keeper.next_scan == now[0] + 100  # an empty trash: looked at again within the grace
    assert f"image {IMAGE}: purged from the trash on node1, its grace period over" in caplog.text

    (node.path.parent / IMAGE).write_bytes(DATA)
    trash.put(IMAGE, Cause(), now=1150.0)
    free[0] = 4.0
    now[0] = 1151.0
    assert [why for _, why in keeper.tend()] == ["space"]
    assert "before its grace period ended: 4.0 % of the store's file system was free, below " \
        "trash_min_free_percent (10 %); oldest first" in caplog.text
    assert CHECK_EVERY <= 10


# -- doctor ------------------------------------------------------------------------------


def test_doctor_names_the_protection_in_force(tmp_path):
    (tmp_path / "images").mkdir()
    settings = settings_for(tmp_path)
    check = doctor_deletes.protection_check(settings, types.SimpleNamespace(configured=False))
    assert check.status == "PASS" and check.detail.startswith(
        "the trash: deleted images stay in the trash for 1 d (deleted_image_grace 86400 s")
    check = doctor_deletes.protection_check(settings, Api(ImageState.GONE, "no such image"))
    assert check.status == "PASS" and check.detail.startswith(
        "Glance's API is asked before each delete (about a random id it answered: no such "
        "image); deleted images stay in the trash")
    check = doctor_deletes.protection_check(settings, Api(ImageState.CANNOT_TELL, "401"))
    assert check.status == "FAIL" and "every delete waits" in check.detail
    check = doctor_deletes.protection_check(settings, Api(ImageState.ACTIVE, "status active"))
    assert check.status == "FAIL" and "endpoint_override" in check.fix

    settings = settings_for(tmp_path, deleted_image_grace=0)
    check = doctor_deletes.protection_check(settings, types.SimpleNamespace(configured=False))
    assert check.status == "FAIL" and check.detail.startswith("none: no Glance API credentials")


def test_a_copy_that_finds_too_little_room_has_the_oldest_trash_purged_for_it(node, caplog):
    logging.getLogger().addHandler(caplog.handler)
    trash = Trash(node.store)
    older = IMAGE[:-1] + "0"
    (node.path.parent / older).write_bytes(DATA)
    trash.put(older, Cause(event_type="image.delete"), now=100.0)
    trash.put(IMAGE, Cause(event_type="image.delete"), now=200.0)
    keeper = TrashKeeper(trash, DeleteSettings(grace=3600, min_free_percent=0), node.metrics,
                         "node1", clock=lambda: 300.0)
    node.store.make_room = keeper.make_room
    # Room for one more image once one trashed image is gone.
    node.store.free_bytes = lambda: len(DATA) * (2 - len(trash.entries()))
    other = "5f0b5d6c-1c6e-4f5a-9a39-1f4c1e1a7e11"

    def fetch(path):
        with open(path, "r+b") as f:
            f.write(DATA)
    node.store.install(other, len(DATA), MD5, fetch)
    assert [e.image_id for e in trash.entries()] == [IMAGE]  # the older one went
    assert f"image {older}: purged from the trash on node1 before its grace period ended: " \
        f"a copy of {len(DATA)} bytes needed the room; oldest first" in caplog.text


def test_a_cron_run_purges_what_is_due_before_it_starts(tmp_path):
    (tmp_path / "images").mkdir()
    settings = settings_for(tmp_path, deleted_image_grace=60)
    store = ImageStore(settings.store)
    try:
        for image_id, when in ((IMAGE, 0.0), (IMAGE[:-1] + "0", None)):  # long ago; now
            (tmp_path / "images" / image_id).write_bytes(DATA)
            Trash(store).put(image_id, Cause(), now=when)
    finally:
        store.close()
    with sync_loop(settings, once=True) as loop:  # no broker needed before run()
        assert [e.image_id for e in loop.component.image_sync.trash.entries()] == [
            IMAGE[:-1] + "0"]
        loop.close()
