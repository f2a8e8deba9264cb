"""No ssh connection to a peer outlives the process that opened it (transfer/masters.py).

Unit tests for the pieces; on the real cluster, a cron run, a ``reconcile``
and a daemon stopped by SIGTERM each leave no ``ssh ... [mux]`` process and
no socket in their state_dir.
"""

import logging
import os
import pathlib
import signal
import socket
import subprocess
import tempfile

import pytest

from glance_image_sync.cmd.commands import _exit_on_sigterm
from glance_image_sync.settings import TransferSettings
from glance_image_sync.transfer import masters
from tools.localcluster import wait_for

SETTINGS = TransferSettings(user="glance", ssh_config_file="/etc/glance/ssh_config",
                            connect_timeout=10, io_timeout=120, total_timeout=3600, bwlimit=0,
                            remote_datadir="/var/lib/glance/images",
                            control_dir="/var/lib/gis", control_persist=60)
HASH = "0123456789abcdef0123456789abcdef01234567"


def test_ssh_is_asked_about_the_master_at_its_socket_with_the_transfers_configuration():
    argv = masters.control_argv(SETTINGS, f"/var/lib/gis/ssh-{HASH}", "stop")
    assert argv[:1] == ["ssh"]
    assert argv[argv.index("-O") + 1] == "stop"
    assert f"ControlPath=/var/lib/gis/ssh-{HASH}" in argv
    assert argv[argv.index("-F") + 1] == "/etc/glance/ssh_config"
    assert "BatchMode=yes" in argv
    assert argv[-2:] == ["--", "glance@glance-image-sync-peer"]


def test_only_the_names_of_masters_sockets_are_masters():
    assert masters.MASTER_NAME_RE.fullmatch(f"ssh-{HASH}")
    # ssh binds this first, then links it under the final name.
    assert not masters.MASTER_NAME_RE.fullmatch(f"ssh-{HASH}.AbCdEfGhIjKlMnOp")
    assert not masters.MASTER_NAME_RE.fullmatch("lock")
    assert not masters.MASTER_NAME_RE.fullmatch("status.json")


def test_without_reused_connections_or_a_state_dir_there_is_nothing_to_close(tmp_path):
    no_reuse = TransferSettings(**{**SETTINGS.__dict__, "control_dir": None})
    assert masters.close_all(no_reuse) == 0
    missing = TransferSettings(**{**SETTINGS.__dict__, "control_dir": str(tmp_path / "no")})
    assert masters.close_all(missing) == 0


@pytest.fixture
def short_tmp_path():
    """A directory whose sockets' paths fit (a worker's tmp_path may be too long for them)."""
    with tempfile.TemporaryDirectory(prefix="gis-") as path:
        yield pathlib.Path(path)


def test_a_socket_whose_master_was_killed_is_removed_and_a_live_one_is_not(short_tmp_path,
                                                                           caplog):
    tmp_path = short_tmp_path
    stale = tmp_path / f"ssh-{HASH}"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(stale))  # bound, never listening again: as a SIGKILLed master leaves it
    live = tmp_path / f"ssh-{HASH[::-1]}"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(live))
        listener.listen()
        settings = TransferSettings(**{**SETTINGS.__dict__, "control_dir": str(tmp_path),
                                       "ssh_config_file": None})
        with caplog.at_level(logging.INFO, logger="glance_image_sync.transfer.masters"):
            assert masters.close_all(settings) == 0  # no ssh master answers on either
        assert not stale.exists()
        assert live.exists()
    assert "was killed" in caplog.text


def test_a_process_that_ended_is_not_alive_even_before_it_is_reaped():
    child = subprocess.Popen(["true"])
    wait_for(lambda: pathlib.Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1]
             .split()[0] == "Z", 10, what="a zombie")
    assert not masters._alive(child.pid)
    child.wait()
    assert not masters._alive(child.pid)
    assert masters._alive(os.getpid())


def test_sigterm_ends_a_command_as_an_exit_so_that_its_cleanup_runs():
    with pytest.raises(SystemExit) as stopped:
        _exit_on_sigterm(signal.SIGTERM, None)
    assert stopped.value.code == 128 + signal.SIGTERM


# -- on the cluster ---------------------------------------------------------------------


def masters_of(node) -> list:
    """The ssh masters whose socket is in this node's state_dir (ssh names them so)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                title = pathlib.Path(entry.path, "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "[mux]" in title and f"{node.state}/ssh-" in title:
                found.append(title)
    return found


def sockets_of(node) -> list:
    return sorted(name for name in os.listdir(node.state) if name.startswith("ssh-"))


@pytest.mark.cluster
def test_a_cron_run_and_a_reconcile_leave_no_ssh_connection(cluster):
    image_id, md5, size = cluster.new_image("node1", size=1024 * 1024)
    cluster.upload(image_id, md5, size)
    node = cluster["node2"]
    logins = (cluster["node1"].dir / "sshd.log").read_text().count("Accepted publickey")
    result = node.run("both")
    assert result.returncode == 0, result.stderr + node.log.read_text()[-3000:]
    assert node.has(image_id, md5)
    # The run did log in (its master was made), and closed what it opened.
    assert (cluster["node1"].dir / "sshd.log").read_text().count("Accepted publickey") > logins
    assert masters_of(node) == []
    assert sockets_of(node) == []

    result = node.run("reconcile")
    assert "compared with node1, node3" in result.stdout, result.stdout + result.stderr
    assert masters_of(node) == []
    assert sockets_of(node) == []


@pytest.mark.cluster
def test_a_daemon_stopped_by_sigterm_leaves_no_ssh_connection(cluster):
    node = cluster["node3"]
    node.start_daemon()
    image_id, md5, size = cluster.new_image("node1", size=1024 * 1024)
    cluster.upload(image_id, md5, size)
    wait_for(lambda: node.has(image_id, md5), 60, what="the image on node3")
    # The connection to node1 is kept (ssh_control_persist) while the daemon runs.
    assert masters_of(node)
    assert sockets_of(node)
    assert node.stop_daemon(signal.SIGTERM) == 0
    assert masters_of(node) == []
    assert sockets_of(node) == []


@pytest.mark.cluster
def test_the_next_run_closes_the_connections_a_killed_daemon_left(cluster):
    node = cluster["node2"]
    node.start_daemon()
    image_id, md5, size = cluster.new_image("node1", size=1024 * 1024)
    cluster.upload(image_id, md5, size)
    wait_for(lambda: node.has(image_id, md5), 60, what="the image on node2")
    node.stop_daemon(signal.SIGKILL)
    assert masters_of(node)  # nothing can close them when the process is killed outright
    result = node.run("both")
    assert result.returncode == 0, result.stderr + node.log.read_text()[-3000:]
    assert masters_of(node) == []
    assert sockets_of(node) == []


@pytest.mark.cluster
def test_close_all_stops_a_live_master_and_returns_once_it_has_exited(cluster):
    control = cluster.base / "ctl"  # short: a socket's path has room for 107 bytes
    control.mkdir()
    settings = TransferSettings(**{**SETTINGS.__dict__, "user": "root",
                                   "ssh_config_file": str(cluster.ssh_config),
                                   "control_dir": str(control)})
    # The master a transfer would make (rsync's -e), opened by a command of its own.
    subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "ControlMaster=auto",
                    "-o", f"ControlPath={control}/ssh-%C", "-o", "ControlPersist=60",
                    "-F", str(cluster.ssh_config), "root@node1", "true"],
                   check=True, timeout=30, stdin=subprocess.DEVNULL)
    [socket_name] = os.listdir(control)
    pid = masters.master_pid(settings, str(control / socket_name))
    assert pid and masters._alive(pid)
    assert masters.close_all(settings) == 1
    assert not masters._alive(pid)
    assert os.listdir(control) == []
