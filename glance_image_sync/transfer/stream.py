"""Streaming an image from a peer that may still be receiving it (the relay).

The peer's ``glance-image-sync serve`` (its key's forced command) writes the
image's bytes to ssh's stdout, which goes straight into our temporary copy;
the store computes the md5 behind it as for rsync. ssh is the one the rsync
transfers use (batch mode, our ciphers, the shared connection to the peer).
The peer ends with success only once its own copy is verified and installed,
and then names the file's mode, which the copy gets as rsync would give it.
"""

from __future__ import annotations

import os
import re
import shlex

from glance_image_sync import events
from glance_image_sync.exceptions import TransferFailed
from glance_image_sync.transfer import serve
from glance_image_sync.transfer.rsync import run_rsync, ssh_argv

_MODE_RE = re.compile(re.escape(serve.MODE_PREFIX) + r"(0[0-7]{3})$", re.MULTILINE)
# What the peer's exit status says, for the log.
REASONS = {
    serve.ABANDONED: "its copy was abandoned",
    serve.NOT_HERE: "it has no copy",
    serve.STALLED: "its copy stopped growing",
    serve.USAGE: "it does not serve streams (is its key's forced command "
                 "'glance-image-sync serve'?)",
}


def stream_argv(settings, node: str, image_id: str, size: int, wait: int) -> list:
    """ssh to ``node`` asking its ``serve`` for the image's ``size`` bytes."""
    request = ["glance-image-sync", "serve", "--store", settings.remote_datadir, "stream",
               events.image_id(image_id), str(int(size)), str(int(wait)),
               str(settings.io_timeout), str(settings.bwlimit)]
    return [*ssh_argv(settings), "--", f"{settings.user}@{node}", shlex.join(request)]


def stream_into(settings, node: str, image_id: str, dest: str, size: int, wait: int,
                register=None, unregister=None) -> None:
    """Write the image from ``node`` into the existing file ``dest``; TransferFailed if not."""
    what = f"stream from {node}"
    with open(dest, "r+b", buffering=0) as out:
        try:
            said = run_rsync(stream_argv(settings, node, image_id, size, wait), what,
                             settings.total_timeout, register=register,
                             unregister=unregister, stdout=out)
        except TransferFailed as failure:
            reason = REASONS.get(failure.returncode)
            if reason is None:
                raise
            raise TransferFailed(f"{what}: {reason}", what=what,
                                 returncode=failure.returncode,
                                 stderr=failure.stderr) from None
    mode = _MODE_RE.search(said)
    if mode is None:
        raise TransferFailed(f"{what}: the peer did not say its copy was installed")
    os.chmod(dest, int(mode.group(1), 8))
