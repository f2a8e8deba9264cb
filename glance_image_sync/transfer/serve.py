"""``glance-image-sync serve``: what a peer's ssh key may run on this node.

Put in ``authorized_keys`` as the key's forced command (``glance-image-sync
ssh-keys`` prints the line)::

    command="glance-image-sync serve --store /var/lib/glance/images",restrict ssh-ed25519 ...

A peer asks for one of two things, read from ``SSH_ORIGINAL_COMMAND``:

``glance-image-sync serve stream <id> <size> <wait> <stall> <KiB/s>``
    the image's bytes on stdout, from the installed file or from a copy this
    node is still receiving (``store.arriving``), following it as it grows:
    the relay (``sync.sources``). Waits up to ``wait`` seconds for a copy to
    appear. Should the copy being read be abandoned, the stream goes on from
    the same offset in a newer one of the same image, if there is one. Ends,
    exit 0, only once all ``size`` bytes are sent and the copy is installed
    here (this node verified it), and then reports its mode on stderr;
    anything else is an exit status below, and the peer tries another source.
    ``KiB/s`` > 0 paces it (``rsync_bwlimit``).

anything else
    handed to rsync's ``rrsync -ro`` (``--absolute``: ``rrsync -ro -absolute``),
    restricted to reading the store.

Without a forced command (a key that may run anything), the request is this
command's own arguments. Loads no configuration and no library beyond the
standard one: it runs for every transfer a peer makes.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

from glance_image_sync.exceptions import Rejected
from glance_image_sync.store.arriving import ArrivingImages
from glance_image_sync.transfer.environ import subprocess_env

OK, USAGE, ABANDONED, NOT_HERE, STALLED = 0, 2, 3, 4, 5
MODE_PREFIX = "glance-image-sync serve: installed, mode "
POLL_SECONDS = 0.01
CHUNK = 4 * 1024 * 1024
MAX_WAIT = 600


def main(argv) -> int:
    parser = argparse.ArgumentParser(prog="glance-image-sync serve")
    parser.add_argument("--store", default="/var/lib/glance/images",
                        help="the image store peers may read (filesystem_store_datadir)")
    parser.add_argument("--absolute", action="store_true",
                        help="run rrsync with -absolute (rsync_remote_paths = absolute)")
    parser.add_argument("request", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    forced = os.environ.get("SSH_ORIGINAL_COMMAND")
    request = _stream_request(shlex.split(forced)) if forced is not None else args.request
    if forced is not None and request is None:
        rrsync = ["rrsync", "-ro", *(["-absolute"] if args.absolute else []), args.store]
        os.execvpe("rrsync", rrsync,  # noqa: S606 - an argument list, reviewed (KNOWN)
                   {**subprocess_env(), "SSH_ORIGINAL_COMMAND": forced})
    return stream(args.store, request or [])


def stream(store: str, request, out_fd: int = 1) -> int:
    """Answers ``request`` (``stream <id> <size> <wait> <stall> <KiB/s>``) on ``out_fd``."""
    try:
        image_id, size, wait, stall, kibps = _parse(request)
    except ValueError as exc:
        print(f"glance-image-sync serve: {exc}", file=sys.stderr)
        return USAGE
    images = ArrivingImages(store)
    try:
        return Stream(images, image_id, size, stall, kibps, out_fd).run(wait)
    except BrokenPipeError:  # the peer went away
        return ABANDONED
    finally:
        images.close()


def _stream_request(words):
    """The words after ``stream`` in ``glance-image-sync serve ... stream ...``, else None."""
    if len(words) < 2 or os.path.basename(words[0]) != "glance-image-sync" \
            or words[1] != "serve" or "stream" not in words:
        return None
    return words[words.index("stream"):]


def _parse(request):
    if len(request) != 6 or request[0] != "stream":
        raise ValueError("expected: stream <image id> <size> <wait> <stall> <KiB/s>")
    try:
        numbers = [int(word) for word in request[2:]]
    except ValueError:
        raise ValueError("size, wait, stall and KiB/s are whole numbers") from None
    if min(numbers) < 0 or numbers[1] > MAX_WAIT or numbers[2] < 1:
        raise ValueError(f"out of range: wait 0-{MAX_WAIT} s, stall >= 1 s, others >= 0")
    try:
        from glance_image_sync import events

        image_id = events.image_id(request[1])
    except Rejected as exc:
        raise ValueError(exc.reason) from None
    return (image_id, *numbers)


class Stream:
    """Sends one image's ``size`` bytes to stdout as they arrive here."""

    def __init__(self, images, image_id, size, stall, kibps, out_fd=1):
        self.images = images
        self.image_id = image_id
        self.size = size
        self.stall = stall
        self.kibps = kibps
        self.out_fd = out_fd
        self.sent = 0

    def run(self, wait: float) -> int:
        deadline = time.monotonic() + wait
        copy = self.images.open(self.image_id)
        while copy is None:
            if time.monotonic() >= deadline:
                return _say(NOT_HERE, f"no copy of {self.image_id} here")
            time.sleep(POLL_SECONDS)
            copy = self.images.open(self.image_id)
        skipped = ()
        started = progress = time.monotonic()
        try:
            while True:
                available = min(os.fstat(copy.fd).st_size, self.size)
                if self.sent < available:
                    self._send(copy.fd, available, started)
                    progress = time.monotonic()
                    continue
                if copy.installed and available < self.size:
                    return _say(NOT_HERE, f"the copy here has {available} bytes, not "
                                f"{self.size}")
                if self.sent == self.size and self.images.now_installed(copy, self.image_id):
                    mode = os.fstat(copy.fd).st_mode & 0o777
                    return _say(OK, f"{MODE_PREFIX}{mode:04o}")
                if self.images.abandoned(copy):
                    skipped += (os.fstat(copy.fd).st_ino,)
                    newer = self.images.open(self.image_id, skip=skipped)
                    if newer is None:
                        return _say(ABANDONED, f"the copy of {self.image_id} being received "
                                    "here was abandoned")
                    os.close(copy.fd)
                    copy = newer
                    continue
                if time.monotonic() - progress > self.stall:
                    return _say(STALLED, f"the copy of {self.image_id} here has not grown "
                                f"for {self.stall} s")
                time.sleep(POLL_SECONDS)
        finally:
            os.close(copy.fd)

    def _send(self, fd: int, available: int, started: float) -> None:
        count = min(available - self.sent, CHUNK)
        if self.kibps:
            count = min(count, max(self.kibps * 1024 // 10, 1))
        self.sent += os.sendfile(self.out_fd, fd, self.sent, count)
        if self.kibps:
            ahead = self.sent / (self.kibps * 1024) - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)


def _say(code: int, line: str) -> int:
    print(line, file=sys.stderr)
    return code
