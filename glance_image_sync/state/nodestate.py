"""This node's last successful sync and last error, kept on disk for ``status``.

The sync worker (of the daemon or of a cron run) records the outcome of every
event it applies; ``glance-image-sync status``, a separate process, reads it.
The record is ``<state_dir>/status.json``::

    {"version": 1,
     "last_success": {"time": 1700000000.5, "image_id": "...", "detail": "installed from node1"},
     "last_error": null}

It is replaced atomically: written to a temporary file in the same directory,
fsynced, then renamed over the old one, so a reader sees the old record or the
new one, never part of one, even across a crash. Each run starts from what the
previous one recorded, so a cron run that applies nothing keeps the old times.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass

from glance_image_sync.exceptions import NodeStateError

FILE_NAME = "status.json"
VERSION = 1
_DETAIL_LIMIT = 500


@dataclass(frozen=True)
class Record:
    time: float  # seconds since the epoch
    image_id: str
    detail: str


@dataclass(frozen=True)
class Snapshot:
    last_success: Record | None = None
    last_error: Record | None = None


def path_in(state_dir: str) -> str:
    return os.path.join(state_dir, FILE_NAME)


def load(state_dir: str) -> Snapshot:
    """What was recorded in ``state_dir``: an empty Snapshot when nothing was yet."""
    try:
        with open(path_in(state_dir), "rb") as f:
            raw = f.read(64 * 1024)
    except FileNotFoundError:
        return Snapshot()
    except OSError as exc:
        raise NodeStateError(f"cannot read {path_in(state_dir)}: {exc.strerror}") from None
    try:
        doc = json.loads(raw.decode("utf-8"))
        if not isinstance(doc, dict) or doc.get("version") != VERSION:
            raise ValueError("not a version 1 record")
        return Snapshot(_record(doc.get("last_success")), _record(doc.get("last_error")))
    except (ValueError, TypeError, KeyError) as exc:
        raise NodeStateError(f"{path_in(state_dir)} is not a status record: {exc}") from None


def _now(when: float | None) -> float:
    return time.time() if when is None else when


def _record(value) -> Record | None:
    if value is None:
        return None
    return Record(time=float(value["time"]), image_id=str(value["image_id"]),
                  detail=str(value["detail"]))


class NodeState:
    """Records outcomes into ``<state_dir>/status.json``; safe from any thread."""

    def __init__(self, state_dir: str):
        self.state_dir = state_dir
        self._lock = threading.Lock()
        try:
            self._snapshot = load(state_dir)
        except NodeStateError:
            # A damaged record only loses history; the next outcome replaces it.
            self._snapshot = Snapshot()

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def record_success(self, image_id: str, detail: str, when: float | None = None) -> None:
        self._update(last_success=Record(_now(when), image_id, detail[:_DETAIL_LIMIT]))

    def record_error(self, image_id: str, detail: str, when: float | None = None) -> None:
        self._update(last_error=Record(_now(when), image_id, detail[:_DETAIL_LIMIT]))

    def _update(self, **changes) -> None:
        with self._lock:
            current = self._snapshot
            self._snapshot = Snapshot(changes.get("last_success", current.last_success),
                                      changes.get("last_error", current.last_error))
            self._write(self._snapshot)

    def _write(self, snapshot: Snapshot) -> None:
        doc = {
            "version": VERSION,
            "last_success": asdict(snapshot.last_success) if snapshot.last_success else None,
            "last_error": asdict(snapshot.last_error) if snapshot.last_error else None,
        }
        fd, temp = tempfile.mkstemp(prefix=f".{FILE_NAME}.", dir=self.state_dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(doc, f, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(temp, 0o644)  # mkstemp's 0600 would hide it from a non-root status
            os.rename(temp, path_in(self.state_dir))
            temp = None
            dir_fd = os.open(self.state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        finally:
            if temp is not None:
                os.unlink(temp)
