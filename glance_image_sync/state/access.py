"""Can this process write where it must? Checked once, at start-up.

A ``state_dir`` left owned by root after one run as root, or an image store
the daemon's user cannot write, would otherwise fail on every event (with a
traceback naming only a relative temporary name, retried ``max_attempts``
times). ``check`` finds it before anything starts and raises ``ConfigError``
with the path, its owner and mode, and the user the tool runs as.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat

from glance_image_sync.exceptions import ConfigError

# What the daemon and cron runs write in state_dir, besides new files in it.
STATE_FILES = ("lock", "deleted")


def _name(lookup, ident: int) -> str:
    try:
        return lookup(ident)[0]
    except KeyError:
        return str(ident)


def running_as() -> str:
    uid = os.geteuid()
    return f"{_name(pwd.getpwuid, uid)} (uid {uid})"


def describe(path: str) -> str:
    """``/x is owned by root:root, mode 0750``."""
    st = os.stat(path)
    return (f"{path} is owned by {_name(pwd.getpwuid, st.st_uid)}:"
            f"{_name(grp.getgrgid, st.st_gid)}, mode {stat.S_IMODE(st.st_mode):04o}")


def _writable(path: str) -> bool:
    mode = os.W_OK | (os.X_OK if os.path.isdir(path) else 0)
    return os.access(path, mode, effective_ids=os.access in os.supports_effective_ids)


def _refuse(what: str, path: str, fix: str) -> ConfigError:
    return ConfigError(f"{what}: {describe(path)}; glance-image-sync runs as {running_as()} "
                       f"and cannot write there ({fix})")


def check_state_dir(state_dir: str) -> None:
    """ConfigError unless ``state_dir`` (or its parent, to create it) and the lock and
    tombstones in it are writable by this process."""
    fix = f"chown -R the user that runs it: {state_dir}, or run it as that directory's owner"
    if not os.path.exists(state_dir):
        parent = os.path.dirname(state_dir) or "/"
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not _writable(parent):
            raise _refuse(f"state_dir {state_dir} does not exist and cannot be created",
                          parent, f"create {state_dir} for the user that runs it")
        return
    if not os.path.isdir(state_dir):
        raise ConfigError(f"state_dir {state_dir} is not a directory")
    for path in (state_dir, *(os.path.join(state_dir, name) for name in STATE_FILES)):
        if os.path.exists(path) and not _writable(path):
            raise _refuse("state_dir", path, fix)


def check_store(datadir: str) -> None:
    """ConfigError unless this process can create, rename and remove files in the store."""
    if not os.path.isdir(datadir):
        raise ConfigError(f"filesystem_store_datadir {datadir} is not a directory")
    if not _writable(datadir):
        raise _refuse("filesystem_store_datadir", datadir,
                      "run it as the store's owner, Glance's user")
