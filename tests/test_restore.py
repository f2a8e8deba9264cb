"""``restore`` and what ``show`` and the metrics say of the trash (unit tests, no broker)."""

import hashlib
import json
import os

import pytest

from glance_image_sync.admin import show
from glance_image_sync.cmd import commands as cli
from glance_image_sync.metrics import Metrics
from glance_image_sync.settings import StoreSettings
from glance_image_sync.state import records, restores
from glance_image_sync.state.tombstones import Tombstones
from glance_image_sync.store.images import ImageStore
from glance_image_sync.store.trash import Cause, Trash
from tests.helpers import settings_for, write_config

IMAGE = "b90e9b0f-36ce-43c1-b08c-9b4201f6571f"
DATA = b"restorable image " * 3000
MD5 = hashlib.md5(DATA).hexdigest()
NO_BROKER = {"transport_url": "rabbit://guest:guest@127.0.0.1:1/"}


def trashed(tmp_path, md5=MD5, now=None):
    """The image deleted on node1: in its trash, its tombstone written."""
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    (images / IMAGE).write_bytes(DATA)
    store = ImageStore(StoreSettings(datadir=str(images), file_mode=None,
                                     state_dir=str(tmp_path / "state"), deleted_memory=60))
    try:
        Trash(store).put(IMAGE, Cause(event_type="image.delete", message_id="m-9",
                                      publisher="image.node2", source="node2", md5=md5,
                                      size=len(DATA)), now=now)
    finally:
        store.close()
    Tombstones(str(tmp_path / "state"), 3600).add(IMAGE)
    return images


def test_restore_puts_the_image_back_checked_and_forgets_its_deletion(tmp_path, capsys):
    images = trashed(tmp_path)
    config = write_config(tmp_path, **NO_BROKER)
    assert cli.main(["--config-file", str(config), "restore", IMAGE.upper()]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"image {IMAGE} restored on node1 from the trash: {len(DATA)} "
                          f"bytes, md5 {MD5}; size and md5 checked\n")
    assert "by image.delete (message m-9, published by image.node2), applied by the sync " \
        "worker" in out
    assert (images / IMAGE).read_bytes() == DATA
    assert IMAGE not in Tombstones(str(tmp_path / "state"), 3600)
    record = records.load(str(tmp_path / "state"), IMAGE)
    assert (record["event_type"], record["verified"]["md5"]) == ("restore", MD5)
    logged = json.loads((tmp_path / "state" / restores.FILE_NAME).read_text())
    assert (logged["image_id"], logged["by"], logged["publisher"]) == (
        IMAGE, "restore", "image.node2")
    metrics = Metrics(settings_for(tmp_path, **NO_BROKER))
    store = ImageStore(StoreSettings(datadir=str(images), file_mode=None,
                                     state_dir=str(tmp_path / "state"), deleted_memory=60))
    try:
        metrics.watch_trash(Trash(store))
        assert metrics.registry.get_sample_value("glance_image_sync_restores_total") == 1
        assert metrics.registry.get_sample_value("glance_image_sync_trash_images") == 0
    finally:
        store.close()

    # Not in the trash any more: exit 1, one line, nothing changed.
    assert cli.main(["--config-file", str(config), "restore", IMAGE]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"glance-image-sync: image {IMAGE} not restored on "
                                        f"node1: {IMAGE} is not in the trash of {images}"]


def test_a_copy_that_does_not_match_the_record_stays_in_the_trash(tmp_path, capsys):
    images = trashed(tmp_path, md5="0" * 32)  # what a forged delete may claim
    config = write_config(tmp_path, **NO_BROKER)
    assert cli.main(["--config-file", str(config), "restore", IMAGE]) == 1
    err = capsys.readouterr().err
    assert f"md5 {MD5}, recorded when it was trashed (as the delete notification gave it) " \
        f"{'0' * 32}" in err
    assert not (images / IMAGE).exists()
    assert IMAGE in Tombstones(str(tmp_path / "state"), 3600)


def test_an_id_that_is_not_a_uuid_is_a_usage_error(tmp_path, capsys):
    config = write_config(tmp_path, **NO_BROKER)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--config-file", str(config), "restore", "../etc/passwd"])
    assert exit_.value.code == 2
    assert "is not an image id" in capsys.readouterr().err


def test_show_says_when_it_was_trashed_by_whom_and_when_it_will_be_purged(tmp_path, capsys):
    trashed(tmp_path, now=1_000_000.0)
    config = write_config(tmp_path, deleted_image_grace=7200, **NO_BROKER)
    settings = settings_for(tmp_path, deleted_image_grace=7200, **NO_BROKER)
    doc = show.gather(settings, IMAGE)
    assert doc["trash"]["purge_at"] == 1_000_000.0 + 7200
    text = show.render_table(doc, now=1_000_000.0 + 3600)
    line = next(line for line in text.splitlines() if line.startswith("  trash:"))
    assert "by image.delete (message m-9, published by image.node2), applied by the sync " \
        f"worker; {len(DATA)} bytes, md5 {MD5} (as the delete notification gave it); " \
        "purged " in line
    assert "(in 1 h; sooner if the store runs short of space): 'glance-image-sync restore " \
        f"{IMAGE}' puts it back" in line
    assert cli.main(["--config-file", str(config), "show", IMAGE]) == 1  # no broker
    assert "  trash:      trashed " in capsys.readouterr().out
    os.unlink(tmp_path / "images" / ".glance-image-sync-trash" / IMAGE)
    assert "  trash:      not in the trash" in show.render_table(show.gather(settings, IMAGE),
                                                                now=0)
