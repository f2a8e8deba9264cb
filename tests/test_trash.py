"""The store's trash on a real directory: what it records, what it purges and in what
order, and how an image comes back (unit tests, no broker)."""

import hashlib
import json
import os
import stat
import types

import pytest

from glance_image_sync.exceptions import StoreError, VerificationFailed
from glance_image_sync.settings import StoreSettings
from glance_image_sync.store.images import ImageStore, file_version
from glance_image_sync.store.trash import TRASH_DIR, Cause, NotInTrash, Trash
from glance_image_sync.store.trashrecord import describe_cause

IMAGES = ["b90e9b0f-36ce-43c1-b08c-9b4201f6571f", "5f0b5d6c-1c6e-4f5a-9a39-1f4c1e1a7e11",
          "3c9e1f7a-5b2d-4e8f-9a61-0d4b7c2e8f15"]
IMAGE = IMAGES[0]
DATA = b"raw image bytes " * 4096
MD5 = hashlib.md5(DATA).hexdigest()
CAUSE = Cause(event_type="image.delete", message_id="m-1", publisher="image.node3",
              source="node3")


@pytest.fixture
def store(tmp_path):
    datadir = tmp_path / "images"
    datadir.mkdir()
    store = ImageStore(StoreSettings(datadir=str(datadir), file_mode=None,
                                     state_dir=str(tmp_path / "state"), deleted_memory=60))
    yield store
    store.close()


def _place(store, image_id=IMAGE, data=DATA):
    path = os.path.join(store.datadir, image_id)
    with open(path, "wb") as f:
        f.write(data)
    return path


def _trash_dir(store):
    return os.path.join(store.datadir, TRASH_DIR)


def test_a_delete_is_a_rename_into_a_private_directory_no_listing_counts(store):
    path = _place(store)
    inode = os.stat(path).st_ino
    entry = Trash(store).put(IMAGE, CAUSE, now=1000.0)
    assert not os.path.exists(path)
    moved = os.path.join(_trash_dir(store), IMAGE)
    assert os.stat(moved).st_ino == inode  # the same file: no copy
    assert stat.S_IMODE(os.stat(_trash_dir(store)).st_mode) == 0o700
    assert store.list_images() == {}  # never an image of the store
    assert store.remove_temporaries() == [] and os.path.exists(moved)  # sweeps leave it
    assert (entry.trashed_at, entry.size, entry.event_type, entry.publisher) == \
        (1000.0, len(DATA), "image.delete", "image.node3")
    assert Trash(store).get(IMAGE) == entry  # the record, read back
    assert Trash(store).put(IMAGE, CAUSE) is None  # nothing left to trash: idempotent


def test_the_md5_comes_from_this_node_s_verification_else_the_notification(store):
    _place(store)
    assert store.verify(IMAGE, len(DATA), MD5)  # verified once: known by file version
    entry = Trash(store).put(IMAGE, Cause(md5="0" * 32, size=len(DATA)))
    assert (entry.md5, entry.md5_from) == (MD5, "verified")

    other = IMAGES[1]
    _place(store, other)
    entry = Trash(store).put(other, Cause(md5=MD5, size=len(DATA)))
    assert (entry.md5, entry.md5_from) == (MD5, "notification")

    third = IMAGES[2]
    _place(store, third)
    # A notification's md5 for a file of another size says nothing of this one.
    entry = Trash(store).put(third, Cause(md5=MD5, size=len(DATA) + 1))
    assert (entry.md5, entry.md5_from) == (None, None)


def test_a_version_known_before_a_restart_is_asked_for_by_file_version(store):
    path = _place(store)
    version = file_version(os.stat(path))
    asked = []

    def known(version):
        asked.append(version)
        return MD5
    entry = Trash(store).put(IMAGE, CAUSE, known_md5=known)
    assert asked == [version]  # the version before the rename (which changes its ctime)
    assert (entry.md5, entry.md5_from) == (MD5, "verified")
    assert not os.path.exists(path)


def test_only_a_regular_file_is_ever_moved(store, tmp_path):
    target = tmp_path / "outside"
    target.write_bytes(b"not an image")
    os.symlink(target, os.path.join(store.datadir, IMAGE))
    with pytest.raises(StoreError, match="not a regular file"):
        Trash(store).put(IMAGE, CAUSE)
    assert os.path.islink(os.path.join(store.datadir, IMAGE)) and target.exists()
    os.unlink(os.path.join(store.datadir, IMAGE))
    os.symlink(tmp_path, os.path.join(store.datadir, TRASH_DIR))  # a trash that is a link
    _place(store)
    with pytest.raises(StoreError, match="not a directory of ours"):
        Trash(store).put(IMAGE, CAUSE)
    assert os.path.exists(os.path.join(store.datadir, IMAGE))


def test_purge_takes_what_is_past_the_grace_period_and_says_when_the_next_is_due(store):
    trash = Trash(store)
    for when, image_id in zip((100.0, 200.0, 300.0), IMAGES):
        _place(store, image_id)
        trash.put(image_id, CAUSE, now=when)
    purged, next_due = trash.purge(grace=1000, min_free_percent=0, now=1150.0)
    assert [(e.image_id, why) for e, why in purged] == [(IMAGES[0], "expired")]
    assert next_due == 1200.0
    assert [e.image_id for e in trash.entries()] == IMAGES[1:]
    assert sorted(os.listdir(_trash_dir(store))) == sorted(
        name for image_id in IMAGES[1:] for name in (image_id, image_id + ".json"))
    purged, next_due = trash.purge(grace=0, min_free_percent=0, now=1150.0)
    assert [e.image_id for e, _ in purged] == IMAGES[1:] and next_due is None
    assert os.listdir(_trash_dir(store)) == []


def test_short_of_space_the_oldest_go_first_until_enough_is_free(store, monkeypatch):
    trash = Trash(store)
    for when, image_id in zip((300.0, 100.0, 200.0), IMAGES):  # trashed out of id order
        _place(store, image_id)
        trash.put(image_id, CAUSE, now=when)
    # 5 % free, and each image purged gives 4 % more: two must go, the oldest two.
    monkeypatch.setattr(trash, "free_percent", lambda: 5.0 + 4.0 * (3 - len(trash.entries())))
    purged, next_due = trash.purge(grace=3600, min_free_percent=12, now=400.0)
    assert [(e.image_id, why) for e, why in purged] == [(IMAGES[1], "space"),
                                                        (IMAGES[2], "space")]
    assert [e.image_id for e in trash.entries()] == [IMAGES[0]] and next_due == 3900.0


def test_with_enough_space_nothing_goes_before_its_time(store):
    trash = Trash(store)
    _place(store)
    trash.put(IMAGE, CAUSE, now=100.0)
    assert trash.purge(grace=3600, min_free_percent=0, now=200.0) == ([], 3700.0)
    assert trash.stats() == (1, len(DATA))


def test_a_record_without_its_file_goes_with_age_and_a_file_without_one_is_kept(store):
    trash = Trash(store)
    _place(store)
    trash.put(IMAGE, CAUSE, now=100.0)
    os.unlink(os.path.join(_trash_dir(store), IMAGE))  # as a crash after the record
    _place(store, IMAGES[1])
    trash.put(IMAGES[1], CAUSE, now=100.0)
    os.unlink(os.path.join(_trash_dir(store), IMAGES[1] + ".json"))  # a record lost
    entry = trash.get(IMAGES[1])
    assert (entry.md5, entry.event_type) == (None, "")  # only what the file says
    assert "no record of why" in describe_cause(entry)
    trash.purge(grace=3600, min_free_percent=0, now=200.0)
    assert os.path.exists(os.path.join(_trash_dir(store), IMAGE + ".json"))
    trash.purge(grace=3600, min_free_percent=0, now=4000.0)
    assert not os.path.exists(os.path.join(_trash_dir(store), IMAGE + ".json"))


def test_a_record_of_another_file_is_not_trusted(store):
    trash = Trash(store)
    _place(store)
    trash.put(IMAGE, Cause(md5=MD5, size=len(DATA)), now=100.0)
    record = os.path.join(_trash_dir(store), IMAGE + ".json")
    doc = json.loads(open(record).read())
    doc["file"][1] += 1  # another inode
    with open(record, "w") as f:
        json.dump(doc, f)
    assert trash.get(IMAGE).md5 is None


def test_take_back_checks_size_and_md5_and_never_replaces_a_file(store):
    trash = Trash(store)
    _place(store)
    store.verify(IMAGE, len(DATA), MD5)
    trash.put(IMAGE, CAUSE)
    restored = trash.take_back(IMAGE)
    assert (restored.md5, restored.checked) == (MD5, "size and md5 checked")
    with open(os.path.join(store.datadir, IMAGE), "rb") as f:
        assert f.read() == DATA
    assert trash.get(IMAGE) is None and os.listdir(_trash_dir(store)) == []
    with pytest.raises(NotInTrash):
        trash.take_back(IMAGE)

    trash.put(IMAGE, CAUSE)
    _place(store, IMAGE, b"another upload under that id")
    with pytest.raises(StoreError, match="in place .* already"):
        trash.take_back(IMAGE)
    assert trash.get(IMAGE) is not None  # the trashed copy stays


def test_a_trashed_copy_that_changed_stays_in_the_trash(store):
    trash = Trash(store)
    _place(store)
    trash.put(IMAGE, Cause(md5=MD5, size=len(DATA)))
    trashed = os.path.join(_trash_dir(store), IMAGE)
    before = os.stat(trashed)
    with open(trashed, "r+b") as f:
        f.write(b"X")  # same size, other bytes
    os.utime(trashed, ns=(before.st_atime_ns, before.st_mtime_ns))  # and the same times
    with pytest.raises(VerificationFailed, match="md5 .* recorded when it was trashed"):
        trash.take_back(IMAGE)
    assert trash.get(IMAGE) is not None and not os.path.exists(
        os.path.join(store.datadir, IMAGE))
    assert [n for n in os.listdir(store.datadir) if n.startswith(".glance-image-sync.")
            and "owner" not in n] == []  # no claimed copy left behind
    with pytest.raises(VerificationFailed, match="size"):
        trash.take_back(IMAGE, expect_size=1)


def test_without_a_known_md5_only_the_size_is_checked_and_it_says_so(store):
    trash = Trash(store)
    _place(store)
    trash.put(IMAGE, CAUSE)
    restored = trash.take_back(IMAGE)
    assert restored.checked.startswith("size checked only")
    assert restored.md5 == MD5


def test_the_cause_is_told_in_words():
    entry = types.SimpleNamespace(trashed_at=0.0, event_type="image.delete", message_id="m",
                                  publisher="image.node3", source="node3",
                                  by="the sync worker")
    text = describe_cause(entry)
    assert text.endswith("by image.delete (message m, published by image.node3), applied by "
                         "the sync worker")
