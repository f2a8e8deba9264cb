"""What the trash records of each image it holds: ``<id>.json`` beside the file.

::

    {"version": 1, "image_id": "...", "trashed_at": 1700000000.5,
     "size": 4194304, "md5": "..." or null, "md5_from": "verified" or "notification" or null,
     "file": [dev, ino, size, mtime_ns],
     "event_type": "image.delete", "message_id": "...", "publisher": "image.node1",
     "source": "node1", "by": "the sync worker"}

``md5`` is this node's own verification of that very version of the file when
one is known (no read at delete time), else the md5 the delete notification
gave for a file of that size, else unknown (a restore then checks the size
only, and says so). ``file`` is what a rename keeps of the file's identity: a
record whose ``file`` is not the trashed file's describes another (older) one
and is not trusted.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace

from oslo_log import log as logging

from glance_image_sync import events
from glance_image_sync.exceptions import Rejected

LOG = logging.getLogger(__name__)

RECORD_SUFFIX = ".json"
VERSION = 1


@dataclass(frozen=True)
class Cause:
    """Why an image is trashed: the event, as it came, and what it said of the file."""

    event_type: str = ""
    message_id: str | None = None
    publisher: str | None = None
    source: str | None = None
    by: str = "the sync worker"
    size: int | None = None  # what the event said
    md5: str | None = None


@dataclass(frozen=True)
class Trashed:
    """One image in the trash, as recorded when it was trashed."""

    image_id: str
    trashed_at: float
    size: int
    md5: str | None = None
    md5_from: str | None = None  # "verified", "notification", or None: unknown
    file: tuple | None = None  # (dev, ino, size, mtime_ns) of the trashed file
    event_type: str = ""
    message_id: str | None = None
    publisher: str | None = None
    source: str | None = None
    by: str = ""

    def to_doc(self) -> dict:
        return {"version": VERSION, **asdict(self),
                "file": list(self.file) if self.file else None}

    @classmethod
    def from_doc(cls, doc: dict) -> Trashed:
        """A record read back; ValueError for anything but a version 1 record."""
        if not isinstance(doc, dict) or doc.get("version") != VERSION:
            raise ValueError("not a version 1 trash record")
        try:
            md5 = doc.get("md5")
            return cls(
                image_id=events.image_id(doc.get("image_id")),
                trashed_at=float(doc["trashed_at"]),
                size=events.size(doc.get("size")),
                md5=None if md5 is None else events.checksum(md5),
                md5_from=doc.get("md5_from") if md5 is not None else None,
                file=tuple(int(n) for n in doc["file"]) if doc.get("file") else None,
                event_type=_text(doc.get("event_type")) or "",
                by=_text(doc.get("by")) or "",
                **{name: _text(doc.get(name)) for name in ("message_id", "publisher", "source")})
        except (KeyError, TypeError, Rejected) as exc:
            raise ValueError(str(exc)) from None


def _text(value) -> str | None:
    return value[:255] if isinstance(value, str) else None


def trashed_version(st) -> tuple:
    """What a rename keeps of a file's identity (its inode's change time moves)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def md5_source(entry: Trashed) -> str:
    return {"verified": "verified by this node",
            "notification": "as the delete notification gave it"}.get(entry.md5_from, "unknown")


def describe_cause(entry: Trashed) -> str:
    """``trashed <when> by image.delete (message m, published by image.node1), applied by
    the sync worker``: when, and what asked for it, as recorded."""
    when = time.strftime("%Y-%m-%d %H:%M:%S%z", time.localtime(entry.trashed_at))
    if not (entry.event_type or entry.by):
        return f"trashed {when} (no record of why)"
    details = [text for text in (
        f"message {entry.message_id}" if entry.message_id else "",
        f"published by {entry.publisher}" if entry.publisher else "",
        f"source {entry.source}" if entry.source and not entry.publisher else "") if text]
    return (f"trashed {when} by {entry.event_type or 'an event'}"
            + (f" ({', '.join(details)})" if details else "")
            + (f", applied by {entry.by}" if entry.by else ""))


def describe_md5(entry: Trashed) -> str:
    """The recorded md5 and where it came from, in words."""
    return f"{entry.md5} ({md5_source(entry)})" if entry.md5 else "unknown"


def load_record(trash_fd: int, name: str) -> Trashed | None:
    try:
        fd = os.open(name + RECORD_SUFFIX, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=trash_fd)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            doc = json.loads(f.read(64 * 1024).decode("utf-8"))
        record = Trashed.from_doc(doc)
    except (OSError, ValueError) as exc:
        LOG.warning("trash record %s%s is unreadable: %s", name, RECORD_SUFFIX, exc)
        return None
    return record if record.image_id == name else replace(record, file=None)
