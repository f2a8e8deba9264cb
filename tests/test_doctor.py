"""doctor's verdicts, without a broker or peers: what each finding means and its fix."""

import json
import os

import pytest

from glance_image_sync.admin import doctor, doctor_local, doctor_peers
from glance_image_sync.admin.checks import FAIL, PASS, SKIP, failed, passed, skipped
from glance_image_sync.cmd import commands as cli
from glance_image_sync.exceptions import TransferFailed
from tests.helpers import settings_for, write_config

A = "b90e9b0f-36ce-43c1-b08c-9b4201f6571f"
STORE_LISTING = ("drwxr-xr-x        4096 2026/11/30 07:14:57 .\n"
                 f"-rw-r-----        1000 2026/11/30 07:14:57 {A}\n")
HOME_LISTING = ("drwx------        4096 2026/11/30 07:14:48 .\n"
                "-rw-r--r--         100 2026/11/30 06:41:03 .gitconfig\n")
NO_ABSOLUTE = TransferFailed(
    "rsync with node2 exited 12", returncode=12,
    stderr="/usr/bin/rrsync error: post-realpath open failed (race detected): "
    "/var/lib/glance/images/ No such file or directory\nrsync: connection unexpectedly closed")
UNREADABLE = TransferFailed("rsync with node2 exited 1", returncode=1,
                            stderr="/usr/bin/rrsync error: unable to chdir to restricted dir: "
                            "[Errno 13] Permission denied: '/var/lib/glance/images'\n")
RRSYNC_REFUSES = TransferFailed("ssh to node2 exited 1", returncode=1,
                                stderr="/usr/bin/rrsync error: --server option is not the "
                                "first arg\n")


def statuses(checks) -> dict:
    return {check.name.rpartition(": ")[2]: check.status for check in checks}


# -- remote paths: which form each peer takes ------------------------------------------


@pytest.mark.parametrize("configured, listings, expected, words", [
    # rrsync -absolute: both forms name the store.
    ("absolute", {"absolute": STORE_LISTING, "relative": STORE_LISTING},
     {"remote paths": PASS, "store": PASS}, "so does relative"),
    ("relative", {"absolute": STORE_LISTING, "relative": STORE_LISTING},
     {"remote paths": PASS, "store": PASS}, "so does absolute"),
    # rrsync without -absolute (rsync 3.2.7): only relative paths.
    ("relative", {"absolute": NO_ABSOLUTE, "relative": STORE_LISTING},
     {"remote paths": PASS, "store": PASS}, "absolute would not name the store"),
    ("absolute", {"absolute": NO_ABSOLUTE, "relative": STORE_LISTING},
     {"remote paths": FAIL, "store": PASS}, "set rsync_remote_paths = relative"),
    # A key that may run anything: a relative path names the user's home.
    ("absolute", {"absolute": STORE_LISTING, "relative": HOME_LISTING},
     {"remote paths": PASS, "store": PASS}, "relative would not name the store"),
    ("relative", {"absolute": STORE_LISTING, "relative": HOME_LISTING},
     {"remote paths": FAIL, "store": PASS}, "restrict the key on the peer"),
    # The store cannot be read, whatever the path.
    ("absolute", {"absolute": UNREADABLE, "relative": UNREADABLE},
     {"remote paths": SKIP, "store": FAIL}, "let rsync_user read the store"),
])
def test_the_form_of_remote_paths_a_peer_takes_is_found_from_both_listings(
        configured, listings, expected, words):
    found = doctor_peers.paths_and_store("peer node2", configured, listings)
    assert statuses(found) == expected
    assert any(words in check.detail + check.fix for check in found), found
    for check in found:
        assert bool(check.fix) == (check.status == FAIL)


def test_the_store_check_counts_the_images_listed():
    found = doctor_peers.paths_and_store("peer node2", "absolute",
                                         {"absolute": STORE_LISTING, "relative": NO_ABSOLUTE})
    assert found[1].detail == "listed: 1 image"


@pytest.mark.parametrize("version, listings, status, words", [
    ("rsync  version 3.2.7  protocol version 31", {}, PASS, "may run any command"),
    (RRSYNC_REFUSES, {"absolute": STORE_LISTING}, PASS, "restricted to rrsync"),
    (TransferFailed("exited 127", returncode=127, stderr="bash: line 1: rsync: command not "
                    "found\n"), {}, FAIL, "rsync is not installed there"),
    (RRSYNC_REFUSES, {"absolute": UNREADABLE}, SKIP, "no listing of the store succeeded"),
])
def test_the_remote_rsync_is_found_by_its_version_or_by_rrsync_at_work(
        version, listings, status, words):
    check = doctor_peers.rsync_check("peer node2", version, listings)
    assert check.status == status and words in check.detail
    if status == FAIL:
        assert "install rsync" in check.fix


@pytest.mark.parametrize("stderr, words", [
    ("Host key verification failed.", "host key is not the one pinned"),
    ("WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!", "host key is not the one pinned"),
    ("root@127.1.2.12: Permission denied (publickey).", "refused this node's key"),
    ("ssh: connect to host 127.1.2.12 port 2222: Connection refused", "start its sshd"),
    ("ssh: Could not resolve hostname node2: Name or service not known", "cannot be reached"),
    ("ssh: connect to host 10.0.0.2 port 22: Connection timed out", "cannot be reached"),
    ("something else", "by hand"),
])
def test_each_ssh_failure_gets_its_own_fix(stderr, words):
    assert words in doctor_peers.ssh_fix(stderr, "node2", "glance")


# -- this node ---------------------------------------------------------------------


def test_free_space_fails_once_the_largest_image_would_not_fit():
    assert doctor_local.free_space_verdict("/s", 10 << 30, 100 << 30, 4 << 30).status == PASS
    check = doctor_local.free_space_verdict("/s", 1 << 30, 100 << 30, 4 << 30)
    assert check.status == FAIL and "4.0 GiB" in check.detail and "1.0 GiB free" in check.detail
    assert "no image here yet" in doctor_local.free_space_verdict("/s", 0, 1, 0).detail


def test_the_store_and_state_dir_of_a_fresh_node_pass(tmp_path):
    (tmp_path / "images").mkdir()
    checks = doctor_local.checks(settings_for(tmp_path), environ={})
    assert [c.status for c in checks] == [PASS, PASS, PASS, SKIP], checks
    assert "does not exist yet" in checks[1].detail  # the first run creates state_dir
    assert "not under systemd" in checks[3].detail
    assert os.listdir(tmp_path / "images") == []  # the probe file is gone


def test_a_missing_store_or_a_file_in_its_place_fails(tmp_path):
    check = doctor_local.store_check(str(tmp_path / "nowhere"))
    assert check.status == FAIL and "does not exist" in check.detail
    assert "filesystem_store_datadir" in check.fix
    (tmp_path / "file").write_text("")
    assert "not a directory" in doctor_local.store_check(str(tmp_path / "file")).detail
    assert doctor_local.state_dir_check(str(tmp_path / "file")).status == FAIL


@pytest.mark.parametrize("properties, status, words", [
    ({"ProtectSystem": "strict", "ReadWritePaths": "/var/lib/glance/images",
      "StateDirectory": "glance-image-sync"}, PASS, "lets it write to"),
    ({"ProtectSystem": "strict", "ReadWritePaths": "-/var/lib/glance",
      "StateDirectory": "glance-image-sync"}, PASS, "lets it write to"),
    ({"ProtectSystem": "strict", "ReadWritePaths": "/srv/images",
      "StateDirectory": "glance-image-sync"}, FAIL,
     "not to filesystem_store_datadir /var/lib/glance/images"),
    ({"ProtectSystem": "strict", "ReadWritePaths": "/var/lib/glance/images"}, FAIL,
     "not to state_dir /var/lib/glance-image-sync"),
    ({"ProtectSystem": "full", "ReadWritePaths": ""}, PASS, "ProtectSystem=full"),
    ({"ProtectSystem": "no"}, PASS, "ProtectSystem=no"),
])
def test_the_units_sandbox_must_let_the_tool_write_where_it_writes(properties, status, words):
    paths = {"filesystem_store_datadir": "/var/lib/glance/images",
             "state_dir": "/var/lib/glance-image-sync"}
    check = doctor_local.unit_verdict("glance-image-sync.service", properties, paths)
    assert check.status == status and words in check.detail, check
    if status == FAIL:
        assert "systemctl edit glance-image-sync.service" in check.fix
        assert "ReadWritePaths=" in check.fix


def test_under_systemd_the_unit_is_read_and_a_unit_systemd_does_not_know_fails(tmp_path):
    settings = settings_for(tmp_path)
    asked = []

    def show(unit):
        asked.append(unit)
        return {"LoadState": "not-found"}

    check = doctor_local.unit_check(settings, None, {"INVOCATION_ID": "1"}, show)
    assert check.status == FAIL and "is not loaded" in check.detail and asked
    check = doctor_local.unit_check(settings, "other.service", {}, lambda unit: {
        "LoadState": "loaded", "ProtectSystem": "strict",
        "ReadWritePaths": f"{tmp_path}/images {tmp_path}/state"})
    assert check.status == PASS and "other.service" in check.detail

    def unreadable(unit):
        raise doctor_local.UnitUnreadable("System has not been booted with systemd")

    check = doctor_local.unit_check(settings, "x.service", {}, unreadable)
    assert check.status == FAIL and "has not been booted" in check.detail


def test_systemctl_is_really_asked_and_a_unit_it_cannot_show_fails(tmp_path):
    """With systemd running or not, an unknown unit is never a PASS."""
    if doctor_local.shutil.which("systemctl", path=doctor_local.SAFE_PATH) is None:
        pytest.skip("systemctl is not installed")
    check = doctor_local.unit_check(settings_for(tmp_path), "gis-no-such-unit.service", {})
    assert check.status == FAIL and "gis-no-such-unit.service" in check.detail


# -- the command ---------------------------------------------------------------------


def test_each_check_is_one_line_and_a_failure_names_its_fix():
    found = [passed("broker", "amqp://guest:****@h:5672/: logged in"),
             failed("peer node2: ssh", "Connection refused", "start its sshd"),
             skipped("systemd unit", "not under systemd")]
    text = doctor.render_table("node1", found)
    lines = text.splitlines()
    assert lines[2].startswith("PASS  broker ")
    assert lines[3].startswith("FAIL  peer node2: ssh  Connection refused  -- fix: start")
    assert lines[4].startswith("SKIP  systemd unit ")
    assert lines[-1] == "1 check failed, 1 passed, 1 skipped"
    doc = json.loads(doctor.render_json("node1", found))
    assert doc["ok"] is False and doc["checks"][1]["fix"] == "start its sshd"
    assert doc["checks"][0]["fix"] is None


def test_doctor_with_no_broker_and_no_peers_fails_and_says_why(tmp_path, capsys):
    path = write_config(tmp_path, transport_url="rabbit://guest:secret@127.0.0.1:1/",
                        api_nodes="node1", ssh_control_persist=0)
    (tmp_path / "images").mkdir()
    assert cli.main(["--config-file", str(path), "doctor", "--format", "json"]) == 1
    out = capsys.readouterr().out
    doc = json.loads(out)
    checks = {c["name"]: c for c in doc["checks"]}
    assert checks["broker"]["status"] == FAIL
    assert checks["broker"]["detail"].startswith("amqp://guest:****@127.0.0.1:1/")
    assert "start RabbitMQ on 127.0.0.1:1" in checks["broker"]["fix"]
    assert checks["glance queue"]["status"] == SKIP
    assert checks["peers"]["status"] == SKIP
    assert checks["image store"]["status"] == PASS
    assert "secret" not in out
