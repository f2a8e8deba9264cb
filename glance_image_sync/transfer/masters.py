"""ssh's kept connections to peers (ControlMaster): closed when the tool ends.

With ``ssh_control_persist``, the first ssh to a peer becomes that peer's
connection master and detaches: it is no child of ours (rsync's process
group does not hold it) and would live on for ``ssh_control_persist``
seconds after the process that started it, holding an authenticated
session to the peer, through which a key revoked there keeps working; under
systemd, the unit's stop would SIGKILL it. So every process that transfers
closes the masters in its ``control_dir`` when it ends (and the daemon and
cron runs, at start, those a killed predecessor left).

``ssh -O stop``, not ``-O exit``: the sockets in ``state_dir`` are shared by
every process of this node that uses it, the daemon or a cron run and a
``reconcile`` beside it. A stopped master removes its socket at once, takes
no new session, and exits as soon as the sessions it serves have ended: ours
were killed before this is called, another process's transfer is not cut
off. ``close_all`` waits (``EXIT_WAIT``) for each master to exit, so that
nothing of ours is left for systemd to kill.

Every ssh here gets an argument list, the transfers' ``-F`` file, the
minimal environment, stdin from /dev/null and a timeout.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import time

from oslo_log import log as logging

from glance_image_sync.transfer.environ import subprocess_env
from glance_image_sync.transfer.rsync import control_path

LOG = logging.getLogger(__name__)

# ControlPath is "<control_dir>/ssh-%C", and %C is a SHA-1 in hex; ssh binds
# "<that>.<random>" first, which is not a master yet.
MASTER_NAME_RE = re.compile(r"ssh-[0-9a-f]{40}")
_PID_RE = re.compile(r"Master running \(pid=(\d+)\)")
# Seconds for one `ssh -O` (it only talks to a local socket).
CONTROL_TIMEOUT = 10
# Seconds to wait for stopped masters to exit.
EXIT_WAIT = 5.0


def close_all(settings) -> int:
    """Stop every ssh master in ``settings.control_dir``; the number stopped.

    Returns once each has exited, or after EXIT_WAIT seconds when one still
    serves a session of another process (it exits when that ends). Stale
    sockets, whose master is gone, are removed. Never raises for ssh's sake.
    """
    if not settings.control_dir:
        return 0
    try:
        names = sorted(os.listdir(settings.control_dir))
    except OSError:
        return 0
    stopped = {}
    for name in names:
        if not MASTER_NAME_RE.fullmatch(name):
            continue
        path = os.path.join(settings.control_dir, name)
        pid = master_pid(settings, path)
        if pid is None:
            _remove_if_stale(path)
        elif _control(settings, path, "stop").returncode == 0:
            stopped[pid] = path
    deadline = time.monotonic() + EXIT_WAIT
    while any(_alive(pid) for pid in stopped) and time.monotonic() < deadline:
        time.sleep(0.01)
    for pid, path in stopped.items():
        if _alive(pid):
            LOG.info("ssh connection %s (pid %d) still serves a session of another process; "
                     "it closes when that ends", path, pid)
    if stopped:
        LOG.debug("closed %d ssh connection(s) to peers", len(stopped))
    return len(stopped)


def close_master(settings, node: str) -> bool:
    """Retire the kept ssh connection to ``node``, if any; True if one was there.

    ``doctor`` does it before it checks a peer: a kept connection was
    authenticated when it was opened, and would hide a key revoked since. A
    transfer running beside it through that connection is not cut off (``-O
    stop``); the next one logs in afresh.
    """
    if not settings.control_dir:
        return False
    # ssh expands %C from the host as the transfers name it.
    return _control(settings, control_path(settings), "stop",
                    host=f"{settings.user}@{node}").returncode == 0


def master_pid(settings, path: str) -> int | None:
    """The pid of the master listening on ``path``, or None if none answers."""
    result = _control(settings, path, "check")
    match = _PID_RE.search(result.stderr)
    return int(match.group(1)) if result.returncode == 0 and match else None


def control_argv(settings, path: str, command: str, host: str | None = None) -> list:
    """``ssh -O <command>`` for the master at ``path``.

    With a path as it is (no %C to expand), the host operand only fills ssh's
    syntax; ``-F`` is the transfers' own, so nothing from another ssh
    configuration applies.
    """
    argv = ["ssh", "-o", "BatchMode=yes", "-o", f"ControlPath={path}", "-O", command]
    if settings.ssh_config_file:
        argv += ["-F", settings.ssh_config_file]
    return [*argv, "--", host or f"{settings.user}@glance-image-sync-peer"]


def _control(settings, path: str, command: str, host=None) -> subprocess.CompletedProcess:
    argv = control_argv(settings, path, command, host)
    try:
        return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              env=subprocess_env(), timeout=CONTROL_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        LOG.warning("ssh -O %s %s failed: %s", command, path, exc)
        return subprocess.CompletedProcess(argv, 255, "", str(exc))


def _remove_if_stale(path: str) -> None:
    """Remove a socket nobody listens on (its master was killed)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            pass
        except OSError:
            return
        else:
            return  # someone listens: not ours to remove
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
        LOG.info("removed %s, the socket of an ssh connection that was killed", path)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its reaper has ended)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return fields[0] != b"Z"
