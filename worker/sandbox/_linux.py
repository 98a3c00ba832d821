"""Thin wrappers over the Linux calls the sandbox needs that the standard library lacks."""

from __future__ import annotations

import ctypes
import errno
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
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int

#: madvise(2) advice (Linux >= 5.14, not in Python 3.11's mmap module): fault a range in
#: writable now, in one call, as a write to each page would one fault at a time.
MADV_POPULATE_WRITE = 23
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def _kernel_populates() -> bool:
    # An empty range is checked for a known advice, then does nothing: EINVAL before 5.14.
    if _libc.madvise(0, 0, MADV_POPULATE_WRITE) == 0:
        return True
    return ctypes.get_errno() != errno.EINVAL


#: Whether this kernel knows MADV_POPULATE_WRITE (asked once, at import).
CAN_POPULATE = _kernel_populates()


def prctl(option: int, arg2: int = 0) -> None:
    """Call prctl(2); raise OSError on failure."""
    prctl3(option, arg2, 0)


def prctl3(option: int, arg2: int, arg3: int) -> None:
    """Call prctl(2) with a third argument (a pointer, for PR_SET_SECCOMP); raise on failure."""
    if _libc.prctl(option, arg2, arg3, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def populate_write(address: int, nbytes: int) -> bool:
    """Fault in the whole pages of ``[address, address + nbytes)`` writable; False if not done.

    An optimisation only: on failure (an older kernel, no memory left) nothing changed,
    and the first write to each page faults it in as it would have anyway.
    """
    start = -(-address // PAGE_BYTES) * PAGE_BYTES
    end = (address + nbytes) // PAGE_BYTES * PAGE_BYTES
    if not CAN_POPULATE or end <= start:
        return False
    return bool(_libc.madvise(start, end - start, MADV_POPULATE_WRITE) == 0)


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
