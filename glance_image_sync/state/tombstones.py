"""Images this node deleted, remembered so that nothing brings them back.

Glance never reuses an image id, so once ``image.delete`` was applied any
later ``ensure present`` for that id is stale: a redelivery, a retry queued
before the delete, or a replay. Each deleted id is an empty file in
``<state_dir>/deleted/`` (its mtime is when), which survives restarts and
crashes and costs one ``stat`` to check. Entries older than
``deleted_image_memory`` are pruned at start-up. ``glance-image-sync restore``
forgets one: putting an image back is the deliberate way past a delete.
"""

from __future__ import annotations

import os
import time

from glance_image_sync import events

TOMBSTONES_DIR = "deleted"


class Tombstones:
    def __init__(self, state_dir: str, memory_seconds: int):
        self.path = os.path.join(state_dir, TOMBSTONES_DIR)
        self.memory_seconds = memory_seconds
        os.makedirs(self.path, mode=0o750, exist_ok=True)

    def add(self, image_id: str) -> None:
        name = os.path.join(self.path, events.image_id(image_id))
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
        try:
            os.utime(fd)
            os.fsync(fd)
        finally:
            os.close(fd)

    def discard(self, image_id: str) -> bool:
        """Forget a deletion (a restore); True if it was remembered."""
        try:
            os.unlink(os.path.join(self.path, events.image_id(image_id)))
        except FileNotFoundError:
            return False
        return True

    def __contains__(self, image_id: str) -> bool:
        return os.path.exists(os.path.join(self.path, events.image_id(image_id)))

    def prune(self, now: float | None = None) -> int:
        """Forget deletions older than the memory; return how many."""
        cutoff = (now or time.time()) - self.memory_seconds
        pruned = 0
        for entry in os.scandir(self.path):
            if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                os.unlink(entry.path)
                pruned += 1
        return pruned
