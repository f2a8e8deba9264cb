"""The environment of the programs a transfer runs (rsync, ssh, rrsync)."""

from __future__ import annotations

import os

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def subprocess_env() -> dict:
    """A minimal environment: ssh needs HOME for its keys and known hosts."""
    env = {"PATH": SAFE_PATH, "LC_ALL": "C"}
    if "HOME" in os.environ:
        env["HOME"] = os.environ["HOME"]
    return env
