"""Every node this node's fan-out ever declared queues for, kept in ``<state_dir>/known_nodes``.

AMQP has no way to list queues, and a node removed from ``api_nodes`` leaves
its durable queues behind (nodes still on the old list keep filling them).
Remembering each name the fan-out declared queues for lets ``status`` look
for those queues and ``forget-node`` delete them. One host name per line;
replaced atomically; only names that pass ``normalize_hostname`` are kept.
"""

from __future__ import annotations

import os
import tempfile

from glance_image_sync.nodes import normalize_hostname

FILE_NAME = "known_nodes"


def path_in(state_dir: str) -> str:
    return os.path.join(state_dir, FILE_NAME)


def load(state_dir: str) -> tuple:
    """The remembered names, sorted; () when none (or the file cannot be read)."""
    try:
        with open(path_in(state_dir), encoding="ascii", errors="replace") as f:
            lines = f.read(1024 * 1024).splitlines()
    except OSError:
        return ()
    return tuple(sorted({name for name in map(normalize_hostname, lines) if name}))


def remember(state_dir: str, names) -> bool:
    """Add ``names``; True if the file changed. OSError if it cannot be written."""
    known = set(load(state_dir))
    wanted = known | {name for name in map(normalize_hostname, names) if name}
    if wanted == known:
        return False
    _write(state_dir, wanted)
    return True


def forget(state_dir: str, name: str) -> None:
    known = set(load(state_dir))
    if name in known:
        _write(state_dir, known - {name})


def _write(state_dir: str, names) -> None:
    fd, temp = tempfile.mkstemp(prefix=f".{FILE_NAME}.", dir=state_dir)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write("".join(f"{name}\n" for name in sorted(names)))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temp, 0o644)  # status runs as root or glance
        os.rename(temp, path_in(state_dir))
        temp = None
    finally:
        if temp is not None:
            os.unlink(temp)
