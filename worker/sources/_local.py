"""Open a local file inside an allowed root, one path component at a time, never leaving it."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loadwarden.producer.errors import SourceRefused, SourceUnavailable
from loadwarden.worker._files import ModelFile, OpenedModel, Shard, _os_error, _refuse_special
from loadwarden.worker.config import InspectionCaps
from loadwarden.worker.formats.index import INDEX_SUFFIX
from loadwarden.worker.sources._checkpoint import (
    SIGNATURE_SUFFIX,
    folder_opener,
    open_folder,
    open_indexed,
    read_signature,
)
from loadwarden.worker.sources._fstype import pseudo_filesystem

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
    #: The path as configured, made absolute (no filesystem call).
    given: str

    @classmethod
    def of(cls, path: Path) -> Root:
        given = os.path.abspath(path)
        real = os.path.realpath(given)
        return cls(real, tuple(dict.fromkeys((_parts(real), _parts(given)))), given)

    def strip(self, parts: tuple[str, ...]) -> list[str] | None:
        """``parts`` (of an absolute path) below this root, or None if it does not start here."""
        for prefix in self.prefixes:
            if parts[: len(prefix)] == prefix:
                return list(parts[len(prefix) :])
        return None


def open_local(source: str, roots: Sequence[Path], *, refuse_hard_links: bool = False) -> ModelFile:
    """Open ``source`` if it names a regular file inside one of ``roots``.

    Empty ``roots`` means the current directory; a relative ``source`` is relative to
    the first root, an absolute one must start with a root (as configured or as its
    real path). With ``refuse_hard_links`` a file with more than one link is refused:
    a hard link into a root cannot be told from a file that belongs there by its path.
    Raises ``SourceRefused`` or ``SourceUnavailable``.
    """
    root, parts = _locate(source, roots)
    opened = open_under(root, parts, source)
    if refuse_hard_links:
        refuse_linked(OpenedModel.single(opened), source)
    return opened


def refuse_linked(model: OpenedModel, source: str) -> None:
    """Close ``model`` and refuse it if any of its files has more than one link."""
    for shard in model.files:
        links = os.fstat(shard.file.fd).st_nlink
        if links > 1:
            model.close()
            raise SourceRefused(
                f"{shard.file.path!r} (of {source!r}) has {links} hard links: one may lead in"
                " from outside the allowed roots (sources.refuse_hard_links)",
                code="hard_link",
            )


def _locate(source: str, roots: Sequence[Path]) -> tuple[Root, tuple[str, ...]]:
    """The allowed root ``source`` lies in, and its components below that root."""
    return locate_among(source, [Root.of(r) for r in roots] or [Root.of(Path.cwd())])


def locate_among(source: str, allowed: Sequence[Root]) -> tuple[Root, tuple[str, ...]]:
    """``_locate`` among roots already resolved (no filesystem call)."""
    if not source:
        raise SourceUnavailable("an empty path names no file", code="not_found")
    if "\0" in source:  # no file has one; os calls would raise ValueError on it
        raise SourceRefused("a path with a NUL byte names no file", code="bad_path")
    absolute = source if source.startswith("/") else os.path.join(allowed[0].real, source)
    refuse_special_tree(os.path.normpath(absolute), source)
    if not source.startswith("/"):
        return allowed[0], _parts(source)
    for root in allowed:
        rest = root.strip(_parts(source))
        if rest is not None:
            return root, tuple(rest)
    raise SourceRefused(f"{source!r} is outside the allowed roots", code="outside_root")


def open_local_model(
    source: str, roots: Sequence[Path], caps: InspectionCaps, *, refuse_hard_links: bool = False
) -> OpenedModel:
    """Open the model ``source`` names inside ``roots``: a file, a checkpoint's index, or a
    folder holding a checkpoint (``_checkpoint``). Roots, paths and ``refuse_hard_links``
    (checked on every shard) as in ``open_local``."""
    model = _open_local_model(source, roots, caps)
    if refuse_hard_links:
        refuse_linked(model, source)
    return model


def _open_local_model(source: str, roots: Sequence[Path], caps: InspectionCaps) -> OpenedModel:
    root, parts = _locate(source, roots)
    refuse_special_tree(root.real, source)
    root_fd = _open_root(root.real, source)
    walk = _Walk(root, root_fd, source)
    try:
        found = walk.walk(list(parts))
        if found is not None and not found.path.endswith(INDEX_SUFFIX):
            return _with_signature(OpenedModel.single(found), walk, source)
        try:
            dir_fd, folder = walk.folder()
        except BaseException:
            if found is not None:
                found.close()
            raise
    finally:
        walk.close()
    try:
        opener = folder_opener(dir_fd, folder, source)
        if found is None:
            return open_folder(dir_fd, folder, source, caps, opener)
        return open_indexed(Shard(os.path.basename(found.path), found), caps, opener)
    finally:
        os.close(dir_fd)


def _with_signature(opened: OpenedModel, walk: _Walk, source: str) -> OpenedModel:
    """A single file's model with ``FILE.sig`` from the same folder, when there is one."""
    try:
        dir_fd, folder = walk.folder()
    except BaseException:
        opened.close()
        raise
    try:
        name = os.path.basename(opened.first.path) + SIGNATURE_SUFFIX
        opened.signature = read_signature(folder_opener(dir_fd, folder, source), name, opened)
    finally:
        os.close(dir_fd)
    return opened


def open_under(root: Root, parts: Sequence[str], source: str) -> ModelFile:
    """Open the regular file ``parts`` names below ``root`` without leaving it.

    Every component is checked with ``fstatat(AT_SYMLINK_NOFOLLOW)`` and opened with
    ``O_NOFOLLOW`` relative to its parent's descriptor, so nothing can be swapped in
    between a check and an open. A symlink is followed only if its target stays
    inside the root; ``..`` cannot climb above it.
    """
    refuse_special_tree(root.real, source)
    root_fd = _open_root(root.real, source)
    walk = _Walk(root, root_fd, source)
    try:
        _refuse_pseudo_fs(root_fd, source)
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
        found = self.walk(parts)
        if found is None:  # the path ended on a directory (the root, "..", "."): not a file
            _refuse_special(self.source, os.fstat(self._cwd).st_mode)
            raise AssertionError("unreachable: a directory is never a regular file")
        return found

    def walk(self, parts: list[str]) -> ModelFile | None:
        """Open the regular file ``parts`` names, or None when they name a directory
        (then entered: ``folder()`` opens it)."""
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
            elif stat.S_ISDIR(st.st_mode):
                self._enter(name, st)
            elif not pending:
                return self._open_file(name, st)
            else:
                raise SourceUnavailable(f"{self.source!r} does not exist", code="not_found")
        return None

    def folder(self) -> tuple[int, str]:
        """The directory the walk is in (the file's folder, or the folder it named), opened
        readable so it can be listed, and its path."""
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self._cwd)
        return fd, os.path.join(self.root.real, *(n for n, _ in self.stack))

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
        _refuse_pseudo_fs(fd, self.source)

    def _open_file(self, name: str, st: os.stat_result) -> ModelFile:
        path = self._path(name)
        refuse_special_tree(path, self.source)
        _refuse_special(self.source, st.st_mode)
        fd = self._open(name, _FILE_FLAGS)
        try:
            _refuse_pseudo_fs(fd, self.source)
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


def refuse_special_tree(path: str, source: str) -> None:
    for tree in SPECIAL_TREES:
        if path == tree or path.startswith(tree + "/"):
            raise SourceRefused(
                f"{source!r} is under {tree}, which never holds model files", code="special_path"
            )


def _refuse_pseudo_fs(fd: int, source: str) -> None:
    # The real guard (the path check above is only an early, cheap one): a bind mount of
    # /proc, or a root that is itself on sysfs, has an innocent path but a telling f_type.
    kind = pseudo_filesystem(fd)
    if kind is not None:
        raise SourceRefused(
            f"{source!r} is on a {kind} filesystem, which never holds model files",
            code="special_path",
        )


def _parts(path: str) -> tuple[str, ...]:
    # "." and empty components mean nothing; ".." is kept for the walk to apply.
    return tuple(p for p in path.split("/") if p not in ("", "."))
