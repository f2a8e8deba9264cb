"""The node state file and the metrics, without a broker (unit tests)."""

import json
import logging
import os
import threading

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from glance_image_sync.events import Action, ImageEvent
from glance_image_sync.exceptions import NodeStateError, TransferCancelled, TransferFailed
from glance_image_sync.metrics import Metrics
from glance_image_sync.state import nodestate
from glance_image_sync.sync.apply import Outcome
from glance_image_sync.sync.worker import SyncWorker
from tests.helpers import settings_for

IMAGE = "b90e9b0f-36ce-43c1-b08c-9b4201f6571f"
EVENT = ImageEvent(Action.PRESENT, IMAGE, "node1", "0" * 32, 1000)


def samples(registry) -> dict:
    """{(sample name, sorted labels): value}, as Prometheus would parse the exposition."""
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_nothing_recorded_reads_as_an_empty_snapshot(tmp_path):
    assert nodestate.load(str(tmp_path)) == nodestate.Snapshot()


def test_outcomes_survive_into_a_new_process_and_keep_the_other_field(tmp_path):
    state = nodestate.NodeState(str(tmp_path))
    state.record_success(IMAGE, "installed from node1", when=100.0)
    state.record_error(IMAGE, "node1: rsync exited 255", when=200.0)

    again = nodestate.NodeState(str(tmp_path))  # a later cron run
    again.record_success(IMAGE, "already in place", when=300.0)

    loaded = nodestate.load(str(tmp_path))
    assert loaded.last_success == nodestate.Record(300.0, IMAGE, "already in place")
    assert loaded.last_error == nodestate.Record(200.0, IMAGE, "node1: rsync exited 255")
    assert os.stat(nodestate.path_in(str(tmp_path))).st_mode & 0o777 == 0o644
    assert os.listdir(tmp_path) == [nodestate.FILE_NAME]  # no temporary left behind


def test_a_reader_never_sees_a_partial_record_while_writers_race(tmp_path):
    state = nodestate.NodeState(str(tmp_path))
    stop = threading.Event()
    seen, problems = [], []

    def read():
        while not stop.is_set():
            try:
                seen.append(nodestate.load(str(tmp_path)))
            except NodeStateError as exc:
                problems.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=lambda n=n: [
        state.record_success(IMAGE, f"writer {n} #{i}") for i in range(100)]) for n in range(3)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    stop.set()
    reader.join()
    assert problems == []
    assert seen and nodestate.load(str(tmp_path)).last_success.detail.endswith("#99")


def test_a_damaged_record_is_reported_by_load_and_replaced_by_the_next_outcome(tmp_path):
    path = nodestate.path_in(str(tmp_path))
    with open(path, "w") as f:
        f.write('{"version": 1, "last_success": {"time": "x"')
    with pytest.raises(NodeStateError, match="not a status record"):
        nodestate.load(str(tmp_path))
    nodestate.NodeState(str(tmp_path)).record_error(IMAGE, "disk full", when=5.0)
    with open(path) as f:
        assert json.load(f)["last_error"] == {"time": 5.0, "image_id": IMAGE,
                                               "detail": "disk full"}


def test_events_are_counted_as_received_and_applied_but_not_cancellations():
    metrics = Metrics()
    metrics.received("present")
    metrics.received("present")
    metrics.received("rejected")
    metrics.applied(Outcome(True, "installed from node1", changed=True))
    metrics.applied(Outcome(False, "node1: timeout"))
    metrics.applied(Outcome(False, "cancelled", cancelled=True))
    metrics.applied(Outcome(True, "already in place"))

    got = samples(metrics.registry)
    assert got[("glance_image_sync_events_received_total", (("action", "present"),))] == 2
    assert got[("glance_image_sync_events_received_total", (("action", "rejected"),))] == 1
    assert got[("glance_image_sync_events_received_total", (("action", "absent"),))] == 0
    assert got[("glance_image_sync_events_applied_total", (("result", "ok"),))] == 2
    assert got[("glance_image_sync_events_applied_total", (("result", "failed"),))] == 1


def _worker(tmp_path, state_dir):
    return SyncWorker(settings_for(tmp_path), image_sync=None, dispatcher=None,
                      node_state=nodestate.NodeState(str(state_dir)))


def test_changes_and_errors_are_recorded_for_status_no_ops_and_cancellations_not(tmp_path):
    worker = _worker(tmp_path, tmp_path)
    worker._record(EVENT, Outcome(True, "installed from node1", changed=True))
    worker._record(EVENT, Outcome(False, "node1: timeout"))
    worker._record(EVENT, Outcome(False, "cancelled", cancelled=True))
    worker._record(EVENT, Outcome(True, "already in place"))
    snapshot = nodestate.load(str(tmp_path))
    assert snapshot.last_success.detail == "installed from node1"
    assert snapshot.last_error.detail == "node1: timeout"


def test_an_unwritable_state_dir_is_logged_and_syncing_goes_on(tmp_path, caplog):
    state_dir = tmp_path / "gone"
    state_dir.mkdir()
    worker = _worker(tmp_path, state_dir)
    logging.getLogger().addHandler(caplog.handler)  # oslo.log's set-up removed it
    state_dir.rmdir()
    worker._record(EVENT, Outcome(True, "installed from node1", changed=True))  # no raise
    assert f"cannot record the outcome for image {IMAGE}" in caplog.text


def test_transfers_are_counted_by_peer_and_result_and_timed_when_installed():
    metrics = Metrics()
    with metrics.transfer("node1", 1000):
        pass
    with pytest.raises(TransferFailed), metrics.transfer("node2", 500):
        raise TransferFailed("rsync exited 255")
    with pytest.raises(TransferCancelled), metrics.transfer("node2", 500):
        raise TransferCancelled("shutting down")

    got = samples(metrics.registry)
    assert got[("glance_image_sync_transfers_total", (("peer", "node1"), ("result", "ok")))] == 1
    assert got[("glance_image_sync_transfers_total",
                (("peer", "node2"), ("result", "failed")))] == 1
    assert ("glance_image_sync_transfers_total", (("peer", "node2"), ("result", "ok"))) \
        not in got
    assert got[("glance_image_sync_transferred_bytes_total", (("peer", "node1"),))] == 1000
    assert got[("glance_image_sync_transfer_seconds_count", ())] == 1
