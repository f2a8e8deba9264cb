"""doctor's checks of this node: the image store, ``state_dir``, free space, the unit.

Permissions are tried, not computed: a file is created and removed in each
directory the tool writes to, as the user doctor runs as, so a read-only
mount, an ACL or a sandbox answers as it would answer the daemon. Run doctor
as the daemon's user (``sudo -u glance``) to check what the daemon can do;
as root, most of them pass whoever owns what.

Under systemd (``INVOCATION_ID`` or ``NOTIFY_SOCKET`` in the environment, or
``--unit``), the unit's sandbox is read with ``systemctl show``: with
``ProtectSystem=strict`` every directory the tool writes to must be in its
``ReadWritePaths`` (or ``StateDirectory``), or each install fails with
"Read-only file system".
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import subprocess

from glance_image_sync import events
from glance_image_sync.admin.checks import (
    describe,
    failed,
    passed,
    running_as,
    skipped,
    user_name,
)
from glance_image_sync.admin.tables import size_text
from glance_image_sync.exceptions import Rejected
from glance_image_sync.store.images import TEMP_PREFIX
from glance_image_sync.transfer.environ import SAFE_PATH, subprocess_env
from glance_image_sync.transfer.rsync import first_line

DEFAULT_UNIT = "glance-image-sync.service"
SYSTEMCTL_TIMEOUT = 30
UNIT_PROPERTIES = ("LoadState", "ProtectSystem", "ReadWritePaths", "StateDirectory")
# What each ProtectSystem= makes read-only (systemd.exec(5)).
_READ_ONLY = {"strict": ("/",), "full": ("/usr", "/boot", "/efi", "/etc"),
              "yes": ("/usr", "/boot", "/efi"), "true": ("/usr", "/boot", "/efi")}


class UnitUnreadable(Exception):
    """systemctl could not say what the unit is; the message is systemctl's."""


def checks(settings, unit=None, environ=None, show=None) -> list:
    return [
        store_check(settings.store.datadir),
        state_dir_check(settings.store.state_dir),
        free_space_check(settings.store.datadir),
        unit_check(settings, unit, os.environ if environ is None else environ, show),
    ]


# -- the image store -----------------------------------------------------------------


def store_check(path: str):
    name = "image store"
    me = running_as()
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return failed(name, f"{path} does not exist",
                      "set filesystem_store_datadir to Glance's own ([glance_store] "
                      "filesystem_store_datadir in glance-api.conf), the same on every node")
    except OSError as exc:
        return failed(name, f"{path}: {exc.strerror}, as {me}",
                      f"let {me} reach it: each directory above it needs x for that user")
    if not stat.S_ISDIR(st.st_mode):
        return failed(name, f"{path} is not a directory", "point filesystem_store_datadir "
                      "at Glance's store directory")
    where = describe(path, st)
    problem = _cannot_list(path) or _cannot_write(path)
    if problem:
        return failed(name, f"{where}; {problem} as {me}",
                      f"make it writable by the user the tool runs as (chown "
                      f"{user_name(os.geteuid())} {path}, or run the tool as its owner, "
                      f"{user_name(st.st_uid)}); under systemd, also ReadWritePaths=")
    problem = _cannot_give_owner(st)
    if problem:
        return failed(name, f"{where}; {problem}",
                      f"run glance-image-sync as {user_name(st.st_uid)} (the unit's User=), "
                      f"as Glance does, or give the store to {user_name(os.geteuid())}")
    note = ""
    if os.geteuid() == 0 and st.st_uid != 0:
        owner = user_name(st.st_uid)
        note = (f" (as root, permissions hardly matter: 'sudo -u {owner} glance-image-sync "
                f"doctor' checks what a daemon running as {owner} can do)")
    return passed(name, f"{where}; {me} can write copies there and give them its owner{note}")


def _cannot_list(path: str) -> str | None:
    try:
        with os.scandir(path) as entries:
            next(entries, None)
    except OSError as exc:
        return f"cannot list it ({exc.strerror})"
    return None


def _cannot_write(path: str) -> str | None:
    """Why this process cannot create and remove a file in ``path``; None if it can.

    The name is one of the store's temporary names: should the removal fail, the
    next start of the daemon removes it.
    """
    probe = os.path.join(path, f"{TEMP_PREFIX}doctor.{secrets.token_hex(4)}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        return f"cannot create a file in it ({exc.strerror})"
    os.close(fd)
    try:
        os.unlink(probe)
    except FileNotFoundError:
        pass  # a sweep of another process took it: its name has no live owner
    except OSError as exc:
        return f"cannot remove a file from it ({exc.strerror})"
    return None


def _cannot_give_owner(st) -> str | None:
    """An installed image gets the store's owner and group (fchown): can we give it?"""
    if os.geteuid() == 0:
        return None
    owner = f"{user_name(st.st_uid)}"
    if os.geteuid() != st.st_uid:
        return (f"installed images get the store's owner, {owner}, which a process "
                f"running as {running_as()} cannot give them")
    if st.st_gid not in set(os.getgroups()) | {os.getegid()}:
        return (f"installed images get the store's group (gid {st.st_gid}), which "
                f"{running_as()} is not a member of")
    return None


# -- state_dir ---------------------------------------------------------------------


def state_dir_check(path: str):
    name = "state_dir"
    me = running_as()
    try:
        st = os.stat(path)
    except FileNotFoundError:
        parent = _nearest_existing(path)
        problem = _cannot_write(parent)
        if problem is None:
            return passed(name, f"{path} does not exist yet; {me} can create it (the "
                          "first run does)")
        return failed(name, f"{path} does not exist, and {describe(parent, os.stat(parent))}: "
                      f"{problem} as {me}",
                      f"create it for the tool's user: install -d -o "
                      f"{user_name(os.geteuid())} -m 0750 {path}")
    except OSError as exc:
        return failed(name, f"{path}: {exc.strerror}, as {me}",
                      f"let {me} reach it: each directory above it needs x for that user")
    if not stat.S_ISDIR(st.st_mode):
        return failed(name, f"{path} is not a directory", "point state_dir at a directory")
    problems = []
    problem = _cannot_write(path)
    if problem:
        problems.append(f"{describe(path, st)}: {problem}")
    # What the tool writes in place (the rest is replaced by a rename in these
    # directories): the run lock, the deletions, the per-image records.
    for entry in ("lock", "deleted", "images"):
        sub = os.path.join(path, entry)
        try:
            sub_st = os.lstat(sub)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(sub_st.st_mode):
            problem = _cannot_write(sub)
        elif not os.access(sub, os.W_OK, effective_ids=os.access in os.supports_effective_ids):
            problem = "cannot write it"
        else:
            problem = None
        if problem:
            problems.append(f"{describe(sub, sub_st)}: {problem}")
    if problems:
        return failed(name, f"as {me}: " + "; ".join(problems),
                      f"give state_dir to the tool's user: chown -R {user_name(os.geteuid())} "
                      f"{path} (a run as another user, root for one, left these behind)")
    return passed(name, f"{describe(path, st)}; {me} can write there")


def _nearest_existing(path: str) -> str:
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


# -- free space --------------------------------------------------------------------


def free_space_check(path: str):
    name = "free space"
    try:
        vfs = os.statvfs(path)
        largest = _largest_image(path)
    except OSError as exc:
        return skipped(name, f"cannot look at {path}: {exc.strerror}")
    return free_space_verdict(path, vfs.f_bavail * vfs.f_frsize, vfs.f_blocks * vfs.f_frsize,
                              largest)


def free_space_verdict(path: str, free: int, total: int, largest: int):
    """PASS while a copy the size of the largest image here would still fit."""
    share = f" ({100 * free / total:.0f} %)" if total else ""
    detail = (f"{size_text(free)} free of {size_text(total)}{share} in {path}; "
              + (f"the largest image here is {size_text(largest)}" if largest
                 else "no image here yet"))
    if largest and free < largest:
        return failed("free space", detail, "free space in the store's file system or grow "
                      "it: a copy of that size would not fit, and fails with 'disk full'")
    return passed("free space", detail)


def _largest_image(path: str) -> int:
    largest = 0
    with os.scandir(path) as entries:
        for entry in entries:
            try:
                events.image_id(entry.name)
            except Rejected:
                continue
            if entry.is_file(follow_symlinks=False):
                largest = max(largest, entry.stat(follow_symlinks=False).st_size)
    return largest


# -- the systemd unit ---------------------------------------------------------------


def unit_check(settings, unit, environ, show=None):
    name = "systemd unit"
    under_systemd = "INVOCATION_ID" in environ or "NOTIFY_SOCKET" in environ
    if unit is None and not under_systemd:
        return skipped(name, "not under systemd (no INVOCATION_ID or NOTIFY_SOCKET in the "
                       f"environment); --unit {DEFAULT_UNIT} checks the unit anyway")
    mine = own_unit()
    # A shell started by some other service inherits INVOCATION_ID: only a unit of
    # ours is the one to read.
    unit = unit or (mine if mine and mine.startswith("glance-image-sync") else DEFAULT_UNIT)
    if show is None:
        if shutil.which("systemctl", path=SAFE_PATH) is None:
            return skipped(name, "systemctl is not installed")
        show = systemctl_show
    try:
        properties = show(unit)
    except UnitUnreadable as exc:
        return failed(name, f"systemctl show {unit}: {exc}",
                      "run doctor where systemd runs the unit, with --unit naming it")
    if properties.get("LoadState") != "loaded":
        return failed(name, f"{unit} is not loaded (LoadState={properties.get('LoadState')})",
                      "install the unit (README: Running it as a service), or name "
                      "the right one with --unit")
    return unit_verdict(unit, properties, _written_paths(settings))


def unit_verdict(unit: str, properties: dict, paths: dict):
    """Whether ``unit``'s sandbox lets the tool write each of ``paths`` ({what: path})."""
    protect = properties.get("ProtectSystem", "no")
    read_only = _READ_ONLY.get(protect, ())
    writable = [p.lstrip("-+") for p in properties.get("ReadWritePaths", "").split()]
    writable += [os.path.join("/var/lib", p) for p in properties.get("StateDirectory",
                                                                      "").split()]
    blocked = {what: path for what, path in paths.items()
               if _under(path, read_only) and not _under(path, writable)}
    if blocked:
        return failed("systemd unit",
                      f"{unit} has ProtectSystem={protect} and lets it write only to "
                      f"{' '.join(writable) or 'nothing'}: not to "
                      + ", ".join(f"{what} {path}" for what, path in blocked.items()),
                      f"add them in a drop-in (systemctl edit {unit}: [Service] "
                      f"ReadWritePaths={' '.join(blocked.values())}), then restart it")
    return passed("systemd unit", f"{unit} (ProtectSystem={protect}) lets it write to "
                  + ", ".join(f"{what} {path}" for what, path in paths.items()))


def _written_paths(settings) -> dict:
    paths = {"filesystem_store_datadir": settings.store.datadir,
             "state_dir": settings.store.state_dir}
    if settings.metrics.textfile:
        paths["metrics_textfile's directory"] = os.path.dirname(settings.metrics.textfile)
    return paths


def _under(path: str, roots) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def own_unit() -> str | None:
    """The service this process runs in, from its cgroup (``.../glance-image-sync.service``)."""
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        leaf = line.rpartition("/")[2]
        if leaf.endswith(".service"):
            return leaf
    return None


def systemctl_show(unit: str) -> dict:
    """The unit's UNIT_PROPERTIES, as ``systemctl show`` gives them; UnitUnreadable if not."""
    argv = ["systemctl", "show", *(f"--property={p}" for p in UNIT_PROPERTIES), "--", unit]
    try:
        result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                env=subprocess_env(), timeout=SYSTEMCTL_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise UnitUnreadable(f"no answer within {SYSTEMCTL_TIMEOUT} s") from None
    text = result.stdout.decode("utf-8", "replace")
    if result.returncode != 0:
        raise UnitUnreadable(first_line(result.stderr.decode("utf-8", "replace")))
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
