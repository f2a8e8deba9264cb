"""What this node last did with each image, for ``glance-image-sync show``.

One small JSON document per image, ``<state_dir>/images/<image id>.json``::

    {"version": 1, "time": 1700000000.5, "event_type": "image.upload",
     "action": "present", "ok": true, "detail": "installed from node1",
     "attempt": 1, "source": "node1", "size": 4194304, "checksum": "...",
     "verified": {"file": [dev, ino, size, mtime_ns, ctime_ns], "md5": "..."}}

``verified`` is the version of the file (``store.images.file_version``) whose
md5 the sync worker computed, and that md5: as long as the file's version is
the same, the copy on disk is the one that was verified.

The sync worker writes one for an event that changed the store, for one that
failed, and for the first event it sees of an image already in place. Events
that change nothing are not written again: Glance sends ``image.update`` on
every change of a property. A record is replaced by a rename and not fsynced:
one lost in a crash only leaves ``show`` with less to say. Records older than
``deleted_image_memory`` are pruned at start-up, like the tombstones.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from glance_image_sync import events
from glance_image_sync.exceptions import NodeStateError

RECORDS_DIR = "images"
VERSION = 1
_DETAIL_LIMIT = 500


def path_of(state_dir: str, image_id: str) -> str:
    return os.path.join(state_dir, RECORDS_DIR, events.image_id(image_id) + ".json")


def load(state_dir: str, image_id: str) -> dict | None:
    """The record of ``image_id``, or None if there is none; NodeStateError if unreadable."""
    path = path_of(state_dir, image_id)
    try:
        with open(path, "rb") as f:
            raw = f.read(64 * 1024)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise NodeStateError(f"cannot read {path}: {exc.strerror}") from None
    try:
        doc = json.loads(raw.decode("utf-8"))
        if not isinstance(doc, dict) or doc.get("version") != VERSION:
            raise ValueError("not a version 1 record")
    except ValueError as exc:
        raise NodeStateError(f"{path} is not an image record: {exc}") from None
    return doc


class ImageRecords:
    """Writes and prunes the records in ``<state_dir>/images``; safe from any thread."""

    def __init__(self, state_dir: str, memory_seconds: int):
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, RECORDS_DIR)
        self.memory_seconds = memory_seconds
        os.makedirs(self.path, mode=0o750, exist_ok=True)

    def has(self, image_id: str) -> bool:
        return os.path.exists(path_of(self.state_dir, image_id))

    def verified(self, image_id: str) -> tuple | None:
        """(file version, md5) the record says was verified, or None."""
        try:
            doc = load(self.state_dir, image_id)
        except NodeStateError:
            return None
        verified = (doc or {}).get("verified") or {}
        if not isinstance(verified.get("file"), list) or not isinstance(verified.get("md5"), str):
            return None
        return tuple(verified["file"]), verified["md5"]

    def write(self, event, ok: bool, detail: str, attempt: int, verified=None,
              when: float | None = None) -> None:
        """Record ``event``'s outcome; ``verified`` is (file version, md5) or None."""
        self.write_fields(event.image_id, event_type=event.event_type,
                          action=event.action.value, ok=ok, detail=detail, attempt=attempt,
                          source=event.source, size=event.size, checksum=event.checksum,
                          verified=verified, when=when)

    def write_fields(self, image_id: str, *, event_type: str, action: str, ok: bool,
                     detail: str, attempt: int, source, size, checksum, verified=None,
                     when: float | None = None) -> None:
        """A record from its fields (``write`` for an event; ``restore`` for itself)."""
        doc = {
            "version": VERSION,
            "time": time.time() if when is None else when,
            "event_type": event_type,
            "action": action,
            "ok": ok,
            "detail": detail[:_DETAIL_LIMIT],
            "attempt": attempt,
            "source": source,
            "size": size,
            "checksum": checksum,
            "verified": ({"file": list(verified[0]), "md5": verified[1]} if verified
                         else None),
        }
        fd, temp = tempfile.mkstemp(prefix=".record.", dir=self.path)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(doc, f, sort_keys=True)
            os.chmod(temp, 0o644)  # mkstemp's 0600 would hide it from a non-root show
            os.rename(temp, path_of(self.state_dir, image_id))
            temp = None
        finally:
            if temp is not None:
                os.unlink(temp)

    def prune(self, now: float | None = None) -> int:
        """Forget records older than the memory; return how many."""
        cutoff = (now or time.time()) - self.memory_seconds
        pruned = 0
        for entry in os.scandir(self.path):
            if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                os.unlink(entry.path)
                pruned += 1
        return pruned
