"""status and reconcile: their decisions and parsers, without broker or root."""

import io
import json
import time
import uuid

import pytest
from oslo_config import cfg

from glance_image_sync import service
from glance_image_sync.admin import reconcile, status
from glance_image_sync.admin.reconcile import HERE_ONLY, MISSING, SIZE_MISMATCH
from glance_image_sync.broker.queues import NodeQueues, Overview, QueueStats
from glance_image_sync.cmd import commands as cli
from glance_image_sync.state.nodestate import Record, Snapshot
from glance_image_sync.transfer import listing
from glance_image_sync.transfer.listing import Entry

A, B, C, D = (str(uuid.UUID(int=n)) for n in range(1, 5))


def node_queues(node, messages=0, consumers=1, failed=0, retrying=0):
    return NodeQueues(node, QueueStats(f"glance_image_sync.{node}", messages, consumers),
                      (QueueStats(f"glance_image_sync.{node}.retry.10s", retrying, 0),),
                      QueueStats(f"glance_image_sync.{node}.failed", failed, 0))


def report(nodes, dead=0, snapshot=None, broker_error=None):
    overview = None if broker_error else Overview(
        QueueStats("glance_notifications.info", 0, 1), tuple(nodes),
        QueueStats("glance_image_sync.dead_letter", dead, 0))
    rep = status.Report("node1", "amqp://guest:****@h:5672/", overview, broker_error,
                        snapshot or Snapshot(), None, now=1000.0)
    rep.problems = status.problems(rep)
    return rep


def test_a_quiet_cluster_needs_no_human():
    rep = report([node_queues("node1"), node_queues("node2", messages=5, consumers=0)])
    assert rep.problems == []  # another node's waiting events are its own status' business
    assert status.exit_status(rep) == 0
    assert "OK: nothing needs attention" in status.render_table(rep)


@pytest.mark.parametrize("rep, expected", [
    (report([node_queues("node1", failed=2)]), "2 events of node1 ran out of attempts"),
    (report([node_queues("node1"), node_queues("node2", failed=1)]),
     "1 event of node2 ran out of attempts and waits in glance_image_sync.node2.failed"),
    (report([node_queues("node1", messages=1, consumers=0)]),
     "1 event waits in glance_image_sync.node1 and nothing consumes it"),
    (report([node_queues("node1")], dead=1), "1 message rejected as malformed or hostile "
     "waits in glance_image_sync.dead_letter"),
    (report([node_queues("node1")], dead=3), "3 messages rejected as malformed or hostile"),
    (report([node_queues("node1", messages=4, consumers=0)]),
     "4 events wait in glance_image_sync.node1 and nothing consumes it"),
    (report([NodeQueues("node1", QueueStats("glance_image_sync.node1"), (),
                        QueueStats("glance_image_sync.node1.failed"))]), "does not exist"),
    (report([node_queues("node1")], snapshot=Snapshot(Record(900.0, A, "installed"),
                                                      Record(950.0, B, "node2: timeout"))),
     "the last event applied on node1 failed"),
    (report([], broker_error="connection refused"), "the broker cannot be reached"),
])
def test_what_needs_a_human_is_named_and_exits_1(rep, expected):
    assert any(expected in problem for problem in rep.problems), rep.problems
    assert status.exit_status(rep) == 1
    table = status.render_table(rep)
    assert "NEEDS ATTENTION" in table and expected in table
    doc = json.loads(status.render_json(rep))
    assert doc["ok"] is False and any(expected in p for p in doc["problems"])


def test_an_error_followed_by_a_success_is_history():
    rep = report([node_queues("node1")], snapshot=Snapshot(Record(990.0, A, "installed"),
                                                           Record(950.0, B, "timeout")))
    assert rep.problems == []
    assert "last error:   " in status.render_table(rep) and "(50 s ago)" in \
        status.render_table(rep)


def test_status_with_an_unreachable_broker_exits_1_without_a_broker(tmp_path, capsys):
    path = tmp_path / "c.conf"
    path.write_text("[DEFAULT]\napi_nodes = node1,node2\nhost = node1\n"
                    "transport_url = rabbit://guest:secret@127.0.0.1:1/\n"
                    f"state_dir = {tmp_path}\n")
    assert cli.main(["--config-file", str(path), "status", "--format", "json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["broker"]["reachable"] is False
    assert "secret" not in json.dumps(doc)
    assert doc["problems"][0].startswith("the broker cannot be reached")


def test_compare_names_every_kind_of_difference():
    here = {A: Entry(10, 0), B: Entry(20, 0), C: Entry(30, 0)}
    listed = {"node2": {A: Entry(10, 0), C: Entry(31, 0), D: Entry(40, 0)},
              "node3": {A: Entry(10, 0), D: Entry(40, 0)}}
    findings = {f.image_id: f for f in reconcile.compare(here, listed)}
    assert {i: f.kind for i, f in findings.items()} == {
        B: HERE_ONLY, C: SIZE_MISMATCH, D: MISSING}
    assert set(findings[D].peers) == {"node2", "node3"}
    assert reconcile.compare(here, {}) == []  # no peer answered: nothing can be said


def test_a_listing_yields_only_regular_files_named_like_images():
    text = "\n".join([
        "drwxr-x---           4096 2024/05/01 10:42:07 .",
        "-rw-------         123456 2024/05/01 10:42:07 .glance-image-sync." + A + ".1a2b3c4d",
        f"-rw-r-----        4194304 2024/05/01 10:42:08 {A}",
        f"lrwxrwxrwx             11 2024/05/01 10:42:07 {B}",
        "-rw-r-----              0 2024/05/01 10:42:07 B90E9B0F-36CE-43C1-B08C-9B4201F6571F",
        "-rw-r--r--              5 2024/05/01 10:42:07 notes.txt",
    ])
    entries = listing.parse_listing(text)
    assert entries == {A: Entry(4194304, time.mktime((2024, 5, 1, 10, 42, 8, 0, 0, -1)))}


def test_the_md5_line_of_the_dry_run_is_found():
    out = f"d41d8cd98f00b204e9800998ecf8427e 0 other\n913141fc06f858b258281fbf91451c90 100 {A}\n"
    assert listing.parse_md5(out, A) == (100, "913141fc06f858b258281fbf91451c90")
    assert listing.parse_md5("", A) is None


def test_listing_commands_are_argument_lists_with_operands_after_a_double_dash(tmp_path):
    path = tmp_path / "c.conf"
    path.write_text("[DEFAULT]\napi_nodes = node1,node2\nhost = node1\n")
    settings = service.prepare(cfg.ConfigOpts(), ["--config-file", str(path), "both"],
                               cli.COMMAND_OPT)
    argv = listing.md5_argv(settings.transfer, "node2", A, "/tmp/empty")
    assert argv[-3:] == ["--", f"glance@node2:/var/lib/glance/images/{A}", "/tmp/empty/"]
    assert "--dry-run" in argv and "--checksum-choice=md5" in argv
    assert listing.list_argv(settings.transfer, "node2")[-2:] == [
        "--", "glance@node2:/var/lib/glance/images/"]


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_on_a_terminal_is_one_bar_redrawn_then_cleared():
    stream = Terminal()
    progress = reconcile.Progress(stream)
    finding = reconcile.Finding(A, MISSING, None, {}, action="fetched from node2")
    progress.start(1, 4, finding)
    progress.finish(1, 4, finding)
    progress.close()
    frames = stream.getvalue().split("\r\033[K")
    assert frames[1].startswith(f"[....................] 0/4 fetching {A}"[:60])
    assert frames[2].startswith("[#####...............] 1/4")
    assert frames[-1] == "" and "\n" not in stream.getvalue()


def test_progress_off_a_terminal_is_one_line_per_image():
    stream = io.StringIO()
    progress = reconcile.Progress(stream)
    findings = [reconcile.Finding(A, MISSING, None, {}, action="fetched from node2"),
                reconcile.Finding(B, HERE_ONLY, Entry(1, 0), {}, action="removed")]
    for index, finding in enumerate(findings, 1):
        progress.start(index, 2, finding)
        progress.finish(index, 2, finding)
    progress.close()
    assert stream.getvalue().splitlines() == [
        f"[1/2] {A} missing here: fetched from node2", f"[2/2] {B} here only: removed"]
