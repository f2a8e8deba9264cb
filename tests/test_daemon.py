"""The daemon on the real cluster: replication without cron, systemd's view of
it, broker restarts, shutdowns in the middle of a transfer, reloads."""

import logging
import os
import pathlib
import signal
import subprocess
import threading
import time

import pytest
from oslo_config import cfg

from glance_image_sync import service
from glance_image_sync.broker import topology
from glance_image_sync.cmd import commands as cli
from glance_image_sync.daemon.supervisor import Supervisor
from tests.clusterhelpers import free_port, queue_messages, scrape_until
from tests.notifysocket import NotifySocket
from tools.localcluster import rabbitmqctl, wait_for

pytestmark = pytest.mark.cluster


def start_all(cluster):
    for node in cluster.nodes:
        node.start_daemon()


def test_daemons_replicate_an_upload_and_a_delete_without_cron(cluster):
    start_all(cluster)
    image_id, md5, size = cluster.new_image("node1", size=16 * 1024 * 1024)
    cluster.upload(image_id, md5, size)
    wait_for(lambda: all(node.has(image_id, md5) for node in cluster.nodes), 30,
             what="the image on every node")
    cluster.delete(image_id, md5, size)
    wait_for(lambda: all(node.files() == [] for node in cluster.nodes), 30,
             what="the image gone everywhere")
    for node in cluster.nodes:
        assert node.stop_daemon() == 0
        log = node.log.read_text()
        assert "ready: consuming" in log and "stopped" in log
    assert "installed and verified on node2 (from node1)" in cluster["node2"].log.read_text()


def test_systemd_hears_ready_status_watchdog_and_stopping_in_order(cluster):
    notify = NotifySocket(cluster.base / "notify.sock")
    try:
        node = cluster["node2"]
        node.start_daemon(env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000"})
        wait_for(lambda: len(notify.times_of("WATCHDOG=1")) >= 3, 15, what="watchdog pings")
        assert node.stop_daemon() == 0
        wait_for(lambda: "STOPPING=1" in notify.texts(), 5, what="STOPPING=1")
    finally:
        notify.close()
    texts = notify.texts()
    ready = texts.index("READY=1")
    statuses = [t for t in texts if t.startswith("STATUS=")]
    assert texts[0].startswith("STATUS=")
    assert ready < texts.index("WATCHDOG=1") < texts.index("STOPPING=1")
    # READY=1 once the loops run (the broker may come later); STATUS says when they consume.
    assert any("fan-out consuming; sync consuming; 0 transfers running" in t
               for t in texts[ready:])
    assert all(not t.startswith("READY") for t in texts[texts.index("STOPPING=1"):])
    assert statuses
    pings = notify.times_of("WATCHDOG=1")
    assert max(b - a for a, b in zip(pings, pings[1:])) < 1.0  # every half of WatchdogSec


def _in_process_settings(cluster, node, **options):
    """Settings for running node's daemon inside this test process."""
    path = cluster.base / f"{node.name}-inproc.conf"
    text = node.config.read_text() + "".join(f"{k} = {v}\n" for k, v in options.items())
    text = text.replace("filesystem_store_datadir = /var/lib/glance/images",
                        f"filesystem_store_datadir = {node.images}")
    path.write_text(text)
    conf = cfg.ConfigOpts()
    settings = service.prepare(conf, ["--config-file", str(path), "daemon"], cli.COMMAND_OPT)
    return conf, settings


def _restore_root_handlers(handlers):
    """Undo oslo.log's setup, which replaced the root logger's handlers with its own.

    Its file handler writes into the cluster's directory, which goes with the cluster:
    left in place, every later log call of the test session would raise
    (WatchedFileHandler cannot reopen its file, and does not report that, it raises).
    """
    root = logging.getLogger()
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers


def test_a_wedged_consumer_stops_the_watchdog_pings(cluster, monkeypatch):
    notify = NotifySocket(cluster.base / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", notify.path)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    pytest_handlers = list(logging.getLogger().handlers)
    conf, settings = _in_process_settings(cluster, cluster["node2"], heartbeat=10)
    supervisor = Supervisor(conf, settings, handle_signals=False)
    thread = threading.Thread(target=supervisor.run)
    thread.start()
    release = threading.Event()
    try:
        wait_for(lambda: "READY=1" in notify.texts(), 20, what="READY=1")
        worker = supervisor.loops[1].component
        # A bug that blocks the sync worker's connection thread in a callback.
        monkeypatch.setattr(worker, "on_delivery", lambda delivery: release.wait(60))
        wait_for(lambda: len(notify.times_of("WATCHDOG=1")) >= 2, 10, what="pings")
        image_id, md5, size = cluster.new_image("node1", size=1024)
        cluster.upload(image_id, md5, size)
        # heartbeat 10 s: stuck after heartbeat / 4 + 5 = 7.5 s without progress.
        wait_for(lambda: any("sync stuck (no progress for" in text for text in notify.texts()),
                 30, what="STATUS to report the stuck consumer")
        stuck_at = next(at for at, text in notify.messages if "sync stuck" in text)
        wait_for(lambda: notify.messages[-1][0] > stuck_at + 3, 20,
                 what="three more seconds of STATUS updates")
        assert [t for t in notify.times_of("WATCHDOG=1") if t >= stuck_at] == []
        assert "fan-out consuming" in notify.messages[-1][1]  # the other one is fine
    finally:
        release.set()
        supervisor.request_stop()
        thread.join(30)
        notify.close()
        _restore_root_handlers(pytest_handlers)
    assert not thread.is_alive()


@pytest.mark.own_broker  # it restarts RabbitMQ
def test_daemons_reconnect_after_a_rabbitmq_restart(cluster):
    start_all(cluster)
    marks = {node.name: node.log.stat().st_size for node in cluster.nodes}
    cluster.brokers[0].restart()
    # Glance's non-durable notification queue died with the broker; the
    # daemons declare it again when they reconnect.
    wait_for(lambda: all("consuming glance_notifications.info" in node.log_since(marks[node.name])
                         for node in cluster.nodes), 60, what="every fan-out to reconnect")
    image_id, md5, size = cluster.new_image("node1", size=4 * 1024 * 1024)
    cluster.upload(image_id, md5, size)
    wait_for(lambda: all(node.has(image_id, md5) for node in cluster.nodes), 60,
             what="the image on every node after the restart")
    log = cluster["node2"].log_since(marks["node2"])
    assert "reconnecting in" in log
    assert all(node.daemon.poll() is None for node in cluster.nodes)


@pytest.mark.cluster_config(rsync_bwlimit=4096)  # KiB/s: 24 MiB take about 6 s
def test_sigterm_during_a_transfer_abandons_it_cleanly_and_it_completes_later(cluster):
    for node in cluster.nodes:
        node.start_daemon()
    image_id, md5, size = cluster.new_image("node1", size=24 * 1024 * 1024)
    cluster.upload(image_id, md5, size)
    node2 = cluster["node2"]
    wait_for(lambda: node2.temporaries(), 20, what="node2's transfer to start")
    started = time.monotonic()
    assert node2.stop_daemon() == 0
    assert time.monotonic() - started < 5, "SIGTERM must be honoured promptly"
    assert node2.temporaries() == [] and not node2.path(image_id).exists()
    assert topology.node_queue_name("node2") in cluster.queue_depths()
    assert cluster.queue_depths()[topology.node_queue_name("node2")] >= 1  # not acked

    node2.start_daemon()
    wait_for(lambda: node2.has(image_id, md5), 60, what="the transfer after the restart")
    assert node2.temporaries() == []


def test_sighup_reloads_api_nodes_and_the_log_level(cluster):
    node1 = cluster["node1"]
    port = free_port()
    node1.write_config({"metrics_listen_port": port})
    config = node1.config.read_text()
    node1.config.write_text(config.replace("api_nodes = node1,node2,node3",
                                           "api_nodes = node1,node2"))
    node1.start_daemon()
    node3_queue = topology.node_queue_name("node3")
    assert node3_queue not in cluster.queue_depths()

    node1.config.write_text(config + "debug = true\n")
    mark = node1.log.stat().st_size
    node1.daemon.send_signal(signal.SIGHUP)
    wait_for(lambda: "api_nodes is now node1, node2, node3" in node1.log_since(mark), 20,
             what="the reload")
    image_id, md5, size = cluster.new_image("node1", size=1024)
    cluster.upload(image_id, md5, size)
    wait_for(lambda: cluster.queue_depths().get(node3_queue, 0) == 3, 20,
             what="node3's queue to get the upload's events")
    assert " DEBUG " in node1.log_since(mark)
    # The metrics follow the reload: node3's queue is reported with its events.
    scrape_until(port, lambda got: got.get(queue_messages(node3_queue)) == 3,
                 "node3's queue in the metrics")
    assert node1.daemon.poll() is None


def test_daemonize_writes_a_pidfile_that_a_crash_does_not_leave_blocking(cluster):
    node = cluster["node3"]
    pidfile = cluster.base / "node3.pid"

    def daemonize(crashed=None):
        result = node.run("daemon", "--daemonize", "--pidfile", str(pidfile), timeout=30)
        assert result.returncode == 0, result.stderr

        def written():  # by the new daemon, not the crashed one's left behind
            text = pidfile.read_text().strip() if pidfile.exists() else ""
            return text and int(text) != crashed and int(text)

        pid = wait_for(written, 10, what="the pidfile")
        wait_for(lambda: "ready: consuming" in node.log.read_text(), 30, what="ready")
        return pid

    pid = daemonize()
    os.kill(pid, 0)  # the command returned, and the daemon it left behind runs
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not pathlib.Path(f"/proc/{pid}").exists(), 10, what="the kill")
    assert pidfile.exists()  # a crash leaves it behind...

    node.log.write_text("")
    pid = daemonize(crashed=pid)  # ...but it does not block the next start
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not pathlib.Path(f"/proc/{pid}").exists(), 20, what="the stop")
    assert not pidfile.exists()
    assert "stopped" in node.log.read_text()


def test_the_daemon_refuses_to_start_beside_a_running_one(cluster):
    node = cluster["node2"]
    node.start_daemon()
    second = node.run("daemon", timeout=30)
    assert second.returncode == 1
    assert "holds" in node.log.read_text()
    assert node.daemon.poll() is None


def test_broker_passwords_never_reach_the_log_even_at_debug(cluster):
    node = cluster["node2"]
    # A user of this test's own: the broker is shared with other runs.
    user = f"gis-secret-{cluster.vhost}"
    rabbitmqctl("add_user", user, "S3cr3t-Pa55")
    try:
        rabbitmqctl("set_permissions", "-p", cluster.vhost, user, ".*", ".*", ".*")
        node.config.write_text(node.config.read_text().replace(
            "guest:guest@", f"{user}:S3cr3t-Pa55@") + "debug = true\n")
        node.start_daemon()
        image_id, md5, size = cluster.new_image("node1", size=1024)
        cluster.upload(image_id, md5, size)
        wait_for(lambda: node.has(image_id, md5), 30, what="a sync at debug level")
        node.stop_daemon()
        # And the error paths: a broker that refuses, then one that is not there.
        outputs = []
        for wrong in ("S3cr3t-Pa55@127.0.0.1:5672", "S3cr3t-Pa55@127.0.0.1:5999"):
            node.config.write_text(node.config.read_text().replace(
                "S3cr3t-Pa55@127.0.0.1:5672", wrong).replace("Pa55@", "Pa55-wrong@", 1)
                if "5672" in wrong else node.config.read_text().replace(
                "Pa55-wrong@127.0.0.1:5672", "Pa55@127.0.0.1:5999"))
            result = subprocess.run(node.argv("both"), capture_output=True, text=True,
                                    env=cluster.env, timeout=120)
            # Refused credentials are a configuration error (78); no broker is 1.
            assert result.returncode == (78 if "5672" in wrong else 1)
            outputs.append(result.stdout + result.stderr)
    finally:
        rabbitmqctl("delete_user", user, check=False)
    log = node.log.read_text()
    assert " DEBUG " in log
    assert f"cannot reach the broker (amqp://{user}:****@127.0.0.1:5999" in log
    assert f"amqp://{user}:****@127.0.0.1:5672/" in log
    assert "refused the credentials" in log
    assert user in log  # the user name may appear, never the password
    assert "S3cr3t" not in log + "".join(outputs)
