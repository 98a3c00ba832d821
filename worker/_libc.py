"""The C library through ctypes: one handle for every module that calls it, made on first use.

``CDLL(None)`` is the process's own symbols, libc's among them: ``ctypes.util.find_library``
would run ``ldconfig -p`` in a subprocess. ``use_errno``: every caller reads
``ctypes.get_errno()`` after a failed call. The prototypes of all the functions called
through it are set here, once, so that no module's setting changes another's calls.
"""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def libc() -> ctypes.CDLL:
    """The shared handle, its prototypes set (made at the first call, then the same one)."""
    lib = ctypes.CDLL(None, use_errno=True)
    # syscall(2) is variadic: its arguments are typed at each call; a long comes back (an fd,
    # a Landlock ABI, or -1).
    lib.syscall.restype = ctypes.c_long
    lib.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    lib.prctl.restype = ctypes.c_int
    lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    lib.madvise.restype = ctypes.c_int
    # The struct statfs buffer is the caller's (``sources._fstype``), passed by reference.
    lib.fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
    lib.fstatfs.restype = ctypes.c_int
    return lib
