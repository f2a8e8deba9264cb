"""The images this node put back from its trash: an audit trail, and what the metrics count.

``<state_dir>/restored.log`` holds one JSON document per line::

    {"time": 1700000000.5, "image_id": "...", "by": "restore", "size": 4194304,
     "md5": "...", "trashed_at": 1699990000.1, "event_type": "image.delete",
     "publisher": "image.node1"}

Each line is appended with one write to a file opened ``O_APPEND`` (lines of
two processes never interleave) and fsynced. ``restore`` and ``reconcile`` are
processes of their own, without metrics of their own: the daemon's (or a cron
run's) metrics count the lines here (``glance_image_sync_restores_total``), so
every restore is counted where Prometheus looks. Never pruned: a line is a
hundred bytes or so, and a restore is rare.
"""

from __future__ import annotations

import json
import os

FILE_NAME = "restored.log"


def path_in(state_dir: str) -> str:
    return os.path.join(state_dir, FILE_NAME)


def append(state_dir: str, doc: dict) -> None:
    line = (json.dumps(doc, sort_keys=True) + "\n").encode()
    fd = os.open(path_in(state_dir), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                 | os.O_CLOEXEC, 0o644)
    try:
        if os.geteuid() == 0:  # a restore as root: the daemon's user may append later
            owner = os.stat(state_dir)
            if os.fstat(fd).st_uid != owner.st_uid:
                os.fchown(fd, owner.st_uid, owner.st_gid)
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def count(state_dir: str) -> int:
    """How many restores were logged; 0 before the first. OSError if unreadable."""
    try:
        with open(path_in(state_dir), "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 16), b""))
    except FileNotFoundError:
        return 0
