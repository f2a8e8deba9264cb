"""Copying image files from a peer: the rsync command line, and running it.

An image asked for while its peer is busy waits for the next session with the
others asked for meanwhile, so that a node catching up on many images pays an
rsync and ssh start-up per few GiB rather than per image (``Rsync``).

rsync gets an argument list (never a shell), ``--`` before its operands, a
minimal environment, an I/O timeout of its own and an overall one of ours.
The remote side is ``<rsync_user>@<node>:<datadir>/<image id>``, reached with
ssh in batch mode (no prompts; host keys checked as ssh is configured, for
example pinned in ``ssh_config_file``).

Choices made for speed (bench/): no ``-z`` (disk images compress poorly and
it costs CPU), ``--whole-file`` (the destination is a new empty file, there is
no basis to diff against), and rsync's own transfer checksum (xxh128 on
current rsync) rather than ``--checksum-choice=md5``: with md5 both ends hash
the whole image, and the sender once per peer; the md5 Glance's checksum is
compared with is computed here instead, on the receiving side only, while the
bytes arrive (store.Md5Follower).

``--perms`` carries the source's mode over; rsync applies it only once the
whole file is in, so until then the copy keeps the 0600 it was created with.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import secrets
import signal
import subprocess
import threading

from oslo_log import log as logging

from glance_image_sync import events
from glance_image_sync.exceptions import TransferCancelled, TransferFailed
from glance_image_sync.store import libc
from glance_image_sync.store.images import TEMP_PREFIX

LOG = logging.getLogger(__name__)

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


_PR_SET_PDEATHSIG = 1
_prctl = libc.function("prctl")


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL it if the daemon dies.

    Without this, rsync outlives a daemon that is killed (it runs in a session
    of its own) and may write a temporary file after the restarted daemon
    cleaned up. Resolved at import time: the child must not import or lock.
    """
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def ssh_command(settings) -> str:
    """rsync's ``-e``: ssh in batch mode, with our timeout and configuration."""
    ssh = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={settings.connect_timeout}"]
    if settings.ciphers:
        ssh += ["-o", f"Ciphers={settings.ciphers}"]
    if settings.control_dir:
        # One connection per peer, kept for control_persist seconds after its
        # last transfer: no handshake (and no sshd start) per image. A peer that
        # dies is noticed by its keepalives within 15 s.
        ssh += ["-o", "ControlMaster=auto",
                "-o", f"ControlPath={settings.control_dir}/ssh-%C",
                "-o", f"ControlPersist={settings.control_persist}",
                "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]
    if settings.ssh_config_file:
        ssh += ["-F", settings.ssh_config_file]
    return " ".join(ssh)


def rsync_argv(settings, node: str, image_ids, dest: str) -> list:
    """The rsync command that copies ``image_ids`` (one id, or a list) from ``node``.

    One id: into the file ``dest``. Several: into the directory ``dest``, each
    under its own id, all in one session (one ssh channel, one rsync on each end).
    """
    ids = [image_ids] if isinstance(image_ids, str) else list(image_ids)
    for image_id in ids:
        events.image_id(image_id)
    argv = [
        "rsync",
        "--whole-file",
        "--ignore-times",
        "--inplace",
        "--perms",
        f"--timeout={settings.io_timeout}",
        "-e", ssh_command(settings),
    ]
    if settings.bwlimit:
        argv.append(f"--bwlimit={settings.bwlimit}")
    argv += ["--", *(remote_path(settings, node, image_id) for image_id in ids), dest]
    return argv


def remote_path(settings, node: str, image_id: str = "") -> str:
    """rsync's operand for a peer's store (``image_id`` empty) or one image in it."""
    if image_id:
        events.image_id(image_id)
    return f"{settings.user}@{node}:{settings.remote_datadir}/{image_id}"


def subprocess_env() -> dict:
    """A minimal environment: ssh needs HOME for its keys and known hosts."""
    env = {"PATH": SAFE_PATH, "LC_ALL": "C"}
    if "HOME" in os.environ:
        env["HOME"] = os.environ["HOME"]
    return env


def run_rsync(argv: list, what: str, timeout: int, register=None, unregister=None) -> str:
    """Run one rsync (and the ssh under it); its stdout, or TransferFailed.

    The one place the package starts a program: an argument list, stdin from
    /dev/null, the minimal environment, a session of its own (so rsync and
    its ssh are killed together) that dies with us, and ``timeout`` seconds in
    all. ``what`` names the transfer in errors ("rsync from node1").
    ``register(proc)`` may refuse to let it run by raising (it is killed).
    """
    LOG.debug("running %s", argv)
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=subprocess_env(), close_fds=True, start_new_session=True,
        preexec_fn=_die_with_parent,  # takes no locks: see there
    )
    try:
        if register is not None:
            register(proc)
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        proc.communicate()
        raise TransferFailed(f"{what} took over {timeout} s; killed") from None
    except BaseException:
        _kill_group(proc)
        proc.communicate()
        raise
    finally:
        if unregister is not None:
            unregister(proc)
    text = stderr.decode("utf-8", "replace")
    if proc.returncode != 0:
        raise TransferFailed(f"{what} exited {proc.returncode}: {_first_line(text)}",
                             disk_full="No space left on device" in text, what=what,
                             returncode=proc.returncode, stderr=text)
    return stdout.decode("utf-8", "replace")


# ssh binds "<ControlPath>.<16 random characters>" first, and a Unix socket's
# path has room for 107 bytes: "/ssh-" and a 40-character hash leave this.
CONTROL_DIR_MAX = 107 - len("/ssh-") - 40 - 17

# rsync sessions that run at once from one peer; images asked for while they
# run wait, together, for the next one.
SESSIONS_PER_PEER = 2
# A session carries at most this many images, and this many bytes unless it is
# one image: each image is installed only once its whole session has ended.
BATCH_IMAGES = 16
BATCH_BYTES = 1024 ** 3
# rsync's exit codes for "some files were not transferred": the others were.
_PARTIAL = (23, 24)


def usable(settings):
    """``settings``, without connection reuse if ssh could not create its sockets."""
    if settings.control_dir and len(settings.control_dir) > CONTROL_DIR_MAX:
        LOG.warning("ssh connections are not reused: state_dir %s is %d characters long, and "
                    "ssh's sockets there need one of at most %d; choose a shorter state_dir "
                    "(or set ssh_control_persist = 0 to silence this)", settings.control_dir,
                    len(settings.control_dir), CONTROL_DIR_MAX)
        return dataclasses.replace(settings, control_dir=None)
    return settings


class _Batch:
    """Images to copy from one peer in one rsync session, and how each one went."""

    def __init__(self, node):
        self.node = node
        self.wanted = {}  # image id -> destination file
        self.size = 0
        self.failures = {}  # image id -> TransferFailed
        self.done = threading.Event()

    @classmethod
    def of(cls, node, wanted, parent):
        """A batch of some of ``parent``'s images, whose failures are ``parent``'s."""
        batch = cls(node)
        batch.wanted = wanted
        batch.failures = parent.failures
        return batch

    def takes(self, size: int) -> bool:
        return len(self.wanted) < BATCH_IMAGES and self.size + size <= BATCH_BYTES


class Rsync:
    """Runs transfers; ``cancel_all`` stops every running one at once.

    While a peer already serves SESSIONS_PER_PEER sessions, the images asked of
    it wait and then travel together, in one session: under a backlog, each
    rsync and ssh start-up is shared by many images; an image asked for alone
    starts at once.
    """

    def __init__(self, settings):
        self.settings = usable(settings)
        self._running = set()
        self._lock = threading.Condition()
        self._cancelled = False
        self._sessions = collections.Counter()  # node -> sessions running
        self._waiting = {}  # node -> the batch that has not started yet

    def fetch(self, node: str, image_id: str, dest: str, size: int = 0) -> None:
        """Copy the image from ``node`` into the existing file ``dest``."""
        events.image_id(image_id)  # here, so that a bad id fails alone, not its batch
        with self._lock:
            batch = self._waiting.get(node)
            leader = batch is None or not batch.takes(size)
            if leader:
                batch = self._waiting[node] = _Batch(node)
            batch.wanted[image_id] = dest
            batch.size += size
            if leader:  # wait for a session, while others join
                while self._sessions[node] >= SESSIONS_PER_PEER and not self._cancelled:
                    self._lock.wait()
                if self._waiting.get(node) is batch:
                    del self._waiting[node]
                self._sessions[node] += 1
        if leader:
            try:
                self._run(batch)
            finally:
                with self._lock:
                    self._sessions[node] -= 1
                    self._lock.notify_all()
                batch.done.set()
        else:
            batch.done.wait()
        if image_id in batch.failures:
            raise batch.failures[image_id]
        if self._cancelled:
            raise TransferCancelled("shutting down")

    def _run(self, batch) -> None:
        """One rsync session for the batch; its failures, per image, in ``batch.failures``."""
        ids = list(batch.wanted)
        what = f"rsync from {batch.node}"
        try:
            if len(ids) == 1:
                self._rsync(batch.node, ids[0], batch.wanted[ids[0]], len(ids))
                return
            try:
                staging = _make_staging(batch.wanted)
            except OSError as exc:  # no hard links here: one session per image
                LOG.warning("%s: cannot link the copies into a staging directory (%s); one "
                            "session per image", what, exc.strerror)
                for image_id in ids:
                    self._run(_Batch.of(batch.node, {image_id: batch.wanted[image_id]}, batch))
                return
            try:
                LOG.info("%s: %d images in one session", what, len(ids))
                self._rsync(batch.node, ids, staging + "/", len(ids))
            finally:
                _remove_staging(staging, batch.wanted)
        except TransferFailed as failure:
            for image_id in ids:
                failed = _failure_of(failure, image_id, len(ids))
                if failed is not None:
                    batch.failures[image_id] = failed
        except Exception as exc:  # noqa: BLE001 - each image's install reports it
            LOG.exception("%s: unexpected error", what)
            for image_id in ids:
                batch.failures[image_id] = TransferFailed(f"{what}: unexpected error: {exc}")

    def _rsync(self, node, image_ids, dest, images) -> None:
        run_rsync(rsync_argv(self.settings, node, image_ids, dest), f"rsync from {node}",
                  self.settings.total_timeout * images, register=self._register,
                  unregister=self._unregister)

    def _register(self, proc) -> None:
        with self._lock:
            if self._cancelled:
                raise TransferCancelled("shutting down")
            self._running.add(proc)

    def _unregister(self, proc) -> None:
        with self._lock:
            self._running.discard(proc)

    @property
    def running(self) -> int:
        with self._lock:
            return len(self._running)

    def cancel_all(self) -> None:
        with self._lock:
            self._cancelled = True
            running = list(self._running)
            self._lock.notify_all()
        for proc in running:
            _kill_group(proc)


def _make_staging(wanted: dict) -> str:
    """A directory beside the destinations, in which each is linked under its image id.

    rsync puts several files into one directory under their own names; the
    links make those the destination files themselves (``--inplace`` writes
    into the file it finds). Named like the store's temporaries, so a directory
    left by a killed run is removed at the next start.
    """
    parent = os.path.dirname(next(iter(wanted.values())))
    staging = os.path.join(parent, f"{TEMP_PREFIX}batch.{secrets.token_hex(4)}")
    os.mkdir(staging, 0o700)
    try:
        for image_id, dest in wanted.items():
            os.link(dest, os.path.join(staging, image_id))
    except OSError:
        _remove_staging(staging, wanted)
        raise
    return staging


def _remove_staging(staging: str, wanted: dict) -> None:
    for image_id in wanted:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(staging, image_id))
    os.rmdir(staging)


def _failure_of(failure: TransferFailed, image_id: str, images: int) -> TransferFailed | None:
    """What a session's failure means for one of its images.

    rsync goes on with the other files when one cannot be read and ends with
    23 or 24: an image it names failed, the others came (and are verified like
    any copy). Any other failure, such as no connection, is every image's.
    """
    if images == 1 or failure.returncode not in _PARTIAL:  # a cancelled one has none
        return failure
    named = [line for line in failure.stderr.splitlines() if image_id in line]
    if named:
        return TransferFailed(f"{failure.what} exited {failure.returncode}: "
                              f"{_first_line(named[0])}", disk_full=failure.disk_full)
    return None


def _kill_group(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _first_line(text: str) -> str:
    """rsync and ssh name the cause first; what follows is its consequences.

    ssh frames its gravest warning, a peer's host key that has changed, in lines of ``@``:
    the frame is dropped, so the log says what happened rather than ``@@@@``.
    """
    lines = [line.strip().strip("@").strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    return lines[0][:500] if lines else "no message"
