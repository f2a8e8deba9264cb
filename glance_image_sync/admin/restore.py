"""``glance-image-sync restore IMAGE_ID``: a trashed image back in this node's store.

The deliberate way back past a delete, on this node only. The file is taken
out of the trash (``store.trash``), its size and md5 checked against what was
recorded when it was trashed (the size only when no md5 was known then, and
it says so), and linked in under its image id; then the image's tombstone is
forgotten, so that its events apply again. Its record (``show``) and the log
of restores (``state.restores``, which the metrics count) say what happened.
``reconcile`` restores through ``put_back`` too.

It runs beside the daemon, without the run lock: the trashed file is claimed
by a rename, so a purge meanwhile cannot take it. Exit status 0 when it was
restored, 1 when it is not in the trash or a check failed (it then stays in
the trash), 2 for an id that is not a UUID.
"""

from __future__ import annotations

import os
import sys
import time

from oslo_log import log as logging

from glance_image_sync.exceptions import EXIT_FAILED, EXIT_OK, ConfigError, StoreError
from glance_image_sync.state import access, restores
from glance_image_sync.state.records import ImageRecords
from glance_image_sync.state.tombstones import Tombstones
from glance_image_sync.store.images import ImageStore, file_version
from glance_image_sync.store.trash import Trash
from glance_image_sync.store.trashrecord import describe_cause

LOG = logging.getLogger(__name__)


def put_back(settings, trash, image_id: str, by: str, expect_size=None, expect_md5=None):
    """Restore ``image_id`` from ``trash`` and forget its deletion; the ``Restored``.

    StoreError (``NotInTrash``, ``VerificationFailed``) when it cannot be.
    """
    restored = trash.take_back(image_id, expect_size, expect_md5)
    state_dir = settings.store.state_dir
    Tombstones(state_dir, settings.store.deleted_memory).discard(image_id)
    entry = restored.entry
    detail = f"restored from the trash by {by} ({restored.checked}); {describe_cause(entry)}"
    LOG.info("image %s: %s, on %s", image_id, detail, settings.nodes.this)
    try:
        st = os.stat(image_id, dir_fd=trash.store.dir_fd, follow_symlinks=False)
        ImageRecords(state_dir, settings.store.deleted_memory).write_fields(
            image_id, event_type=by, action="present", ok=True, detail=detail, attempt=1,
            source=None, size=st.st_size, checksum=restored.md5,
            verified=(file_version(st), restored.md5))
        restores.append(state_dir, {
            "time": time.time(), "image_id": image_id, "by": by, "size": entry.size,
            "md5": restored.md5, "trashed_at": entry.trashed_at,
            "event_type": entry.event_type, "publisher": entry.publisher})
    except OSError as exc:
        # The image is back either way; only show and the metrics know less.
        LOG.warning("image %s: restored, but not recorded in %s: %s", image_id, state_dir,
                    exc.strerror or exc)
    return restored


def main(args, settings, out=None) -> int:
    """The command: 0 once restored, 1 when it could not be."""
    access.check_store(settings.store.datadir)
    access.check_state_dir(settings.store.state_dir)
    try:
        store = ImageStore(settings.store)
    except StoreError as exc:
        raise ConfigError(str(exc)) from None
    node = settings.nodes.this
    try:
        restored = put_back(settings, Trash(store), args.image_id, "restore")
    except StoreError as exc:
        failure = exc
    else:
        failure = None
    finally:
        store.close()
    if failure is not None:
        print(f"glance-image-sync: image {args.image_id} not restored on {node}: {failure}",
              file=sys.stderr)
        return EXIT_FAILED
    entry = restored.entry
    (out or sys.stdout).write(
        f"image {args.image_id} restored on {node} from the trash: {entry.size} bytes, md5 "
        f"{restored.md5}; {restored.checked}\n  it had been {describe_cause(entry)}\n")
    return EXIT_OK
