"""Least privilege on the real cluster: what a peer's key may do, host keys, forged messages.

The README tells operators to restrict the key the nodes log in with to a read-only rrsync of
the image store (``command="rrsync -ro /var/lib/glance/images",restrict`` in
``authorized_keys``, with ``rsync_remote_paths = relative``; or the same with ``-absolute``
where rrsync has it). Here every node's sshd has one of those lines: replication still works,
and everything else that key could be used for is refused. A peer whose host key is unknown
or has changed is never copied from. Forged messages with look-alike ids and publishers
change nothing, on any node.
"""

import json
import os
import shutil
import stat
import subprocess
import uuid

import pytest

from glance_image_sync.broker import topology
from tests.clusterhelpers import (
    dead_letter_reasons,
    run_both_everywhere,
    sshd_logins,
    store_snapshot,
)
from tools.localcluster import (
    DATADIR,
    RRSYNC_KEY_OPTIONS,
    RRSYNC_RELATIVE_KEY_OPTIONS,
    STORE_GID,
    STORE_UID,
    wait_for,
)

pytestmark = pytest.mark.cluster


# The nodes accept the client key only for read-only rrsync of the store.
restricted_key = pytest.mark.cluster_setup(restricted_key=True)


def as_client(cluster, argv) -> subprocess.CompletedProcess:
    """Run ssh or rsync with the key and ssh configuration the nodes use."""
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=cluster.env)


def ssh(cluster):
    return ["ssh", "-F", str(cluster.ssh_config), "-o", "BatchMode=yes"]


def pull(cluster, remote, dest) -> subprocess.CompletedProcess:
    return as_client(cluster, ["rsync", "-e", " ".join(ssh(cluster)), "--",
                               f"root@node1:{remote}", str(dest)])


@pytest.mark.parametrize("options", [
    pytest.param(RRSYNC_KEY_OPTIONS, id="rrsync-absolute",
                 marks=pytest.mark.cluster_setup(restricted_key=True)),
    # rrsync without -absolute, as on Ubuntu 22.04 and 24.04: paths relative to the store.
    pytest.param(RRSYNC_RELATIVE_KEY_OPTIONS, id="rrsync-relative", marks=[
        pytest.mark.cluster_setup(restricted_key=RRSYNC_RELATIVE_KEY_OPTIONS),
        pytest.mark.cluster_config(rsync_remote_paths="relative")]),
])
def test_a_key_restricted_to_read_only_rrsync_still_replicates(cluster, options):
    assert cluster.authorized_keys.read_text().startswith(options + ",")
    first, first_md5, first_size = cluster.new_image("node1", size=3 * 1024 * 1024 + 5)
    second, second_md5, second_size = cluster.new_image("node3", size=1024 * 1024, mode=0o644)
    cluster.upload(first, first_md5, first_size)
    cluster.upload(second, second_md5, second_size, publisher="node3")

    run_both_everywhere(cluster)

    for node in cluster.nodes:
        for image_id, md5, mode in ((first, first_md5, 0o640), (second, second_md5, 0o644)):
            assert node.has(image_id, md5), (node.name, image_id)
            st = node.path(image_id).stat()
            assert stat.S_IMODE(st.st_mode) == mode and (st.st_uid, st.st_gid) == (STORE_UID,
                                                                                  STORE_GID)
        assert sorted(node.files()) == sorted([first, second]), node.name
    assert "installed and verified on node2 (from node1)" in cluster["node2"].log.read_text()
    assert "installed and verified on node1 (from node3)" in cluster["node1"].log.read_text()

    # reconcile lists the peers and asks them for md5s through the same restriction.
    result = cluster["node2"].run("reconcile", "--format", "json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["peers"]["node1"]["reachable"] is True

    cluster.delete(first, first_md5, first_size)
    run_both_everywhere(cluster)
    assert all(node.files() == [second] for node in cluster.nodes)


@restricted_key
def test_the_restricted_key_reads_only_the_store_and_does_nothing_else(cluster):
    image_id, md5, _ = cluster.new_image("node1", size=64 * 1024)
    node1 = cluster["node1"]
    outside_link = "11111111-2222-4333-8444-555555555555"
    os.symlink("/etc/passwd", node1.images / outside_link)  # a link out of the store
    payload = cluster.base / "payload"
    payload.write_bytes(b"written through a read-only key")
    received = cluster.base / "received"
    received.mkdir()

    # What glance-image-sync does: an absolute path in the store. It works.
    assert pull(cluster, f"{DATADIR}/{image_id}", received / "copy").returncode == 0
    assert (received / "copy").read_bytes() == node1.path(image_id).read_bytes()

    refusals = {
        "write": as_client(cluster, ["rsync", "-e", " ".join(ssh(cluster)), "--", str(payload),
                                     f"root@node1:{DATADIR}/{uuid.uuid4()}"]),
        "delete": as_client(cluster, ["rsync", "-e", " ".join(ssh(cluster)), "-r", "--delete",
                                      "--", str(cluster.base / "received") + "/",
                                      f"root@node1:{DATADIR}/"]),
        "parent": pull(cluster, f"{DATADIR}/../../../../etc/passwd", received / "parent"),
        "symlink": pull(cluster, f"{DATADIR}/{outside_link}", received / "symlink"),
        "outside": pull(cluster, "/etc/passwd", received / "outside"),
        "command": as_client(cluster, [*ssh(cluster), "node1", "id"]),
        "sender": as_client(cluster, [*ssh(cluster), "node1",
                                      "rsync --server --sender -e.LsfxCIvu . /etc/shadow"]),
        "forward": as_client(cluster, [*ssh(cluster), "-W", "127.0.0.1:5672", "node1"]),
    }
    for what, result in refusals.items():
        assert result.returncode != 0, (what, result.stdout, result.stderr)
    assert "sending to read-only server is not allowed" in refusals["write"].stderr
    assert "sending to read-only server is not allowed" in refusals["delete"].stderr
    assert "do not use .. in" in refusals["parent"].stderr
    assert "unsafe arg" in refusals["symlink"].stderr
    assert "does not run rsync" in refusals["command"].stderr
    assert "uid=" not in refusals["command"].stdout
    assert "stdio forwarding failed" in refusals["forward"].stderr
    assert sorted(os.listdir(received)) == ["copy"]  # nothing read from outside the store
    assert sorted(node1.files()) == sorted([image_id, outside_link])  # nothing written


def _look_alike(image_id: str) -> str:
    """The id with one character swapped for a Cyrillic or fullwidth look-alike."""
    for ascii_char, other in (("a", "\u0430"), ("e", "\u0435"), ("c", "\u0441")):
        if ascii_char in image_id:
            return image_id.replace(ascii_char, other, 1)
    digit = next(c for c in image_id if c.isdigit())
    return image_id.replace(digit, chr(0xFF10 + int(digit)), 1)


@restricted_key
def test_forged_look_alike_messages_change_nothing_on_any_node(cluster):
    image_id, md5, size = cluster.new_image("node1", size=256 * 1024)
    cluster.upload(image_id, md5, size)
    run_both_everywhere(cluster)
    new_id, new_md5, new_size = cluster.new_image("node3", size=64 * 1024)
    before = store_snapshot(cluster)
    logins = sshd_logins(cluster)

    forged_notifications = [
        ("image.delete", _look_alike(image_id), "node1"),
        ("image.delete", "../" + image_id[3:], "node1"),
        ("image.delete", image_id.replace("-", "\uff0f", 1), "node1"),
        ("image.delete", image_id + "\u0000", "node1"),
        ("image.upload", _look_alike(new_id), "node3"),
        ("image.upload", new_id, "n\u043ede3"),  # Cyrillic o
        ("image.upload", new_id, "node\uff13"),  # fullwidth 3
        ("image.upload", new_id, "node3\u200b"),  # zero-width space
        # A well-formed host name outside api_nodes is no forgery (a node added to the
        # list elsewhere first): tests/test_cluster_nodes.py. This one names no host.
        ("image.delete", image_id, "node4;id"),
    ]
    for event_type, forged_id, publisher in forged_notifications:
        if event_type == "image.delete":
            cluster.notify(event_type, forged_id, publisher=publisher, status="deleted",
                           deleted=True)
        else:
            cluster.notify(event_type, forged_id, new_md5, new_size, publisher=publisher)
    forged_events = [
        {"action": "absent", "image_id": image_id.upper(), "source": "node1"},
        {"action": "absent", "image_id": _look_alike(image_id), "source": None},
        {"action": "present", "image_id": new_id, "source": "n\u043ede3", "checksum": new_md5,
         "size": new_size},
        {"action": "present", "image_id": new_id, "source": "node3", "checksum": new_md5,
         "size": str(new_size)},
    ]
    for event in forged_events:  # straight into node2's queue, past the fan-out
        cluster.publish_raw(json.dumps({"version": 1, **event}).encode(),
                            routing_key=topology.node_queue_name("node2"), exchange="")

    for node in cluster.nodes:
        assert node.run("both").returncode in (0, 1), node.name

    assert store_snapshot(cluster) == before
    assert sshd_logins(cluster) == logins, "a forged message made a node connect to a peer"
    reasons = dead_letter_reasons(cluster)
    assert len(reasons) == len(forged_notifications) + len(forged_events), reasons
    assert sum("is not a UUID" in reason or "not a canonical UUID" in reason
               for reason in reasons) == 7, reasons
    assert sum("publisher" in reason or "source" in reason for reason in reasons) == 5, reasons
    assert any("is not a non-negative integer" in reason for reason in reasons), reasons


def test_a_peer_with_an_unknown_or_changed_host_key_is_never_copied_from(cluster):
    # Without the cluster's StrictHostKeyChecking line: what the tool itself passes to ssh
    # (BatchMode) must be enough to refuse a host it cannot verify.
    config = cluster.ssh_config.read_text()
    cluster.ssh_config.write_text(config.replace("  StrictHostKeyChecking yes\n", ""))
    known_hosts = cluster.base / "known_hosts"
    genuine = known_hosts.read_text()
    impostor = cluster.base / "impostor_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(impostor)],
                   check=True, timeout=30)
    impostor_key = " ".join(impostor.with_suffix(".pub").read_text().split()[:2])
    changed = "".join(f"{line.split()[0]} {impostor_key}\n" for line in genuine.splitlines())

    image_id, md5, size = cluster.new_image("node1", size=512 * 1024)
    cluster.upload(image_id, md5, size)
    assert cluster["node1"].run("duplicate-notifications").returncode == 0
    node2 = cluster["node2"]
    logins = sshd_logins(cluster)

    # A changed key, then none at all: each named in the log, neither ever accepted.
    for text, named in ((changed, "REMOTE HOST IDENTIFICATION HAS CHANGED"),
                        ("", "Host key verification failed")):
        known_hosts.write_text(text)
        mark = node2.log.stat().st_size if node2.log.exists() else 0

        def refused(mark=mark, named=named):
            result = node2.run("sync-images")
            assert result.returncode in (0, 1), result.stderr
            return named in node2.log_since(mark)

        wait_for(refused, 60, interval=0.5, what=f"node2 to log {named!r}")
        assert not node2.path(image_id).exists() and node2.temporaries() == []
        assert known_hosts.read_text() == text, "a host key was learnt, not verified"
    assert sshd_logins(cluster) == logins, "a peer was logged in to without a verified key"

    known_hosts.write_text(genuine)
    wait_for(lambda: node2.run("sync-images").returncode in (0, 1) and node2.has(image_id, md5),
             60, interval=0.5, what="the copy once the genuine key is known again")


@pytest.mark.cluster_config(rsync_remote_paths="relative")
def test_the_lines_ssh_keys_prints_are_all_a_cluster_needs(cluster):
    hosts = cluster.base / "host-keys"
    hosts.mkdir()
    for node in cluster.nodes:  # what an operator collects: each node's host public key
        shutil.copy(node.dir / "ssh/host_ed25519.pub", hosts / f"{node.name}.pub")
    cluster.authorized_keys.write_text("")
    (cluster.base / "known_hosts").write_text("")
    authorized, known = set(), set()
    for node in cluster.nodes:
        result = node.run("ssh-keys", "--public-key", str(cluster.client_key) + ".pub",
                          "--host-keys", str(hosts), "--format", "json")
        assert result.returncode == 0, result.stderr
        doc = json.loads(result.stdout)
        authorized |= set(doc["authorized_keys"].values())
        known |= {line for lines in doc["known_hosts"].values() for line in lines}
    # The nodes share one client key and one authorized_keys file here.
    serve = f'command="glance-image-sync serve --store {DATADIR}",restrict'
    assert authorized == {f"{serve} "
                          + " ".join((cluster.base / "client_ed25519.pub").read_text().split()[:2])
                          + f" glance-image-sync@{name}" for name in ("node1", "node2", "node3")}
    # The package puts glance-image-sync on the PATH; here it is the test's own.
    cluster.authorized_keys.write_text(sorted(authorized)[0].replace(
        "glance-image-sync serve", f"{' '.join(cluster.program)} serve", 1) + "\n")
    (cluster.base / "known_hosts").write_text("".join(line + "\n" for line in sorted(known)))

    image_id, md5, size = cluster.new_image("node2", size=256 * 1024)
    cluster.upload(image_id, md5, size, publisher="node2")
    run_both_everywhere(cluster)
    assert all(node.has(image_id, md5) for node in cluster.nodes)
    result = cluster["node1"].run("doctor")
    assert result.returncode == 0, result.stdout
