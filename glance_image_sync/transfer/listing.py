"""What a peer's image store holds, seen through rsync: names, sizes, md5s.

Everything goes over the same ssh and rsync as the transfers (``rsync_user``,
``ssh_config_file``, the remote ``<datadir>/``), so a peer whose key only
allows rsync (rrsync) answers these too:

``list_store``
    ``rsync --list-only <user>@<node>:<datadir>/``: every regular file named
    like an image, with its size and mtime. Cheap: nothing is read.
``remote_md5``
    ``rsync --dry-run --checksum --checksum-choice=md5 --out-format='%C %l %n'``
    of one image into an empty directory: the peer's rsync reads the file and
    reports its md5; nothing is copied.

Argument lists, ``--`` before operands, rsync's own I/O timeout; the rest
(environment, overall timeout, killing) is transfer.run_rsync's.
"""

from __future__ import annotations

import re
import tempfile
import time
from dataclasses import dataclass

from glance_image_sync import events
from glance_image_sync.exceptions import Rejected, TransferFailed
from glance_image_sync.transfer.rsync import remote_path, run_rsync, ssh_command

# "-rw-r-----      4194304 2024/05/01 10:42:07 <name>" (with --no-human-readable)
_LIST_RE = re.compile(r"(?P<type>\S)\S{9}\s+(?P<size>\d+)\s+"
                      r"(?P<when>\d{4}/\d\d/\d\d \d\d:\d\d:\d\d)\s(?P<name>.+)")
_MD5_RE = re.compile(r"(?P<md5>[0-9a-f]{32}) (?P<size>\d+) (?P<name>\S+)")


@dataclass(frozen=True)
class Entry:
    size: int
    mtime: float  # seconds since the epoch, to the second


def list_argv(settings, node: str, form: str | None = None) -> list:
    """The listing of ``node``'s store, its path in ``form`` (default: as configured)."""
    return ["rsync", "--list-only", "--no-human-readable", f"--timeout={settings.io_timeout}",
            "-e", ssh_command(settings), "--", remote_path(settings, node, form=form)]


def md5_argv(settings, node: str, image_id: str, dest_dir: str) -> list:
    return ["rsync", "--dry-run", "--checksum", "--checksum-choice=md5",
            "--out-format=%C %l %n", f"--timeout={settings.io_timeout}",
            "-e", ssh_command(settings), "--",
            remote_path(settings, node, image_id), dest_dir + "/"]


def parse_listing(text: str) -> dict:
    """{image id: Entry} of the regular files named like images in a listing."""
    found = {}
    for line in text.splitlines():
        match = _LIST_RE.fullmatch(line)
        if not match or match.group("type") != "-":
            continue  # the directory itself, symlinks, anything unexpected
        try:
            image_id = events.image_id(match.group("name"))
        except Rejected:
            continue  # temporaries and foreign files are not images
        # rsync prints the mtime in this machine's local time.
        mtime = time.mktime(time.strptime(match.group("when"), "%Y/%m/%d %H:%M:%S"))
        found[image_id] = Entry(int(match.group("size")), mtime)
    return found


def parse_md5(text: str, image_id: str):
    """(size, md5) from the dry run's ``%C %l %n`` line for ``image_id``, or None."""
    for line in text.splitlines():
        match = _MD5_RE.fullmatch(line.strip())
        if match and match.group("name") == image_id:
            return int(match.group("size")), match.group("md5")
    return None


def list_store(settings, node: str) -> dict:
    """{image id: Entry} of ``node``'s store; TransferFailed if it cannot be listed."""
    return parse_listing(_run(list_argv(settings, node), settings, node))


def remote_md5(settings, node: str, image_id: str):
    """(size, md5) of ``node``'s copy, computed there; TransferFailed if it has none."""
    with tempfile.TemporaryDirectory(prefix="glance-image-sync-md5.") as empty:
        out = _run(md5_argv(settings, node, image_id, empty), settings, node)
    result = parse_md5(out, image_id)
    if result is None:
        raise TransferFailed(f"rsync on {node} reported no md5 for {image_id}")
    return result


def _run(argv, settings, node: str) -> str:
    return run_rsync(argv, f"rsync with {node}", settings.total_timeout)
