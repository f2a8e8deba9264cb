"""The local image store, on a real directory (no root needed)."""

import hashlib
import os
import pathlib
import stat
import threading

import pytest

from glance_image_sync.exceptions import DiskFull, Rejected, StoreError, VerificationFailed
from glance_image_sync.settings import StoreSettings
from glance_image_sync.store import checksum
from glance_image_sync.store.images import TEMP_PREFIX, ImageStore
from tools.localcluster import wait_for

IMAGE = "b90e9b0f-36ce-43c1-b08c-9b4201f6571f"
DATA = b"qcow2 image bytes " * 1000
MD5 = hashlib.md5(DATA).hexdigest()


@pytest.fixture
def store(tmp_path):
    datadir = tmp_path / "images"
    datadir.mkdir()
    store = ImageStore(StoreSettings(datadir=str(datadir), file_mode=None,
                                     state_dir=str(tmp_path / "state"), deleted_memory=60))
    yield store
    store.close()


def _writer(data, mode=0o640):
    """What rsync --perms does: write the bytes, then give the source's mode."""
    def fetch(path):
        with open(path, "r+b") as f:
            f.write(data)
        os.chmod(path, mode)
    return fetch


def _entries(store):
    """The store's files, but for the owner file of this (open) store."""
    return sorted(name for name in os.listdir(store.datadir) if name != store.owner.file_name)


def test_install_verifies_then_renames_with_source_mode(store):
    store.install(IMAGE, len(DATA), MD5, _writer(DATA))
    path = os.path.join(store.datadir, IMAGE)
    with open(path, "rb") as f:
        assert f.read() == DATA
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert _entries(store) == [IMAGE]
    assert store.verify(IMAGE, len(DATA), MD5)


def test_set_id_bits_of_the_source_are_never_installed(store):
    store.install(IMAGE, len(DATA), MD5, _writer(DATA, mode=0o4755))
    assert stat.S_IMODE(os.stat(os.path.join(store.datadir, IMAGE)).st_mode) == 0o755


def test_the_temporary_copy_is_private_while_it_is_written(store):
    seen = {}

    def fetch(path):
        seen["mode"] = stat.S_IMODE(os.stat(path).st_mode)
        seen["name"] = os.path.basename(path)
        return _writer(DATA)(path)

    store.install(IMAGE, len(DATA), MD5, fetch)
    assert seen["mode"] == 0o600
    assert seen["name"].startswith(TEMP_PREFIX + IMAGE)


@pytest.mark.parametrize("data, error", [
    (DATA[:-1], "size"),
    (DATA[:-1] + b"X", "md5"),
])
def test_a_copy_that_fails_verification_is_removed_never_installed(store, data, error):
    with pytest.raises(VerificationFailed, match=error):
        store.install(IMAGE, len(DATA), MD5, _writer(data))
    assert _entries(store) == []


def test_bytes_rewritten_behind_the_md5_follower_are_read_again(store, monkeypatch):
    """rsync redoes a file whose checksum failed: the follower saw the first try."""
    def fetch(path):
        with open(path, "r+b") as f:
            f.write(b"X" * len(DATA))  # a first, bad pass...
            f.flush()
            wait_for(lambda: follower_offsets and follower_offsets[-1]() == len(DATA), 10,
                     interval=0.001, what="the follower to read the bad pass")
            f.seek(0)
            f.write(DATA)  # ...redone in place
        os.chmod(path, 0o640)

    follower_offsets = []
    real = checksum.Md5Follower

    class Watched(real):
        def __init__(self, fd):
            super().__init__(fd)
            follower_offsets.append(lambda: self._offset)

    monkeypatch.setattr(checksum, "Md5Follower", Watched)
    store.install(IMAGE, len(DATA), MD5, fetch)
    assert store.verify(IMAGE, len(DATA), MD5)


def test_the_md5_is_computed_while_the_copy_arrives(store, monkeypatch):
    reads = []
    real = checksum.md5_of_fd
    monkeypatch.setattr(checksum, "md5_of_fd", lambda fd: reads.append(fd) or real(fd))
    store.install(IMAGE, len(DATA), MD5, _writer(DATA))
    assert reads == []  # no second pass over the file


def test_a_failed_fetch_leaves_no_temporary_file(store):
    def fetch(path):
        raise RuntimeError("peer went away")

    with pytest.raises(RuntimeError):
        store.install(IMAGE, len(DATA), MD5, fetch)
    assert _entries(store) == []


def test_an_image_larger_than_the_free_space_fails_before_fetching(store):
    with pytest.raises(DiskFull, match="disk full"):
        store.install(IMAGE, store.free_bytes() + 1, MD5, _writer(DATA))
    assert _entries(store) == []


def test_verify_is_false_for_missing_wrong_or_symlinked_images(store, tmp_path):
    assert not store.verify(IMAGE, len(DATA), MD5)
    outside = tmp_path / "outside"
    outside.write_bytes(DATA)
    os.symlink(outside, os.path.join(store.datadir, IMAGE))
    assert not store.verify(IMAGE, len(DATA), MD5)


def test_install_replaces_a_symlink_without_touching_its_target(store, tmp_path):
    outside = tmp_path / "outside"
    outside.write_bytes(b"keep me")
    os.symlink(outside, os.path.join(store.datadir, IMAGE))
    store.install(IMAGE, len(DATA), MD5, _writer(DATA))
    assert outside.read_bytes() == b"keep me"
    assert not os.path.islink(os.path.join(store.datadir, IMAGE))
    assert store.verify(IMAGE, len(DATA), MD5)


def test_remove_deletes_only_a_regular_file_named_by_the_uuid(store, tmp_path):
    assert store.remove(IMAGE) is False
    store.install(IMAGE, len(DATA), MD5, _writer(DATA))
    assert store.remove(IMAGE) is True
    assert _entries(store) == []
    outside = tmp_path / "outside"
    outside.write_bytes(b"keep me")
    os.symlink(outside, os.path.join(store.datadir, IMAGE))
    with pytest.raises(StoreError, match="not a regular file"):
        store.remove(IMAGE)
    assert outside.read_bytes() == b"keep me"
    for hostile in ("../outside", "/etc/passwd", "*", IMAGE.upper()):
        with pytest.raises(Rejected):
            store.remove(hostile)
    assert outside.exists()


def test_verification_is_cached_until_the_file_changes(store, monkeypatch):
    store.install(IMAGE, len(DATA), MD5, _writer(DATA))
    reads = []
    real = checksum.md5_of_fd
    monkeypatch.setattr(checksum, "md5_of_fd", lambda fd: reads.append(fd) or real(fd))
    for _ in range(100):
        assert store.verify(IMAGE, len(DATA), MD5)
    assert reads == []  # install recorded the md5 it computed
    path = os.path.join(store.datadir, IMAGE)
    with open(path, "r+b") as f:  # same size, other bytes: a new mtime
        f.write(b"X")
    assert not store.verify(IMAGE, len(DATA), MD5)
    assert len(reads) == 1


def test_temporaries_of_a_killed_run_are_found_and_removed(store):
    leftover = os.path.join(store.datadir, f"{TEMP_PREFIX}{IMAGE}.deadbeef")
    open(leftover, "wb").close()
    glance_own = os.path.join(store.datadir, ".not-ours")
    open(glance_own, "wb").close()
    assert store.remove_temporaries() == [os.path.basename(leftover)]
    assert _entries(store) == [".not-ours"]


def test_a_staging_directory_left_by_a_killed_run_goes_at_start_up_only(store):
    temp = pathlib.Path(store.datadir) / f"{TEMP_PREFIX}{IMAGE}.0123abcd"
    temp.write_bytes(DATA)
    staging = pathlib.Path(store.datadir) / f"{TEMP_PREFIX}batch.89abcdef"
    staging.mkdir()
    os.link(temp, staging / IMAGE)  # as transfer links a batch's copies
    assert store.remove_temporaries(IMAGE) == [temp.name]  # after a delete: its files
    assert staging.exists()
    assert store.remove_temporaries() == [staging.name]  # at start-up: everything
    assert _entries(store) == []


def test_a_copy_in_place_is_checked_at_the_lowest_cpu_priority(store, monkeypatch):
    (pathlib.Path(store.datadir) / IMAGE).write_bytes(DATA)
    seen = []
    real = checksum.md5_of_fd

    def watched(fd):
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return real(fd)

    monkeypatch.setattr(checksum, "md5_of_fd", watched)
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert store.verify(IMAGE, len(DATA), MD5)
    assert seen == [checksum.CHECK_NICENESS]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine


def test_a_failing_check_raises_on_the_callers_thread(monkeypatch):
    def broken(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(checksum, "md5_of_fd", broken)
    with pytest.raises(OSError, match="Input/output error"):
        checksum.md5_of_fd_yielding(0)


# -- whose temporaries: several processes write into one store ------------------------

OTHER_WRITER = """
import os, sys
from glance_image_sync.store.owner import Owner
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
owner = Owner(fd)
owner.hold()
for name in (owner.temp_name(sys.argv[2]), owner.temp_name(sys.argv[2])):
    open(os.path.join(sys.argv[1], name), "wb").close()
os.mkdir(os.path.join(sys.argv[1], owner.temp_name("batch")))
print(owner.file_name, flush=True)
sys.stdin.read()
"""


@pytest.fixture
def other_writer(store):
    """Another live process with temporaries (two copies, a staging directory) in the store."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", OTHER_WRITER, store.datadir, IMAGE],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    owner_file = proc.stdout.readline().strip()
    try:
        yield proc, owner_file
    finally:
        proc.kill()
        proc.wait()


def test_a_live_process_s_temporaries_are_never_removed_by_another(store, other_writer):
    proc, owner_file = other_writer
    theirs = _entries(store)
    assert len(theirs) == 4 and owner_file in theirs
    store.install(IMAGE, len(DATA), MD5, _writer(DATA))  # ours come and go beside them
    assert store.remove_temporaries(IMAGE) == []  # as a delete event would
    assert store.remove_temporaries() == []  # as a start-up or a stop would
    assert _entries(store) == sorted(theirs + [IMAGE])


def test_a_killed_process_s_temporaries_and_owner_file_go_at_the_next_sweep(store,
                                                                            other_writer):
    proc, owner_file = other_writer
    theirs = [name for name in _entries(store) if name != owner_file]
    proc.kill()  # SIGKILL: the kernel drops its lock, nothing else is cleaned
    proc.wait()
    assert owner_file in _entries(store)
    assert sorted(store.remove_temporaries()) == sorted(theirs)
    assert _entries(store) == []  # its owner file too


def test_a_delete_removes_only_this_process_s_temporaries_of_that_image(store, tmp_path):
    other = ImageStore(StoreSettings(datadir=store.datadir, file_mode=None,
                                     state_dir=str(tmp_path / "state"), deleted_memory=60))
    seen = {}

    def stalled(path):  # our transfer, still running when another store's delete comes
        seen["others_removed"] = other.remove_temporaries(IMAGE)
        seen["ours_removed"] = store.remove_temporaries(IMAGE)

    with pytest.raises(StoreError, match="removed or replaced during the transfer"):
        store.install(IMAGE, len(DATA), MD5, stalled)
    assert seen["others_removed"] == []  # another writer's delete: not its temporary
    assert len(seen["ours_removed"]) == 1  # its own process's delete: removed
    other.close()


def test_an_owner_file_lives_while_its_process_has_temporaries(store):
    assert store.owner.file_name is None  # an idle store has none
    seen = {}

    def fetch(path):
        seen["name"] = store.owner.file_name
        seen["entries"] = sorted(os.listdir(store.datadir))
        _writer(DATA)(path)

    store.install(IMAGE, len(DATA), MD5, fetch)
    name = seen["name"]
    assert name.startswith(".glance-image-sync.owner.") and f".{os.getpid()}-" in name
    token = name[len(".glance-image-sync.owner."):]
    temp = [entry for entry in seen["entries"] if entry != name]
    assert len(temp) == 1 and temp[0].startswith(f"{TEMP_PREFIX}{IMAGE}.{token}.")
    assert store.owner.file_name is None
    assert os.listdir(store.datadir) == [IMAGE]


def test_a_check_that_cannot_lower_its_priority_says_so_once_and_still_checks(
        store, monkeypatch, caplog):
    # As under a system-call filter that denies setpriority.
    def denied(*args):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "setpriority", denied)
    monkeypatch.setattr(checksum, "_not_niced", threading.Lock())
    (pathlib.Path(store.datadir) / IMAGE).write_bytes(DATA)
    with caplog.at_level("WARNING", logger="glance_image_sync.store.checksum"):
        with open(pathlib.Path(store.datadir) / IMAGE, "rb") as image:
            assert checksum.md5_of_fd_yielding(image.fileno()) == MD5
            assert checksum.md5_of_fd_yielding(image.fileno()) == MD5
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert "normal CPU priority" in warnings[0] and "setpriority" in warnings[0]
