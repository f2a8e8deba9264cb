"""Copying image files from a peer: the rsync command line, and running it.

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
bytes arrive (store.checksum.Md5Follower).

``--perms`` carries the source's mode over; rsync applies it only once the
whole file is in, so until then the copy keeps the 0600 it was created with.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess

from oslo_log import log as logging

from glance_image_sync import events
from glance_image_sync.exceptions import TransferFailed
from glance_image_sync.store import libc
from glance_image_sync.transfer.environ import subprocess_env

LOG = logging.getLogger(__name__)


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


def ssh_argv(settings) -> list:
    """ssh in batch mode, with our timeout and configuration (no destination yet)."""
    ssh = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={settings.connect_timeout}"]
    if settings.ciphers:
        ssh += ["-o", f"Ciphers={settings.ciphers}"]
    if settings.control_dir:
        # One connection per peer, kept for control_persist seconds after its
        # last transfer: no handshake (and no sshd start) per image. A peer that
        # dies is noticed by its keepalives within 15 s.
        ssh += ["-o", "ControlMaster=auto",
                "-o", f"ControlPath={control_path(settings)}",
                "-o", f"ControlPersist={settings.control_persist}",
                "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]
    if settings.ssh_config_file:
        ssh += ["-F", settings.ssh_config_file]
    return ssh


def ssh_command(settings) -> str:
    """rsync's ``-e``: ``ssh_argv`` as one string (no element needs quoting)."""
    return " ".join(ssh_argv(settings))


def control_path(settings) -> str:
    """ssh's ControlPath for the kept connections (``%C``: one per peer and user)."""
    return f"{settings.control_dir}/ssh-%C"


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


def remote_path(settings, node: str, image_id: str = "", form: str | None = None) -> str:
    """rsync's operand for a peer's store (``image_id`` empty) or one image in it.

    ``form`` (default: ``settings.remote_paths``) ``absolute``:
    ``<user>@<node>:<datadir>/`` or ``<user>@<node>:<datadir>/<id>``;
    ``relative``: ``<user>@<node>:.`` or ``<user>@<node>:<id>``, relative to the
    directory the peer's rrsync restricts the key to (rrsync works from there).
    ``.`` rather than ``./``: rrsync without ``-absolute`` reduces ``./`` to an
    empty path and refuses it.
    """
    if image_id:
        events.image_id(image_id)
    if (form or settings.remote_paths) == "relative":
        return f"{settings.user}@{node}:{image_id or '.'}"
    return f"{settings.user}@{node}:{settings.remote_datadir}/{image_id}"


def run_rsync(argv: list, what: str, timeout: int, register=None, unregister=None,
              stdout=None) -> str:
    """Run one rsync (and the ssh under it), or an ssh; its stdout, or TransferFailed.

    With ``stdout`` (a file), the output goes there, and its stderr is returned.

    Where the package starts its transfers and doctor's checks: an argument
    list, stdin from /dev/null, the minimal environment, a session of its own
    (so rsync and its ssh are killed together) that dies with us, and
    ``timeout`` seconds in all. ``what`` names the transfer in errors ("rsync from node1").
    ``register(proc)`` may refuse to let it run by raising (it is killed).
    """
    LOG.debug("running %s", argv)
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=stdout or subprocess.PIPE, stderr=subprocess.PIPE,
        env=subprocess_env(), close_fds=True, start_new_session=True,
        preexec_fn=_die_with_parent,  # takes no locks: see there
    )
    try:
        if register is not None:
            register(proc)
        output, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        proc.communicate()
        raise TransferFailed(f"{what} took over {timeout} s; killed") from None
    except BaseException:
        kill_group(proc)
        proc.communicate()
        raise
    finally:
        if unregister is not None:
            unregister(proc)
    text = stderr.decode("utf-8", "replace")
    if proc.returncode != 0:
        raise TransferFailed(f"{what} exited {proc.returncode}: {first_line(text)}",
                             disk_full="No space left on device" in text, what=what,
                             returncode=proc.returncode, stderr=text)
    return text if stdout is not None else output.decode("utf-8", "replace")


# ssh binds "<ControlPath>.<16 random characters>" first, and a Unix socket's
# path has room for 107 bytes: "/ssh-" and a 40-character hash leave this.
CONTROL_DIR_MAX = 107 - len("/ssh-") - 40 - 17

def usable(settings):
    """``settings``, without connection reuse if ssh could not create its sockets."""
    if settings.control_dir and len(settings.control_dir) > CONTROL_DIR_MAX:
        LOG.warning("ssh connections are not reused: state_dir %s is %d characters long, and "
                    "ssh's sockets there need one of at most %d; choose a shorter state_dir "
                    "(or set ssh_control_persist = 0 to silence this)", settings.control_dir,
                    len(settings.control_dir), CONTROL_DIR_MAX)
        return dataclasses.replace(settings, control_dir=None)
    return settings


def kill_group(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def first_line(text: str) -> str:
    """rsync and ssh name the cause first; what follows is its consequences.

    ssh frames its gravest warning, a peer's host key that has changed, in lines of ``@``:
    the frame is dropped, so the log says what happened rather than ``@@@@``.
    """
    lines = [line.strip().strip("@").strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    return lines[0][:500] if lines else "no message"
