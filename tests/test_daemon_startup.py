"""The daemon and the one-shot commands when the broker is not there, or says no.

Without a broker the daemon is started all the same (READY=1; STATUS names the
broker it waits for) and tries again with backoff, feeding the watchdog: no
start-up timeout, no restart loop under systemd. Refused credentials are a
configuration error: one line naming the broker, password hidden, exit 78.
"""

import signal
import subprocess
import sys

import pytest

from glance_image_sync.exceptions import EXIT_BROKER_REFUSED
from tests.clusterhelpers import free_port
from tests.helpers import write_config
from tests.notifysocket import NotifySocket
from tools.localcluster import broker_running, wait_for

SECRET = "pa55-never-logged"  # noqa: S105 - a test password that must not show


def argv(config, *args):
    return [sys.executable, "-m", "glance_image_sync", "--config-file", str(config), *args]


def _config(tmp_path, transport_url):
    (tmp_path / "images").mkdir()
    return write_config(tmp_path, transport_url=transport_url,
                        log_file=str(tmp_path / "daemon.log"))


def test_without_a_broker_the_daemon_is_ready_says_what_it_waits_for_and_backs_off(tmp_path):
    port = free_port()  # nothing listens there
    config = _config(tmp_path, f"rabbit://guest:{SECRET}@127.0.0.1:{port}/")
    notify = NotifySocket(tmp_path / "notify.sock")
    daemon = subprocess.Popen(argv(config, "daemon"), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True,
                              env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "2000000",
                                   "PATH": "/usr/bin:/bin"})
    log = tmp_path / "daemon.log"
    try:
        wait_for(lambda: "READY=1" in notify.texts(), 20, what="READY=1")
        wait_for(lambda: log.exists() and log.read_text().count("reconnecting in") >= 4, 30,
                 what="a few attempts")
        wait_for(lambda: len(notify.times_of("WATCHDOG=1")) >= 5, 20, what="watchdog pings")
        assert daemon.poll() is None
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(30)
        notify.close()
    assert code == 0
    text = log.read_text()
    assert SECRET not in text and "Traceback" not in text
    broker = f"amqp://guest:****@127.0.0.1:{port}/"
    assert (f"fan-out: cannot reach the broker ({broker}: ConnectionRefusedError: "
            "[Errno 111] Connection refused); reconnecting in") in text
    delays = [float(line.split("reconnecting in ")[1].split()[0])
              for line in text.splitlines() if "sync: cannot reach" in line]
    assert delays[:2] and delays[1] > delays[0] / 2 and max(delays) <= 30  # backoff, capped
    texts = notify.texts()
    ready = texts.index("READY=1")
    # STATUS is sent when it changes: the loops may have given up a first time already.
    assert any(t.startswith("STATUS=fan-out waiting for the broker since") and broker in t
               for t in texts), texts
    assert texts.index("WATCHDOG=1") > ready


@pytest.mark.broker
@pytest.mark.parametrize("command", ["daemon", "both", "status"])
def test_refused_credentials_are_one_line_naming_the_broker_and_exit_78(tmp_path, command):
    if not broker_running():
        pytest.fail("RabbitMQ is not running on 127.0.0.1:5672")
    config = _config(tmp_path, f"rabbit://guest:{SECRET}@127.0.0.1:5672/")
    result = subprocess.run(argv(config, command), capture_output=True, text=True, timeout=60)
    assert result.returncode == EXIT_BROKER_REFUSED == 78
    log = (tmp_path / "daemon.log").read_text() if command != "status" else result.stderr
    lines = [line for line in log.splitlines() if "refused the credentials" in line]
    assert len(lines) == 1, log
    assert ("amqp://guest:****@127.0.0.1:5672/ refused the credentials of transport_url "
            "(AccessRefused: (0, 0): (403) ACCESS_REFUSED") in lines[0]
    assert SECRET not in log + result.stderr + result.stdout
    assert "Traceback" not in log + result.stderr
