"""Open a local file inside an allowed root, one path component at a time, never leaving it."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loadwarden.producer.errors import SourceRefused, SourceUnavailable
from loadwarden.worker._files import ModelFile, _os_error, _refuse_special

#: Linux's own limit on symlinks followed while resolving one path (MAXSYMLINKS).
MAX_SYMLINK_HOPS = 40
#: Kernel pseudo-filesystems: nothing under them is a model, whatever a root says.
SPECIAL_TREES = ("/proc", "/sys", "/dev")

# O_PATH: a handle to walk from, with no read access and no open side effects.
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO swapped in after the fstatat does not block the open; fstat sees it.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


@dataclass(frozen=True, slots=True)
class Root:
    """An allowed root: its real path, and every spelling of it a path may start with."""

    real: str
    prefixes: tuple[tuple[str, ...], ...]

    @classmethod
    def of(cls, path: Path) -> Root:
        given = os.path.abspath(path)
        real = os.path.realpath(given)
        return cls(real, tuple(dict.fromkeys((_parts(real), _parts(given)))))

    def strip(self, parts: tuple[str, ...]) -> list[str] | None:
        """``parts`` (of an absolute path) below this root, or None if it does not start here."""
        for prefix in self.prefixes:
            if parts[: len(prefix)] == prefix:
                return list(parts[len(prefix) :])
        return None


def open_local(source: str, roots: Sequence[Path]) -> ModelFile:
    """Open ``source`` if it names a regular file inside one of ``roots``.

    Empty ``roots`` means the current directory; a relative ``source`` is relative to
    the first root, an absolute one must start with a root (as configured or as its
    real path). Raises ``SourceRefused`` or ``SourceUnavailable``.
    """
    allowed = [Root.of(r) for r in roots] or [Root.of(Path.cwd())]
    if not source:
        raise SourceUnavailable("an empty path names no file", code="not_found")
    if "\0" in source:  # no file has one; os calls would raise ValueError on it
        raise SourceRefused("a path with a NUL byte names no file", code="bad_path")
    absolute = source if source.startswith("/") else os.path.join(allowed[0].real, source)
    _refuse_special_tree(os.path.normpath(absolute), source)
    if not source.startswith("/"):
        return open_under(allowed[0], _parts(source), source)
    for root in allowed:
        rest = root.strip(_parts(source))
        if rest is not None:
            return open_under(root, rest, source)
    raise SourceRefused(f"{source!r} is outside the allowed roots", code="outside_root")


def open_under(root: Root, parts: Sequence[str], source: str) -> ModelFile:
    """Open the regular file ``parts`` names below ``root`` without leaving it.

    Every component is checked with ``fstatat(AT_SYMLINK_NOFOLLOW)`` and opened with
    ``O_NOFOLLOW`` relative to its parent's descriptor, so nothing can be swapped in
    between a check and an open. A symlink is followed only if its target stays
    inside the root; ``..`` cannot climb above it.
    """
    _refuse_special_tree(root.real, source)
    root_fd = _open_root(root.real, source)
    walk = _Walk(root, root_fd, source)
    try:
        return walk.run(list(parts))
    finally:
        walk.close()


class _Walk:
    """The directories entered so far, each held open, and the symlinks followed."""

    def __init__(self, root: Root, root_fd: int, source: str) -> None:
        self.root = root
        self.root_fd = root_fd
        self.source = source
        self.stack: list[tuple[str, int]] = []
        self.hops = 0

    def close(self) -> None:
        self._unwind()
        os.close(self.root_fd)

    def run(self, parts: list[str]) -> ModelFile:
        pending = list(reversed(parts))
        while pending:
            name = pending.pop()
            if name in ("", "."):
                continue
            if name == "..":
                self._up()
                continue
            st = self._lstat(name)
            if stat.S_ISLNK(st.st_mode):
                pending.extend(reversed(self._follow(name)))
            elif not pending:
                return self._open_file(name, st)
            elif stat.S_ISDIR(st.st_mode):
                self._enter(name, st)
            else:
                raise SourceUnavailable(f"{self.source!r} does not exist", code="not_found")
        # The path ended on a directory (the root, or "..", or "."): not a model file.
        _refuse_special(self.source, os.fstat(self._cwd).st_mode)
        raise AssertionError("unreachable: a walk never ends on a regular file")

    @property
    def _cwd(self) -> int:
        return self.stack[-1][1] if self.stack else self.root_fd

    def _path(self, name: str) -> str:
        return os.path.join(self.root.real, *(n for n, _ in self.stack), name)

    def _up(self) -> None:
        if not self.stack:
            raise SourceRefused(
                f"{self.source!r} climbs above its allowed root", code="outside_root"
            )
        os.close(self.stack.pop()[1])

    def _unwind(self) -> None:
        while self.stack:
            os.close(self.stack.pop()[1])

    def _lstat(self, name: str) -> os.stat_result:
        try:
            return os.stat(name, dir_fd=self._cwd, follow_symlinks=False)
        except OSError as exc:
            raise _os_error(self.source, exc) from exc

    def _follow(self, name: str) -> list[str]:
        self.hops += 1
        if self.hops > MAX_SYMLINK_HOPS:
            raise SourceRefused(
                f"{self.source!r} follows more than {MAX_SYMLINK_HOPS} symlinks",
                code="symlink_loop",
            )
        try:
            target = os.readlink(name, dir_fd=self._cwd)
        except OSError as exc:
            raise _os_error(self.source, exc) from exc
        if not target.startswith("/"):
            return list(_parts(target))
        rest = self.root.strip(_parts(target))
        if rest is None:
            raise SourceRefused(
                f"{self.source!r} is a symlink ({self._path(name)!r} -> {target!r}) out of its"
                " allowed root",
                code="outside_root",
            )
        self._unwind()  # an absolute target starts again from the root
        return rest

    def _enter(self, name: str, st: os.stat_result) -> None:
        fd = self._open(name, _DIR_FLAGS)
        self.stack.append((name, fd))
        _same_file(fd, st, self.source)

    def _open_file(self, name: str, st: os.stat_result) -> ModelFile:
        path = self._path(name)
        _refuse_special_tree(path, self.source)
        _refuse_special(self.source, st.st_mode)
        fd = self._open(name, _FILE_FLAGS)
        try:
            return ModelFile.adopt(path, fd, _same_file(fd, st, self.source))
        except BaseException:
            os.close(fd)
            raise

    def _open(self, name: str, flags: int) -> int:
        try:
            return os.open(name, flags, dir_fd=self._cwd)
        except OSError as exc:
            # ELOOP/ENOTDIR: a symlink or a file replaced what fstatat saw a moment ago.
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise SourceRefused(
                    f"{self.source!r} changed while it was opened", code="file_changed"
                ) from exc
            raise _os_error(self.source, exc) from exc


def _same_file(fd: int, before: os.stat_result, source: str) -> os.stat_result:
    after = os.fstat(fd)
    if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino) or stat.S_IFMT(
        after.st_mode
    ) != stat.S_IFMT(before.st_mode):
        raise SourceRefused(f"{source!r} changed while it was opened", code="file_changed")
    return after


def _open_root(real: str, source: str) -> int:
    try:
        return os.open(real, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENAMETOOLONG):  # never gets better by retrying
            raise _os_error(source, exc) from exc
        raise SourceUnavailable(
            f"the allowed root {real!r} of {source!r} cannot be opened: {exc.strerror}",
            code="root_unavailable",
        ) from exc


def _refuse_special_tree(path: str, source: str) -> None:
    for tree in SPECIAL_TREES:
        if path == tree or path.startswith(tree + "/"):
            raise SourceRefused(
                f"{source!r} is under {tree}, which never holds model files", code="special_path"
            )


def _parts(path: str) -> tuple[str, ...]:
    # "." and empty components mean nothing; ".." is kept for the walk to apply.
    return tuple(p for p in path.split("/") if p not in ("", "."))
