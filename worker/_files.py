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

from loadwarden.producer.errors import LoadError, SourceRefused, SourceUnavailable
from loadwarden.worker.formats.index import ShardIndex

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


class Closing:
    """``with`` closes it: the descriptors it holds are closed on the way out."""

    __slots__ = ()

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class ModelFile(Closing):
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


@dataclass(frozen=True, slots=True)
class Shard:
    """One file of a model, by its name in its folder, with the digest its name promises."""

    name: str
    file: ModelFile
    #: A Hugging Face cache blob's sha256 (its file name), checked by the supervisor's hash.
    expected_sha256: str | None = None
    #: A cache blob named by its git blob sha1 (a small, non-LFS file such as an index).
    expected_git_sha1: str | None = None


@dataclass(frozen=True, slots=True)
class SignatureFile:
    """The signature file found beside (or in) a model: its bytes, or why they are unusable
    (a symlink, too large, unreadable), which matters only if a signature is required."""

    name: str
    raw: bytes | None = None
    problem: LoadError | None = None


@dataclass(slots=True)
class OpenedModel(Closing):
    """Every file of one model, open: a single file, or a checkpoint's shards and index.

    ``checkpoint`` is set when the source named a checkpoint (a folder, an index or
    an ``hf://`` repository): its report lists the shards, even a single one.
    """

    files: list[Shard]
    checkpoint: bool = False
    index: ShardIndex | None = None
    index_name: str | None = None
    #: The sha256 of the index's bytes, as read and parsed (the signature covers them too).
    index_sha256: str | None = None
    #: ``FILE.sig`` beside a single file, ``model.sig`` in a checkpoint's folder (None: none).
    signature: SignatureFile | None = None

    @classmethod
    def single(cls, model_file: ModelFile) -> OpenedModel:
        return cls([Shard(os.path.basename(model_file.path), model_file)])

    @property
    def first(self) -> ModelFile:
        return self.files[0].file

    def close(self) -> None:
        """Close every descriptor; calling it again does nothing."""
        for shard in self.files:
            shard.file.close()
