"""The rsync command line, what is read back from rsync, and sessions shared by images."""

import errno
import os
import pathlib
import threading
import uuid

import pytest

from glance_image_sync.exceptions import Rejected, TransferFailed
from glance_image_sync.settings import TransferSettings
from glance_image_sync.transfer import listing
from glance_image_sync.transfer.masters import close_master
from glance_image_sync.transfer.rsync import (
    CONTROL_DIR_MAX,
    first_line,
    remote_path,
    rsync_argv,
    subprocess_env,
)
from glance_image_sync.transfer.sessions import SESSIONS_PER_PEER, Rsync, _Batch, _failure_of
from tools.localcluster import wait_for

SETTINGS = TransferSettings(user="glance", ssh_config_file="/etc/glance/ssh_config",
                            connect_timeout=10, io_timeout=120, total_timeout=3600,
                            bwlimit=0, remote_datadir="/var/lib/glance/images")
IMAGE = "b90e9b0f-36ce-43c1-b08c-9b4201f6571f"
OTHER = "1f517f3b-0226-4ae4-a53e-e5239f6d2261"


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


def test_relative_remote_paths_name_files_inside_the_directory_rrsync_restricts_to():
    settings = TransferSettings(**{**SETTINGS.__dict__, "remote_paths": "relative"})
    assert rsync_argv(settings, "node1", IMAGE, "/tmp/x")[-3:] == [
        "--", f"glance@node1:{IMAGE}", "/tmp/x"]
    assert rsync_argv(settings, "node1", [IMAGE, OTHER], "/tmp/d/")[-4:] == [
        "--", f"glance@node1:{IMAGE}", f"glance@node1:{OTHER}", "/tmp/d/"]
    # ".", never "./": an rrsync without -absolute reduces "./" to "" and refuses it.
    assert listing.list_argv(settings, "node1")[-2:] == ["--", "glance@node1:."]
    assert listing.list_argv(SETTINGS, "node1")[-2:] == [
        "--", "glance@node1:/var/lib/glance/images/"]
    assert listing.list_argv(SETTINGS, "node1", form="relative")[-1] == "glance@node1:."
    assert remote_path(settings, "node1", IMAGE, form="absolute") == \
        f"glance@node1:/var/lib/glance/images/{IMAGE}"


def test_closing_a_kept_connection_asks_ssh_to_stop_its_master_and_nothing_else(tmp_path):
    assert close_master(SETTINGS, "node1") is False  # no reuse configured: nothing kept
    settings = TransferSettings(**{**SETTINGS.__dict__, "ssh_config_file": None,
                                   "control_dir": str(tmp_path), "control_persist": 60})
    assert close_master(settings, "node1") is False  # no socket: ssh says so, exit 255


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
    assert first_line(stderr) == "WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!"
    assert first_line("\n  \n") == "no message"
    assert first_line('rsync: link_stat "/x" failed: No such file or directory (2)\n') == \
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


def test_ciphers_are_asked_of_ssh_when_set():
    settings = TransferSettings(**{**SETTINGS.__dict__,
                                   "ciphers": "aes128-gcm@openssh.com,aes128-ctr"})
    ssh = rsync_argv(settings, "node1", IMAGE, "/tmp/x")
    ssh = ssh[ssh.index("-e") + 1].split()
    assert ssh[ssh.index("Ciphers=aes128-gcm@openssh.com,aes128-ctr") - 1] == "-o"


def test_a_state_dir_too_long_for_ssh_sockets_means_no_reuse_and_a_warning(caplog):
    fits = "/" + "s" * (CONTROL_DIR_MAX - 1)
    settings = TransferSettings(**{**SETTINGS.__dict__, "control_dir": fits,
                                   "control_persist": 60})
    assert Rsync(settings).settings.control_dir == fits
    # The longest socket path ssh makes there still fits a Unix socket's 108 bytes.
    assert len(f"{fits}/ssh-{'c' * 40}.{'r' * 16}") <= 107
    too_long = TransferSettings(**{**settings.__dict__, "control_dir": fits + "s"})
    rsync = Rsync(too_long)
    assert rsync.settings.control_dir is None
    assert "ControlMaster" not in " ".join(rsync_argv(rsync.settings, "node1", IMAGE, "/tmp/x"))
    assert "ssh connections are not reused" in caplog.text


OTHER = "0c2b4d7e-5f1a-4e8b-9c3d-2a6f8e1b7c40"


def test_several_images_from_one_peer_are_operands_of_one_rsync_into_a_directory():
    argv = rsync_argv(SETTINGS, "node1", [IMAGE, OTHER], "/var/lib/glance/images/.staging/")
    assert argv[-4:] == ["--", f"glance@node1:/var/lib/glance/images/{IMAGE}",
                         f"glance@node1:/var/lib/glance/images/{OTHER}",
                         "/var/lib/glance/images/.staging/"]
    with pytest.raises(Rejected):
        rsync_argv(SETTINGS, "node1", [IMAGE, "../x"], "/tmp/x/")


def _session_failed(returncode, stderr):
    return TransferFailed(f"rsync from node1 exited {returncode}: ...", what="rsync from node1",
                          returncode=returncode, stderr=stderr)


def test_a_file_rsync_could_not_send_fails_only_its_own_image():
    failure = _session_failed(23, f'rsync: [sender] link_stat "/var/lib/glance/images/{OTHER}" '
                                  "failed: No such file or directory (2)\n"
                                  "rsync error: some files/attrs were not transferred (code 23)\n")
    assert _failure_of(failure, IMAGE, 2) is None
    mine = _failure_of(failure, OTHER, 2)
    assert str(mine) == ("rsync from node1 exited 23: rsync: [sender] link_stat "
                         f'"/var/lib/glance/images/{OTHER}" failed: No such file or directory (2)')


def test_a_session_that_failed_as_a_whole_fails_every_image():
    failure = _session_failed(255, "ssh: connect to host node1 port 22: Connection refused\n")
    assert _failure_of(failure, IMAGE, 2) is failure
    assert _failure_of(failure, OTHER, 2) is failure
    alone = _session_failed(23, "rsync: [sender] link_stat failed\n")
    assert _failure_of(alone, IMAGE, 1) is alone


def test_images_asked_of_a_busy_peer_travel_together_in_the_next_session(tmp_path,
                                                                          monkeypatch):
    rsync = Rsync(SETTINGS)
    sessions, release = [], threading.Event()

    def session(node, image_ids, dest, images):
        sessions.append((image_ids, dest))
        if len(sessions) <= SESSIONS_PER_PEER:
            assert release.wait(10)
        else:  # rsync's side: each copy lands in the directory under its image id
            for image_id in image_ids:
                (pathlib.Path(dest) / image_id).write_bytes(image_id.encode())

    monkeypatch.setattr(rsync, "_rsync", session)
    ids = [str(uuid.uuid4()) for _ in range(SESSIONS_PER_PEER + 3)]
    # Named as ImageStore names its temporaries: the staging directory takes their owner.
    dests = {image_id: tmp_path / f".glance-image-sync.{image_id}.4242-0123abcd.{n:08x}"
             for n, image_id in enumerate(ids)}
    for dest in dests.values():
        dest.touch()
    threads = [threading.Thread(target=rsync.fetch, args=("node1", i, str(dests[i]), 1))
               for i in ids]
    for thread in threads[:SESSIONS_PER_PEER]:
        thread.start()
    wait_for(lambda: len(sessions) == SESSIONS_PER_PEER, 10)
    for thread in threads[SESSIONS_PER_PEER:]:
        thread.start()
    wait_for(lambda: len(rsync._waiting.get("node1", _Batch("node1")).wanted) == 3, 10)
    release.set()
    for thread in threads:
        thread.join(10)
    assert [image_ids for image_ids, _ in sessions] == ids[:SESSIONS_PER_PEER] + \
        [ids[SESSIONS_PER_PEER:]]
    for image_id in ids[SESSIONS_PER_PEER:]:  # written through the links, into the files
        assert dests[image_id].read_bytes() == image_id.encode()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(d.name for d in dests.values())


def test_without_hard_links_each_image_of_a_batch_gets_a_session_of_its_own(tmp_path,
                                                                           monkeypatch):
    rsync = Rsync(SETTINGS)
    sessions = []
    monkeypatch.setattr(rsync, "_rsync", lambda node, ids, dest, images: sessions.append(ids))

    def no_links(source, target):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    batch = _Batch("node1")
    batch.wanted = {IMAGE: str(tmp_path / "a"), OTHER: str(tmp_path / "b")}
    rsync._run(batch)
    assert sessions == [IMAGE, OTHER]
    assert batch.failures == {}
    assert list(tmp_path.iterdir()) == []  # no staging directory left
