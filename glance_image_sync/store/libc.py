"""C library calls that Python's os module does not wrap (prctl, sync_file_range).

The library is looked up once, at import: ``find_library`` may run
``ldconfig``, and a function must be resolved before it is used in a forked
child, which may not import or take locks.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def function(name: str, argtypes=None):
    """The C library's ``name``, or None where this libc has no such function."""
    func = getattr(_LIBC, name, None)
    if func is not None and argtypes is not None:
        func.argtypes = argtypes
    return func
