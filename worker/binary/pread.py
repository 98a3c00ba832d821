"""A read-only file object over a descriptor, by pread (stdlib only: it runs in the load child).

The supervisor's inspectors and the child's loaders hand it to ``zipfile`` and
``numpy.lib.format``. It keeps a position of its own and never moves the
descriptor's offset, which the supervisor and the child share (SCM_RIGHTS passes
the open file description, not a copy), and closing it leaves the descriptor open.
"""

from __future__ import annotations

import io
import os
import zipfile
import zlib
from typing import Any

#: What ``zipfile`` may raise while it reads a member through ``open_reader``: a broken
#: archive or stream, a method it lacks, an encrypted member.
ZIP_MEMBER_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError)


class PreadFile(io.RawIOBase):
    """A seekable, read-only view of ``fd`` whose position is its own."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if not view:
            return 0
        count = os.preadv(self._fd, [view], self._pos)
        self._pos += count
        return count

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            target = offset
        elif whence == io.SEEK_CUR:
            target = self._pos + offset
        elif whence == io.SEEK_END:
            target = os.fstat(self._fd).st_size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if target < 0:
            raise OSError(22, "negative seek position")
        self._pos = target
        return target

    def tell(self) -> int:
        return self._pos


def open_reader(fd: int, buffer_bytes: int = 64 * 1024) -> io.BufferedReader:
    """A buffered reader over ``fd`` from offset 0; closing it leaves ``fd`` open."""
    return io.BufferedReader(PreadFile(fd), buffer_size=buffer_bytes)


def pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``offset``; return how many bytes were read (short only at EOF)."""
    done = 0
    while done < len(view):
        count = os.preadv(fd, [view[done:]], offset + done)
        if count == 0:
            break
        done += count
    return done
