"""The rsync command line and what is read back from rsync."""

import os

import pytest

from glance_image_sync.config import TransferSettings
from glance_image_sync.events import Rejected
from glance_image_sync.transfer import _first_line, rsync_argv, subprocess_env

SETTINGS = TransferSettings(user="glance", ssh_config_file="/etc/glance/ssh_config",
                            connect_timeout=10, io_timeout=120, total_timeout=3600,
                            bwlimit=0, remote_datadir="/var/lib/glance/images")
IMAGE = "b90e9b0f-36ce-43c1-b08c-9b4201f6571f"


def test_rsync_gets_an_argument_list_with_operands_after_a_double_dash():
    argv = rsync_argv(SETTINGS, "node1", IMAGE, "/var/lib/glance/images/.tmp")
    assert argv[0] == "rsync"
    assert argv[-3:] == ["--", f"glance@node1:/var/lib/glance/images/{IMAGE}",
                         "/var/lib/glance/images/.tmp"]
    assert "-z" not in argv and "--compress" not in argv
    ssh = argv[argv.index("-e") + 1]
    assert ssh == ("ssh -o BatchMode=yes -o ConnectTimeout=10 -F /etc/glance/ssh_config")
    assert "StrictHostKeyChecking" not in " ".join(argv)
    assert "--timeout=120" in argv


def test_rsync_argv_refuses_an_image_id_that_is_not_a_uuid():
    with pytest.raises(Rejected):
        rsync_argv(SETTINGS, "node1", "../../etc/shadow", "/tmp/x")


def test_bandwidth_limit_is_passed_when_set():
    settings = TransferSettings(**{**SETTINGS.__dict__, "bwlimit": 5000})
    assert "--bwlimit=5000" in rsync_argv(settings, "node1", IMAGE, "/tmp/x")


def test_md5_is_not_asked_of_rsync_so_the_sender_does_not_hash_the_image_for_each_peer():
    argv = rsync_argv(SETTINGS, "node1", IMAGE, "/tmp/x")
    assert not any(arg.startswith(("--checksum-choice", "--cc", "--checksum", "-c"))
                   for arg in argv[:argv.index("--")])


def test_subprocesses_get_a_minimal_environment(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/tmp/evil.so")
    monkeypatch.setenv("HOME", "/var/lib/glance")
    env = subprocess_env()
    assert set(env) == {"PATH", "LC_ALL", "HOME"}
    assert env["HOME"] == "/var/lib/glance"
    assert os.pathsep in env["PATH"]


def test_a_changed_host_key_is_named_in_the_error_not_hidden_behind_its_frame():
    stderr = ("@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n"
              "@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\n"
              "@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n"
              "IT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!\n"
              "Host key verification failed.\n"
              "rsync: connection unexpectedly closed (0 bytes received so far) [Receiver]\n")
    assert _first_line(stderr) == "WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!"
    assert _first_line("\n  \n") == "no message"
    assert _first_line('rsync: link_stat "/x" failed: No such file or directory (2)\n') == \
        'rsync: link_stat "/x" failed: No such file or directory (2)'


def test_reused_ssh_connections_live_in_the_state_dir_and_watch_their_peer():
    settings = TransferSettings(**{**SETTINGS.__dict__, "control_dir": "/var/lib/gis",
                                   "control_persist": 60})
    ssh = rsync_argv(settings, "node1", IMAGE, "/tmp/x")
    ssh = ssh[ssh.index("-e") + 1].split()
    for option in ["ControlMaster=auto", "ControlPath=/var/lib/gis/ssh-%C",
                   "ControlPersist=60", "ServerAliveInterval=5"]:
        assert option in ssh, option
    assert "ControlMaster=auto" not in rsync_argv(SETTINGS, "node1", IMAGE, "/tmp/x")[8]
