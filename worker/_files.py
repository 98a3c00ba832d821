"""Open a model file without following a symlink, blocking on a pipe or racing a path swap."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from loadwarden.producer.errors import SourceRefused, SourceUnavailable

# O_NONBLOCK: if a FIFO is swapped in after the lstat, open() returns instead of waiting for a
# writer; fstat then sees it is not our file.
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

_NOT_REGULAR: tuple[tuple[Callable[[int], bool], str], ...] = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


@dataclass(frozen=True, slots=True)
class ModelFile:
    """An open, read-only descriptor of a regular file, with the identity it was checked against."""

    path: str
    fd: int
    size: int
    dev: int
    ino: int
    mtime_ns: int
    # A second close() must not close a descriptor number the process has since reused.
    _closed: bool = field(default=False, init=False, repr=False, compare=False)

    @classmethod
    def adopt(cls, path: str, fd: int, st: os.stat_result) -> ModelFile:
        """Wrap an fd opened with O_NONBLOCK (so a FIFO could not block it) on a regular file.

        Reads from a regular file never block; the flag is cleared so loaders see a plain fd.
        """
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return cls(
            path=path, fd=fd, size=st.st_size, dev=st.st_dev, ino=st.st_ino, mtime_ns=st.st_mtime_ns
        )

    def close(self) -> None:
        """Close the descriptor; calling it again does nothing."""
        if self._closed:
            return
        object.__setattr__(self, "_closed", True)
        try:
            os.close(self.fd)
        except OSError as exc:
            if exc.errno != errno.EBADF:
                raise

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def open_model_file(path: str | os.PathLike[str]) -> ModelFile:
    """Open ``path`` read-only if it is a regular file and not a symlink; raise a ``LoadError``."""
    name = os.fspath(path)
    before = _lstat(name)
    _refuse_special(name, before.st_mode)
    fd = _open(name)
    try:
        after = os.fstat(fd)
        if not stat.S_ISREG(after.st_mode) or (after.st_dev, after.st_ino) != (
            before.st_dev,
            before.st_ino,
        ):
            raise SourceRefused(
                f"{name!r} was replaced between its check and its open", code="file_changed"
            )
        return ModelFile.adopt(name, fd, after)
    except BaseException:
        os.close(fd)
        raise


def _lstat(name: str) -> os.stat_result:
    try:
        return os.lstat(name)
    except OSError as exc:
        raise _os_error(name, exc) from exc


def _open(name: str) -> int:
    try:
        return os.open(name, _OPEN_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SourceRefused(
                f"{name!r} became a symlink after it was checked", code="file_changed"
            ) from exc
        raise _os_error(name, exc) from exc


def _refuse_special(name: str, mode: int) -> None:
    if stat.S_ISLNK(mode):
        raise SourceRefused(f"{name!r} is a symlink; model files are not followed", code="symlink")
    if stat.S_ISREG(mode):
        return
    kind = next((label for test, label in _NOT_REGULAR if test(mode)), f"of type {mode:o}")
    raise SourceRefused(f"{name!r} is {kind}, not a regular file", code="not_regular_file")


def _os_error(name: str, exc: OSError) -> SourceUnavailable | SourceRefused:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return SourceUnavailable(f"{name!r} does not exist", code="not_found")
    # Neither gets better by retrying: a loop of symlinks, a name longer than the system takes.
    if exc.errno == errno.ELOOP:
        return SourceRefused(f"{name!r} leads into a loop of symlinks", code="symlink_loop")
    if exc.errno == errno.ENAMETOOLONG:
        return SourceRefused(f"{name!r} is longer than a path may be", code="bad_path")
    return SourceUnavailable(f"{name!r} cannot be read: {exc.strerror}", code="unreadable")


def resolved(path: str | os.PathLike[str]) -> Path:
    """``Path(path).resolve()`` for a path from a user: where it cannot be resolved (a loop of
    symlinks raises RuntimeError, a NUL byte ValueError) it stays absolute as spelt, and the
    opener then refuses it with a code instead of a traceback."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError, ValueError):
        return Path(os.path.abspath(path))
