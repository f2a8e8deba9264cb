"""Copying one image file from a peer: the rsync command line, and running it.

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

import os
import signal
import subprocess
import threading

from oslo_log import log as logging

from glance_image_sync import events, libc

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


class TransferFailed(Exception):
    """rsync did not bring the file; the message says why, in rsync's words."""

    def __init__(self, message, disk_full=False):
        super().__init__(message)
        self.disk_full = disk_full


class TransferCancelled(TransferFailed):
    """The transfer was stopped because the process is shutting down."""


def ssh_command(settings) -> str:
    """rsync's ``-e``: ssh in batch mode, with our timeout and configuration."""
    ssh = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={settings.connect_timeout}"]
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


def rsync_argv(settings, node: str, image_id: str, dest: str) -> list:
    """The rsync command that copies ``image_id`` from ``node`` into ``dest``."""
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
    argv += ["--", f"{settings.user}@{node}:{settings.remote_datadir}/{image_id}", dest]
    return argv


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
                             disk_full="No space left on device" in text)
    return stdout.decode("utf-8", "replace")


class Rsync:
    """Runs transfers; ``cancel_all`` stops every running one at once."""

    def __init__(self, settings):
        self.settings = settings
        self._running = set()
        self._lock = threading.Lock()
        self._cancelled = False

    def fetch(self, node: str, image_id: str, dest: str) -> None:
        """Copy the image from ``node`` into the existing file ``dest``."""
        run_rsync(rsync_argv(self.settings, node, image_id, dest), f"rsync from {node}",
                  self.settings.total_timeout, register=self._register,
                  unregister=self._unregister)
        if self._cancelled:
            raise TransferCancelled("shutting down")

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
        for proc in running:
            _kill_group(proc)


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
