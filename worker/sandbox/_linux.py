"""Thin wrappers over the Linux calls the sandbox needs that the standard library lacks."""

from __future__ import annotations

import ctypes
import errno
import os

from loadwarden.worker._libc import libc

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
PR_SET_CHILD_SUBREAPER = 36

#: madvise(2) advice (Linux >= 5.14, not in Python 3.11's mmap module): fault a range in
#: writable now, in one call, as a write to each page would one fault at a time.
MADV_POPULATE_WRITE = 23
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def _kernel_populates() -> bool:
    # An empty range is checked for a known advice, then does nothing: EINVAL before 5.14.
    if libc().madvise(0, 0, MADV_POPULATE_WRITE) == 0:
        return True
    return ctypes.get_errno() != errno.EINVAL


#: Whether this kernel knows MADV_POPULATE_WRITE (asked once, at import).
CAN_POPULATE = _kernel_populates()


def prctl(option: int, arg2: int = 0) -> None:
    """Call prctl(2); raise OSError on failure."""
    prctl3(option, arg2, 0)


def prctl3(option: int, arg2: int, arg3: int) -> None:
    """Call prctl(2) with a third argument (a pointer, for PR_SET_SECCOMP); raise on failure."""
    if libc().prctl(option, arg2, arg3, 0, 0) != 0:
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
    return bool(libc().madvise(start, end - start, MADV_POPULATE_WRITE) == 0)


def _read_small(path: str) -> bytes:
    """A small /proc file's bytes, read in one call (one page is enough for those read here).

    os.open/os.read rather than ``open()``: no FileIO, BufferedReader or line iterator is
    built, which in a freshly forked child means fewer copy-on-write faults (measured in
    the fork-server harness: these reads run in every load child).
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def write_small(path: str, data: bytes) -> None:
    """Write ``data`` to an existing (/proc) file in one call, as ``_read_small`` reads."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def memory_from_statm() -> tuple[int, int]:
    """This process's (virtual size, resident size) in bytes, from /proc/self/statm."""
    fields = _read_small("/proc/self/statm").split(None, 2)
    return int(fields[0]) * PAGE_BYTES, int(fields[1]) * PAGE_BYTES


def read_chars() -> int:
    """Bytes this process has read through read(2)/pread(2) so far (``rchar``), or 0."""
    try:
        text = _read_small("/proc/self/io")
    except OSError:
        return 0
    if text.startswith(b"rchar:"):  # the first line, in every kernel that has the file
        return int(text.split(b"\n", 1)[0][6:])
    return 0
