"""The supervisor's decisions, with stand-in loops and notifier: READY once both
loops run (the broker may come later), WATCHDOG only while both make progress,
STATUS in words, SIGHUP, refused credentials."""

import threading
import time
from types import SimpleNamespace

import pytest
from oslo_config import cfg

from glance_image_sync import service
from glance_image_sync.cmd.commands import COMMAND_OPT
from glance_image_sync.daemon.supervisor import Supervisor
from tests.helpers import write_config
from tools.localcluster import wait_for

IMAGE = "b90e9b0f-36ce-43c1-b08c-9b4201f6571f"


class Notifier:
    def __init__(self):
        self.sent = []

    def ready(self):
        self.sent.append("READY=1")

    def status(self, text):
        self.sent.append(f"STATUS={text}")

    def watchdog(self):
        self.sent.append("WATCHDOG=1")

    def stopping(self):
        self.sent.append("STOPPING=1")

    def reloading(self):
        self.sent.append("RELOADING=1")


class Loop:
    def __init__(self, name):
        self.name = name
        self.connected = False
        self.connecting = False
        self.outage = None
        self.blocked = None
        self.broker_url = None
        self.last_progress = time.monotonic()
        self.calls = []
        self.component = SimpleNamespace(
            image_sync=SimpleNamespace(rsync=SimpleNamespace(running=0)),
            last_success=None, last_error=None, failed_attempts=0,
            set_nodes=lambda nodes: self.calls.append(nodes))

    def call_soon(self, fn):
        fn()

    def wake(self):
        pass


@pytest.fixture
def supervisor(tmp_path):
    path = write_config(tmp_path)
    conf = cfg.ConfigOpts()
    settings = service.prepare(conf, ["--config-file", str(path), "daemon"], COMMAND_OPT)
    sup = Supervisor(conf, settings, notifier=Notifier(), handle_signals=False)
    sup.loops = [Loop("fan-out"), Loop("sync")]
    sup.config_path = path
    return sup


WATCHDOG = 0.1  # seconds between pings, as watchdog_interval() would say


def test_ready_at_once_the_broker_may_come_later_and_the_watchdog_only_after_ready(
        supervisor, caplog):
    """No start-up timeout and restart loop under systemd while the broker is away."""
    fanout, sync = supervisor.loops
    sent = supervisor.notifier.sent
    fanout.connected = True
    supervisor._tick(WATCHDOG)
    assert sent[:3] == [f"STATUS={supervisor.status_text()}", "READY=1", "WATCHDOG=1"]
    assert supervisor.status_text().startswith(
        "fan-out consuming; sync connecting to amqp://guest:****@127.0.0.1:5672/")
    assert "ready: consuming" not in caplog.text
    sync.connected = True
    supervisor._tick(WATCHDOG)
    supervisor._tick(WATCHDOG)
    assert sent.count("READY=1") == 1 and sent.count("WATCHDOG=1") == 3
    assert caplog.text.count("ready: consuming on node1") == 1


def test_without_a_watchdog_configured_nothing_is_pinged(supervisor):
    for loop in supervisor.loops:
        loop.connected = True
    supervisor._tick(None)
    assert "READY=1" in supervisor.notifier.sent
    assert "WATCHDOG=1" not in supervisor.notifier.sent


def test_a_loop_without_progress_stops_the_watchdog_pings_and_says_so(supervisor):
    for loop in supervisor.loops:
        loop.connected = True
    supervisor._tick(WATCHDOG)
    supervisor.loops[1].last_progress -= 3600  # wedged for an hour
    supervisor.notifier.sent.clear()
    supervisor._tick(WATCHDOG)
    sent = supervisor.notifier.sent
    assert "WATCHDOG=1" not in sent
    assert any("sync stuck (no progress for" in s for s in sent)


def test_the_supervisor_loop_ends_with_stopping_on_a_stop_request(supervisor):
    thread = threading.Thread(target=supervisor._supervise, daemon=True)
    thread.start()
    wait_for(lambda: supervisor.notifier.sent, 5, what="a first status")
    supervisor.request_stop()
    thread.join(5)
    assert not thread.is_alive() and "STOPPING=1" in supervisor.notifier.sent


def test_status_says_what_each_loop_does_and_how_syncing_goes(supervisor):
    fanout, sync = supervisor.loops
    fanout.connected = True
    sync.outage = (time.time(), "ConnectionRefusedError: [Errno 111] Connection refused")
    sync.component.image_sync.rsync.running = 2
    sync.component.last_success = (time.time(), IMAGE, "installed from node2")
    sync.component.failed_attempts = 1
    sync.component.last_error = (time.time(), IMAGE, "node2: timeout")
    text = supervisor.status_text()
    assert text.startswith("fan-out consuming; sync waiting for the broker since ")
    assert "Connection refused" in text and "2 transfers running" in text
    assert "last sync " in text and f"({IMAGE})" in text
    assert "1 failed attempts, last " in text and "node2: timeout" in text
    sync.outage = None
    assert "sync connecting to amqp://guest:****@127.0.0.1:5672/" in supervisor.status_text()
    fanout.blocked, fanout.broker_url = (time.time(), "low on memory"), "amqp://b1:5672/"
    assert supervisor.status_text().startswith(
        "fan-out consuming, broker blocked since ")
    assert "(amqp://b1:5672/: a memory or disk alarm)" in supervisor.status_text()


def test_trying_a_broker_may_take_longer_than_a_turn_of_the_loop(supervisor):
    fanout, _ = supervisor.loops
    fanout.last_progress -= supervisor.settings.broker.heartbeat / 4 + 10
    assert supervisor._stuck_for(fanout)
    fanout.connecting = True  # TCP, TLS and AMQP's handshake: up to 15 s
    assert not supervisor._stuck_for(fanout)


def test_refused_credentials_stop_the_daemon_with_exit_78_and_one_line(supervisor, caplog):
    from glance_image_sync.exceptions import BrokerRefused

    def refused():
        raise BrokerRefused("amqp://guest:****@127.0.0.1:5672/ refused the credentials")

    for loop in supervisor.loops:
        loop.run = refused
    for loop in supervisor.loops:  # both loops meet it
        supervisor._run_loop(loop)
    assert supervisor._exit_status == 78 and supervisor.stop_event.is_set()
    assert caplog.text.count("refused the credentials") == 1
    assert supervisor.notifier.sent.count("STOPPING=1") == 1


def test_sighup_gives_both_loops_the_new_api_nodes(supervisor):
    write_config(supervisor.config_path.parent, api_nodes="node1,node2,node3,node4")
    supervisor.request_reload()
    supervisor._tick(WATCHDOG)
    assert supervisor.loops[0].calls[0].all == ("node1", "node2", "node3", "node4")
    assert supervisor.settings.nodes.all == ("node1", "node2", "node3", "node4")
    assert "RELOADING=1" in supervisor.notifier.sent


def test_a_bad_file_on_sighup_keeps_the_running_configuration(supervisor):
    write_config(supervisor.config_path.parent, api_nodes="node2,node3")  # without this node
    supervisor.request_reload()
    supervisor._tick(WATCHDOG)
    assert "RELOADING=1" in supervisor.notifier.sent
    assert supervisor.settings.nodes.all == ("node1", "node2", "node3")
    assert all(not loop.calls for loop in supervisor.loops)
