"""doctor on the real cluster: each check broken on purpose fails, alone, with its fix.

A healthy cluster passes every check (but the systemd unit's: no systemd here). Then one
thing at a time is broken: Glance's queue missing, a peer's sshd stopped, a changed host
key, a wrong broker password or no broker, a revoked key behind a kept ssh connection, an
rrsync that takes only relative paths, a peer's store rsync_user cannot read, a state_dir
and a store the daemon's user cannot write. Each time exactly the check concerned fails.
"""

import json
import os
import pathlib
import subprocess

import pytest

from tests.clusterhelpers import run_both_everywhere
from tools.localcluster import (
    DATADIR,
    RRSYNC_KEY_OPTIONS,
    RRSYNC_RELATIVE_KEY_OPTIONS,
    SERVE_COMMAND,
    STORE_GID,
    STORE_UID,
    wait_for,
)

pytestmark = pytest.mark.cluster


def doctor(node, argv=None) -> tuple:
    """(exit status, {check name: check}) of ``doctor --format json`` on ``node``."""
    if argv is None:
        result = node.run("doctor", "--format", "json")
    else:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                                env=node.cluster.env)
    assert result.returncode in (0, 1), result.stderr
    doc = json.loads(result.stdout)
    return result.returncode, {check["name"]: check for check in doc["checks"]}


def failing(checks: dict) -> dict:
    return {name: check for name, check in checks.items() if check["status"] == "FAIL"}


def test_each_broken_part_fails_its_own_check_with_its_fix(cluster):
    node1, node2, node3 = cluster.nodes

    # No Glance notification and no fan-out yet: Glance's queue does not exist.
    code, checks = doctor(node2)
    assert code == 1
    assert set(failing(checks)) == {"glance queue", "glance publishes"}
    assert "add glance_notifications to [oslo_messaging_notifications] topics" in \
        checks["glance queue"]["fix"]

    image_id, md5, size = cluster.new_image("node1", size=256 * 1024)
    cluster.upload(image_id, md5, size)
    run_both_everywhere(cluster)
    code, checks = doctor(node2)
    assert code == 0, failing(checks)
    assert {name: c["status"] for name, c in checks.items() if c["status"] != "PASS"} == {
        "systemd unit": "SKIP"}
    for peer in ("node1", "node3"):
        for what in ("ssh", "rsync", "remote paths", "store"):
            assert f"peer {peer}: {what}" in checks
    assert "this node applied an event" in checks["glance publishes"]["detail"]
    assert checks["peer node1: store"]["detail"] == "listed: 1 image"
    assert "rsync  version" in checks["peer node1: rsync"]["detail"]  # a key for anything

    node3.stop_sshd()
    code, checks = doctor(node2)
    assert set(failing(checks)) == {"peer node3: ssh"}
    assert "Connection refused" in checks["peer node3: ssh"]["detail"]
    assert "start its sshd" in checks["peer node3: ssh"]["fix"]
    assert checks["peer node3: store"]["status"] == "SKIP"
    node3.start_sshd()

    known_hosts = cluster.base / "known_hosts"
    genuine = known_hosts.read_text()
    impostor = cluster.base / "impostor_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(impostor)],
                   check=True, timeout=30)
    impostor_key = " ".join(impostor.with_suffix(".pub").read_text().split()[:2])
    node1_line = node1.host_key_line()
    known_hosts.write_text(genuine.replace(node1_line,
                                           f"{node1_line.split()[0]} {impostor_key}"))
    code, checks = doctor(node2)
    assert set(failing(checks)) == {"peer node1: ssh"}
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in checks["peer node1: ssh"]["detail"]
    assert "host key is not the one pinned" in checks["peer node1: ssh"]["fix"]
    known_hosts.write_text(genuine)

    for url, words in (
            (cluster.transport_url.replace("guest:guest@", "guest:not-the-password@"),
             "correct user 'guest' or its password"),
            (cluster.transport_url.replace(":5672/", ":1/"), "start RabbitMQ on 127.0.0.1:1")):
        node2.write_config({"transport_url": url})
        code, checks = doctor(node2)
        assert set(failing(checks)) == {"broker"}, failing(checks)
        assert words in checks["broker"]["fix"]
        assert "not-the-password" not in json.dumps(checks)
        assert checks["glance queue"]["status"] == "SKIP"
    node2.write_config({})
    assert doctor(node2)[0] == 0


def control_sockets(node) -> list:
    return sorted(name for name in os.listdir(node.state) if name.startswith("ssh-"))


def test_a_revoked_key_fails_although_a_kept_connection_would_still_let_it_in(cluster):
    node2 = cluster["node2"]
    for node in cluster.nodes[:2]:
        node.start_daemon()  # a running daemon keeps its connections (a cron run closes them)
    image_id, md5, size = cluster.new_image("node1", size=256 * 1024)
    cluster.upload(image_id, md5, size)
    wait_for(lambda: node2.has(image_id, md5), 60, what="the image on node2")
    sockets = control_sockets(node2)
    assert len(sockets) == 1  # node2 copied from node1 over a connection it kept

    cluster.authorized_keys.write_text("")  # the key is revoked everywhere
    kept = subprocess.run(
        ["ssh", "-F", str(cluster.ssh_config), "-o", "BatchMode=yes",
         "-o", f"ControlPath={node2.state}/ssh-%C", "root@node1", "true"],
        capture_output=True, text=True, timeout=60, env=cluster.env)
    assert kept.returncode == 0, "the kept connection should still work: the point of this test"

    code, checks = doctor(node2)
    assert set(failing(checks)) == {"peer node1: ssh", "peer node3: ssh"}
    assert "Permission denied" in checks["peer node1: ssh"]["detail"]
    assert "refused this node's key" in checks["peer node1: ssh"]["fix"]
    wait_for(lambda: control_sockets(node2) == [], 15, what="node2's kept connection retired")


# rrsync itself as the forced command: no streams, so no relay.
@pytest.mark.cluster_config(relay="false")
def test_doctor_finds_which_form_of_remote_path_each_rrsync_takes(cluster):
    node2 = cluster["node2"]
    image_id, md5, size = cluster.new_image("node1", size=256 * 1024)
    cluster.upload(image_id, md5, size)
    assert cluster["node1"].run("duplicate-notifications").returncode == 0

    # rrsync without -absolute (rsync 3.2.7) and absolute paths: every transfer would fail.
    cluster.authorize(RRSYNC_RELATIVE_KEY_OPTIONS)
    code, checks = doctor(node2)
    assert set(failing(checks)) == {"peer node1: remote paths", "peer node3: remote paths"}
    check = checks["peer node1: remote paths"]
    assert "its rrsync refuses absolute paths (no -absolute)" in check["detail"]
    assert "post-realpath open failed" in check["detail"]
    assert "set rsync_remote_paths = relative" in check["fix"]
    assert "restricted to rrsync" in checks["peer node1: rsync"]["detail"]
    assert checks["peer node1: store"]["status"] == "PASS"
    assert node2.run("sync-images").returncode == 1
    assert "post-realpath open failed" in node2.log.read_text()
    assert not node2.has(image_id)

    node2.write_config({"rsync_remote_paths": "relative", "relay": "false"})
    code, checks = doctor(node2)
    assert code == 0, failing(checks)
    assert "absolute would not name the store" in checks["peer node1: remote paths"]["detail"]
    wait_for(lambda: node2.run("sync-images").returncode in (0, 1) and node2.has(image_id, md5),
             30, interval=0.5, what="the retried copy, with relative paths")

    cluster.authorize(RRSYNC_KEY_OPTIONS)  # rrsync -absolute takes both
    assert doctor(node2)[0] == 0
    node2.write_config({"relay": "false"})
    code, checks = doctor(node2)
    assert code == 0 and "so does relative" in checks["peer node1: remote paths"]["detail"]

    cluster.authorize(None)  # a key for anything: a relative path names root's home
    node2.write_config({"rsync_remote_paths": "relative", "relay": "false"})
    code, checks = doctor(node2)
    assert set(failing(checks)) == {"peer node1: remote paths", "peer node3: remote paths"}
    assert "not restricted to it with rrsync" in checks["peer node1: remote paths"]["detail"]


@pytest.mark.cluster_config(relay="false")
def test_a_peer_store_that_rsync_user_cannot_read_fails_the_store_check(cluster):
    # The peers' rsync runs as the store's owner, without root's privileges, as a glance
    # user's would; then node3's store is made unreadable.
    cluster.authorize(f'command="setpriv --reuid={STORE_UID} --regid={STORE_GID} '
                      f'--clear-groups rrsync -ro -absolute {DATADIR}",restrict')
    node1, node3 = cluster["node1"], cluster["node3"]
    image_id, md5, size = cluster.new_image("node1", size=64 * 1024)
    cluster.upload(image_id, md5, size)
    assert node1.run("duplicate-notifications").returncode == 0  # events wait: Glance works
    assert doctor(node1)[0] == 0
    mode = node3.images.stat().st_mode
    os.chmod(node3.images, 0)
    try:
        code, checks = doctor(node1)
    finally:
        os.chmod(node3.images, mode)
    assert code == 1
    assert set(failing(checks)) == {"peer node3: store"}
    assert "Permission denied" in checks["peer node3: store"]["detail"]
    assert "let rsync_user read the store" in checks["peer node3: store"]["fix"]
    assert checks["peer node3: remote paths"]["status"] == "SKIP"
    assert checks["peer node2: store"]["status"] == "PASS"


def test_doctor_checks_that_each_peer_serves_the_relay_s_streams(cluster):
    node2 = cluster["node2"]
    image_id, md5, size = cluster.new_image("node1", size=64 * 1024)
    cluster.upload(image_id, md5, size)
    assert cluster["node1"].run("duplicate-notifications").returncode == 0
    code, checks = doctor(node2)  # a key that may run anything: serve runs as asked
    assert checks["peer node1: streams"]["status"] == "PASS", checks["peer node1: streams"]
    cluster.authorize(RRSYNC_KEY_OPTIONS)  # rrsync alone refuses the stream request
    code, checks = doctor(node2)
    assert code == 1
    assert set(failing(checks)) == {"peer node1: streams", "peer node3: streams"}
    assert "glance-image-sync serve" in checks["peer node1: streams"]["fix"]
    cluster.authorize(SERVE_COMMAND)  # what ssh-keys prints with relay on
    code, checks = doctor(node2)
    assert code == 0, failing(checks)
    assert "so does relative" in checks["peer node1: remote paths"]["detail"]


def test_state_dir_and_store_are_checked_as_the_user_doctor_runs_as(cluster):
    node1 = cluster["node1"]
    assert node1.run("both").returncode == 0  # a run as root leaves root's files in state_dir
    # The daemon's user: the store's owner. It reads a configuration of its own (no log_file).
    # mkdtemp's 0700 would keep the daemon's user from its configuration.
    os.chmod(cluster.base, 0o711)  # noqa: S103 - the test's own directory
    config = cluster.base / "as-glance.conf"
    config.write_text("".join(line + "\n" for line in node1.config.read_text().splitlines()
                              if not line.startswith("log_file")))
    # Able to read and search anywhere, to run this checkout's program from a directory
    # only root can enter (a CI clone); every write is still refused as to that user.
    as_glance = node1.command(["setpriv", f"--reuid={STORE_UID}", f"--regid={STORE_GID}",
                               "--clear-groups", "--inh-caps=+dac_read_search",
                               "--ambient-caps=+dac_read_search", "--", *cluster.program,
                               "--config-file",
                               str(config), "doctor", "--format", "json"])

    code, checks = doctor(node1, as_glance)
    assert code == 1
    state = checks["state_dir"]
    assert state["status"] == "FAIL"
    assert f"as {STORE_UID} (uid {STORE_UID}, gid {STORE_GID})" in state["detail"]
    assert f"{node1.state}: owner root:root (0:0), mode 0755" in state["detail"]
    assert f"{node1.state}/lock: owner root:root (0:0), mode 0644: cannot write it" in \
        state["detail"]
    assert f"chown -R {STORE_UID} {node1.state}" in state["fix"]
    assert checks["image store"]["status"] == "PASS"  # the store is its own

    subprocess.run(["chown", "-R", f"{STORE_UID}:{STORE_GID}", str(node1.state)], check=True)
    os.chown(node1.images, 0, 0)  # and now the store is root's
    code, checks = doctor(node1, as_glance)
    assert checks["state_dir"]["status"] == "PASS"
    store = checks["image store"]
    assert store["status"] == "FAIL"
    assert f"{DATADIR}: owner root:root (0:0), mode 0755; cannot create a file in it " \
        f"(Permission denied) as {STORE_UID}" in store["detail"]
    assert "run the tool as its owner, root" in store["fix"]
    os.chown(node1.images, STORE_UID, STORE_GID)
    assert pathlib.Path(node1.images).stat().st_uid == STORE_UID
