"""Per-image records and ``show``, without a broker (unit tests)."""

import hashlib
import json
import os
import types

import pytest

from glance_image_sync.admin import show
from glance_image_sync.cmd import commands as cli
from glance_image_sync.events import Action, ImageEvent
from glance_image_sync.exceptions import NodeStateError
from glance_image_sync.state import records
from glance_image_sync.state.records import ImageRecords
from glance_image_sync.state.tombstones import Tombstones
from glance_image_sync.store.images import file_version
from glance_image_sync.sync.apply import Outcome
from glance_image_sync.sync.worker import SyncWorker
from tests.helpers import settings_for, write_config

IMAGE = "b90e9b0f-36ce-43c1-b08c-9b4201f6571f"
DATA = b"an image" * 1000
MD5 = hashlib.md5(DATA).hexdigest()
EVENT = ImageEvent(Action.PRESENT, IMAGE, "node1", MD5, len(DATA), "image.upload")


def test_an_image_id_is_any_spelling_of_a_uuid_and_nothing_else(tmp_path, capsys):
    assert show.image_id_argument(IMAGE.upper()) == IMAGE
    path = write_config(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--config-file", str(path), "show", "not-a-uuid"])
    assert exit_.value.code == 2
    assert "'not-a-uuid' is not an image id" in capsys.readouterr().err


def test_a_record_is_written_read_back_and_pruned_with_age(tmp_path):
    kept = ImageRecords(str(tmp_path), 3600)
    assert records.load(str(tmp_path), IMAGE) is None and not kept.has(IMAGE)
    kept.write(EVENT, True, "installed from node1", 1, ((1, 2, 3, 4, 5), MD5), when=100.0)
    doc = records.load(str(tmp_path), IMAGE)
    assert doc["event_type"] == "image.upload" and doc["detail"] == "installed from node1"
    assert doc["verified"] == {"file": [1, 2, 3, 4, 5], "md5": MD5}
    assert oct(os.stat(records.path_of(str(tmp_path), IMAGE)).st_mode & 0o777) == "0o644"
    assert kept.prune(now=os.stat(records.path_of(str(tmp_path), IMAGE)).st_mtime + 10) == 0
    assert kept.prune(now=os.stat(records.path_of(str(tmp_path), IMAGE)).st_mtime + 4000) == 1
    assert not kept.has(IMAGE)


def test_a_damaged_record_is_an_error_that_names_it(tmp_path):
    ImageRecords(str(tmp_path), 3600)
    with open(records.path_of(str(tmp_path), IMAGE), "w") as f:
        f.write("{not json")
    with pytest.raises(NodeStateError, match="is not an image record"):
        records.load(str(tmp_path), IMAGE)


def _worker(tmp_path, verification=None):
    store = types.SimpleNamespace(verification=lambda image_id: verification)
    return SyncWorker(settings_for(tmp_path), image_sync=types.SimpleNamespace(store=store),
                      dispatcher=None, records=ImageRecords(str(tmp_path), 3600))


def test_the_worker_records_changes_failures_and_the_first_no_op_only(tmp_path):
    worker = _worker(tmp_path, verification=((1, 2, 3, 4, 5), MD5))
    path = records.path_of(str(tmp_path), IMAGE)
    worker._record_image(EVENT, Outcome(True, "already in place"), 1)  # first sight
    assert records.load(str(tmp_path), IMAGE)["verified"]["md5"] == MD5
    first = os.stat(path).st_ino
    worker._record_image(EVENT, Outcome(True, "already in place"), 1)  # image.update again
    worker._record_image(EVENT, Outcome(False, "cancelled", cancelled=True), 1)
    assert os.stat(path).st_ino == first  # not rewritten
    worker._record_image(EVENT, Outcome(False, "node1: timeout"), 3)
    doc = records.load(str(tmp_path), IMAGE)
    assert (doc["ok"], doc["attempt"], doc["verified"]) == (False, 3, None)
    deleted = ImageEvent(Action.ABSENT, IMAGE, "node1", event_type="image.delete")
    worker._record_image(deleted, Outcome(True, "deleted", changed=True), 1)
    assert records.load(str(tmp_path), IMAGE)["action"] == "absent"


def test_an_unwritable_record_is_logged_and_syncing_goes_on(tmp_path, caplog):
    import logging

    worker = _worker(tmp_path)
    logging.getLogger().addHandler(caplog.handler)  # oslo.log's set-up removed it
    os.rmdir(worker.records.path)
    worker._record_image(EVENT, Outcome(True, "installed", changed=True), 1)  # no raise
    assert f"cannot record image {IMAGE}" in caplog.text


def _store_with_image(tmp_path, verified=True):
    store = tmp_path / "images"
    store.mkdir(exist_ok=True)
    path = store / IMAGE
    path.write_bytes(DATA)
    kept = ImageRecords(str(tmp_path / "state"), 3600)
    version = file_version(os.stat(path)) if verified else (0, 0, 0, 0, 0)
    kept.write(EVENT, True, "installed from node1", 1, (version, MD5), when=100.0)
    return path


def test_on_disk_says_whether_the_md5_is_known_and_verify_reads_it_now(tmp_path):
    path = _store_with_image(tmp_path)
    record = records.load(str(tmp_path / "state"), IMAGE)
    disk = show.on_disk(str(tmp_path / "images"), IMAGE, record, verify=False)
    assert (disk["verified"], disk["md5"], disk["matches"]) == ("by the sync worker", MD5, True)
    assert "has not changed since" in show._md5_text(disk)

    with open(path, "r+b") as f:  # same size, other bytes: a changed file
        f.write(b"X")
    disk = show.on_disk(str(tmp_path / "images"), IMAGE, record, verify=False)
    assert disk["verified"] is None and "--verify" in show._md5_text(disk)
    disk = show.on_disk(str(tmp_path / "images"), IMAGE, record, verify=True)
    assert disk["verified"] == "now" and disk["matches"] is False
    assert "DOES NOT MATCH" in show._md5_text(disk)
    assert show.on_disk(str(tmp_path / "images"), str(EVENT.image_id).replace("b", "c"),
                        record, False) is None


def test_show_without_a_broker_says_what_it_knows_and_that_the_queues_are_unknown(
        tmp_path, capsys):
    _store_with_image(tmp_path)
    Tombstones(str(tmp_path / "state"), 3600).add(IMAGE)
    path = write_config(tmp_path, transport_url="rabbit://guest:secret@127.0.0.1:1/")
    assert cli.main(["--config-file", str(path), "show", IMAGE.upper()]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"image {IMAGE} on node1\n")
    assert f"md5:        {MD5}, matches the last event's (verified by the sync worker" in out
    assert "last event: image.upload (ensure present), applied " in out
    assert "attempt 1: installed from node1" in out
    assert "queues:     unknown (amqp://guest:****@127.0.0.1:1/" in out
    assert "deleted:    yes, remembered since" in out
    assert "secret" not in out

    assert cli.main(["--config-file", str(path), "show", IMAGE, "--format", "json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["on_disk"]["size"] == len(DATA) and doc["on_disk"]["matches"] is True
    assert doc["last_event"]["checksum"] == MD5 and doc["deleted"] > 0
    assert doc["problems"][0].startswith("the queues could not be read")


@pytest.mark.broker
def test_show_before_any_fan_out_finds_no_queue_and_says_so_without_an_error(
        tmp_path, capsys, vhost):
    path = write_config(tmp_path, transport_url=f"rabbit://guest:guest@127.0.0.1:5672/{vhost}")
    (tmp_path / "images").mkdir()  # a node's store, with nothing in it (nor in its trash)
    assert cli.main(["--config-file", str(path), "show", IMAGE]) == 0
    out = capsys.readouterr().out
    assert "on disk:    no such file" in out and "last event: none recorded" in out
    assert "queues:     in none of this node's retry queues nor its failed queue" in out
