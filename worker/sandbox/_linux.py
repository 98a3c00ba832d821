"""Thin wrappers over the Linux calls the sandbox needs that the standard library lacks."""

from __future__ import annotations

import ctypes
import os

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
PR_SET_CHILD_SUBREAPER = 36

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]
_libc.prctl.restype = ctypes.c_int


def prctl(option: int, arg2: int = 0) -> None:
    """Call prctl(2); raise OSError on failure."""
    prctl3(option, arg2, 0)


def prctl3(option: int, arg2: int, arg3: int) -> None:
    """Call prctl(2) with a third argument (a pointer, for PR_SET_SECCOMP); raise on failure."""
    if _libc.prctl(option, arg2, arg3, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def memory_from_statm() -> tuple[int, int]:
    """This process's (virtual size, resident size) in bytes, from /proc/self/statm."""
    with open("/proc/self/statm", "rb") as fh:
        fields = fh.read().split()
    page = os.sysconf("SC_PAGE_SIZE")
    return int(fields[0]) * page, int(fields[1]) * page


def read_chars() -> int:
    """Bytes this process has read through read(2)/pread(2) so far (``rchar``), or 0."""
    try:
        with open("/proc/self/io", "rb") as fh:
            for line in fh:
                if line.startswith(b"rchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0
