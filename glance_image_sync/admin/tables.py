"""How the operator commands put things in words: tables, counts, times."""

from __future__ import annotations

import time


def table(rows, right=()) -> list:
    """``rows`` (the header first) as lines of aligned columns, two spaces apart.

    Columns whose index is in ``right`` are aligned right (numbers); the last
    column is never padded, so no line ends in spaces.
    """
    rows = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            if i in right:
                cells.append(cell.rjust(widths[i]))
            elif i == len(row) - 1:
                cells.append(cell)
            else:
                cells.append(cell.ljust(widths[i]))
        lines.append("  ".join(cells))
    return lines


def plural(count: int, word: str) -> str:
    """``1 event``, ``2 events``."""
    return f"{count} {word}{'' if count == 1 else 's'}"


def agree(count: int, singular: str, plural_form: str) -> str:
    """The verb that agrees with ``count``: ``agree(1, "waits", "wait")``."""
    return singular if count == 1 else plural_form


def iso(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S%z", time.localtime(when))


def span(seconds: float) -> str:
    """``3 h``: a length of time, in its largest whole unit."""
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


def ago(seconds: float) -> str:
    return f"{span(seconds)} ago"


def when(moment: float, now: float) -> str:
    """``2026-11-26 06:39:14+0000 (1 s ago)``."""
    return f"{iso(moment)} ({ago(now - moment)})"


def size_text(size: int) -> str:
    """``3.2 GiB``: a size in bytes, for a person."""
    if size < 1024:
        return f"{size} B"
    value = size / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
