"""One finding of ``glance-image-sync doctor``: what was checked, the verdict, the fix.

Every check module yields these; ``doctor`` only orders and shows them.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


@dataclass(frozen=True)
class Check:
    name: str  # "image store", "peer node2: ssh"
    status: str  # PASS, FAIL or SKIP
    detail: str  # what was found, in words
    fix: str = ""  # for a FAIL: what to do about it

    @property
    def failed(self) -> bool:
        return self.status == FAIL


def passed(name: str, detail: str) -> Check:
    return Check(name, PASS, detail)


def failed(name: str, detail: str, fix: str) -> Check:
    return Check(name, FAIL, detail, fix)


def skipped(name: str, why: str) -> Check:
    return Check(name, SKIP, why)


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def running_as() -> str:
    """``glance (uid 117, gid 123)``: the user this process acts as."""
    uid, gid = os.geteuid(), os.getegid()
    return f"{user_name(uid)} (uid {uid}, gid {gid})"


def describe(path: str, st) -> str:
    """``/var/lib/glance/images: owner glance:glance (117:123), mode 0750``."""
    owner = f"{user_name(st.st_uid)}:{group_name(st.st_gid)}"
    ids = f"{st.st_uid}:{st.st_gid}"
    return (f"{path}: owner {owner}{'' if owner == ids else f' ({ids})'}, "
            f"mode {stat.S_IMODE(st.st_mode):04o}")
