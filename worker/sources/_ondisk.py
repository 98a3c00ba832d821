"""Opening a single local file on the event loop, where nothing can make it wait.

A network filesystem's metadata calls may wait on a server, for ever when it is hard-mounted
and gone, and so may a FUSE mount whose daemon hangs: such a wait on the event loop would
stop the worker (heartbeats, leases, every other load). So an open on the loop
(``open_local_inline``) starts from a root an open in a thread (``open_local_learning``)
found on a local-disk filesystem (``_fstype.LOCAL_FILESYSTEMS``) and holds open, and resolves
the path with one ``openat2(RESOLVE_BENEATH | RESOLVE_NO_XDEV | RESOLVE_NO_SYMLINKS)``: the
kernel refuses (EXDEV) to cross any mount point before it asks the filesystem below for
anything, so no component on another filesystem is ever looked up on the loop. What it
refuses, or what needs more than one file (a folder, an index, a signature beside the file),
opens in a thread with the walk's own checks (``_local``).

A root is used from the loop for FRESH_S after it was learnt, then learnt again in a thread
(a root renamed or replaced is seen within that); any change to the mount table (a poll of
``/proc/self/mountinfo``, one syscall) forgets every root at once. Hand-written with ctypes:
the stdlib has no ``openat2``, and it is one call.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import stat
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loadwarden.producer.errors import SourceRefused
from loadwarden.worker._files import ModelFile, OpenedModel
from loadwarden.worker._libc import libc
from loadwarden.worker.config import InspectionCaps
from loadwarden.worker.formats.index import INDEX_SUFFIX
from loadwarden.worker.sources._checkpoint import SIGNATURE_SUFFIX
from loadwarden.worker.sources._fstype import on_local_disk
from loadwarden.worker.sources._local import (
    Root,
    locate_among,
    open_local_model,
    refuse_linked,
    refuse_special_tree,
)

#: How long a root learnt in a thread is used from the loop before it is learnt again.
FRESH_S = 2.0
#: Roots held open at most (a worker has a handful; tests make many).
MAX_ROOTS = 64

_SYS_OPENAT2 = 437  # the same number on every Linux architecture (new syscalls share one table)
_RESOLVE_NO_XDEV, _RESOLVE_NO_MAGICLINKS, _RESOLVE_NO_SYMLINKS, _RESOLVE_BENEATH = 1, 2, 4, 8
_RESOLVE = _RESOLVE_NO_XDEV | _RESOLVE_NO_MAGICLINKS | _RESOLVE_NO_SYMLINKS | _RESOLVE_BENEATH
# O_NONBLOCK: a FIFO swapped in after the O_PATH look does not block the open; fstat sees it.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_LOOK_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _openat2(dir_fd: int, path: str, flags: int) -> int:
    """``openat2(dir_fd, path, flags)`` beneath ``dir_fd``, crossing no mount or symlink."""
    how = _OpenHow(flags, 0, _RESOLVE)
    fd = libc().syscall(
        ctypes.c_long(_SYS_OPENAT2),
        ctypes.c_int(dir_fd),
        ctypes.c_char_p(os.fsencode(path)),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


@dataclass(frozen=True, slots=True)
class _Learnt:
    root: Root
    fd: int | None  # O_PATH, held (the loop never resolves the root's own path); None: not local
    until: float


class _Roots:
    """Roots learnt in threads, by their path as given, made absolute. Descriptors are
    closed on the loop only, their one user (``held``), once out of ``learnt``."""

    def __init__(self) -> None:
        self.learnt: dict[str, _Learnt] = {}
        self.retired: list[int] = []
        self.lock = threading.Lock()
        self.mounts: select.poll | None = None
        #: Bumped by ``held`` when the mount table changed: a root learnt across a bump is
        #: dropped, since it may have been looked at before the change.
        self.generation = 0
        self.usable = True  # False where openat2 is missing (kernel < 5.6, a seccomp profile)

    def learn(self, roots: Sequence[Path]) -> None:
        """Note each root not learnt or stale; in a thread (resolving a root may block)."""
        if not self.usable:
            return
        with self.lock:
            if self.mounts is None:  # before any root is looked at: no change goes unseen
                watch = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
                self.mounts = select.poll()
                self.mounts.register(watch, select.POLLPRI)
        for given in _given(roots):
            now = time.monotonic()
            with self.lock:
                known = self.learnt.get(given)
                generation = self.generation
            if known is not None and known.until > now:
                continue
            learnt = _learn_one(given, now)
            with self.lock:
                if generation != self.generation:  # the mounts changed meanwhile
                    if learnt.fd is not None:
                        self.retired.append(learnt.fd)
                    continue
                if len(self.learnt) >= MAX_ROOTS:
                    self._retire_all()
                old = self.learnt.pop(given, None)
                if old is not None and old.fd is not None:
                    self.retired.append(old.fd)
                self.learnt[given] = learnt

    def held(self, roots: Sequence[Path]) -> list[tuple[Root, int]] | None:
        """Every root with its descriptor, learnt, fresh and on a local disk, or None; on
        the loop."""
        with self.lock:
            self._close_retired()
            if not self.usable or self.mounts is None:
                return None
            if self.mounts.poll(0):  # the mount table changed: whatever was learnt may not hold
                self.generation += 1
                self._retire_all()
                self._close_retired()
                return None
            learnt = [self.learnt.get(given) for given in _given(roots)]
        now = time.monotonic()
        held = [
            (item.root, item.fd)
            for item in learnt
            if item is not None and item.fd is not None and item.until > now
        ]
        return held if len(held) == len(learnt) else None

    def unusable(self) -> None:
        with self.lock:
            self.usable = False
            self._retire_all()

    def _retire_all(self) -> None:
        self.retired.extend(item.fd for item in self.learnt.values() if item.fd is not None)
        self.learnt.clear()

    def _close_retired(self) -> None:
        for fd in self.retired:
            os.close(fd)
        self.retired.clear()


_roots = _Roots()


def _given(roots: Sequence[Path]) -> list[str]:
    return [os.path.abspath(r) for r in roots] or [os.getcwd()]


def _learn_one(given: str, now: float) -> _Learnt:
    root = Root.of(Path(given))
    try:
        fd = os.open(root.real, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:  # the open itself says why, if this root is the one used
        return _Learnt(root, None, now + FRESH_S)
    try:
        if on_local_disk(fd):
            return _Learnt(root, fd, now + FRESH_S)
    except OSError:
        pass
    os.close(fd)
    return _Learnt(root, None, now + FRESH_S)


def open_local_learning(
    source: str, roots: Sequence[Path], caps: InspectionCaps, *, refuse_hard_links: bool = False
) -> OpenedModel:
    """``_local.open_local_model``, noting first which roots are on a local disk; in a thread."""
    _roots.learn(roots)
    return open_local_model(source, roots, caps, refuse_hard_links=refuse_hard_links)


def open_local_inline(
    source: str, roots: Sequence[Path], *, refuse_hard_links: bool = False
) -> OpenedModel | None:
    """``open_local_model`` on the event loop for a single file, or None: open it in a thread.

    None unless every root was learnt on a local disk (``open_local_learning``) and the
    path names, below its root, a regular file reached with no symlink, ``..`` or mount on
    the way and no signature beside it. A source outside its roots, under a special tree or
    (with ``refuse_hard_links``) hard-linked raises the thread's own error; anything else,
    a missing file included, the thread judges.
    """
    held = _roots.held(roots)
    if held is None:
        return None
    allowed = [root for root, _fd in held]
    root, parts = locate_among(source, allowed)
    root_fd = held[allowed.index(root)][1]
    if not parts or any(part in ("", ".", "..") for part in parts):
        return None  # the root itself, or a climb: the walk applies it
    if parts[-1].endswith(INDEX_SUFFIX):
        return None  # a checkpoint's index: up to 16 MiB of JSON to read, and its shards
    relative = "/".join(parts)
    path = os.path.join(root.real, relative)
    refuse_special_tree(path, source)
    try:
        look = _openat2(root_fd, relative, _LOOK_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ENOSYS, errno.EPERM):  # no openat2 here: threads from now on
            _roots.unusable()
        # ENOENT too: the held root may be one renamed or replaced since it was learnt
        return None  # EXDEV (a mount), ELOOP (a symlink), ENOTDIR, EACCES: the walk's call
    try:
        seen = os.fstat(look)
        if not stat.S_ISREG(seen.st_mode) or _exists(root_fd, relative + SIGNATURE_SUFFIX):
            return None  # a folder, an index's folder, a device: the walk says which
        fd = _openat2(root_fd, relative, _FILE_FLAGS)
    except OSError:
        return None
    finally:
        os.close(look)
    try:
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != (seen.st_dev, seen.st_ino):
            raise SourceRefused(f"{source!r} changed while it was opened", code="file_changed")
        model = OpenedModel.single(ModelFile.adopt(path, fd, opened))
    except BaseException:
        os.close(fd)
        raise
    if refuse_hard_links:
        refuse_linked(model, source)
    return model


def _exists(dir_fd: int, relative: str) -> bool:
    """Whether ``relative`` is there (an error but ENOENT says yes: the thread looks)."""
    try:
        os.close(_openat2(dir_fd, relative, _LOOK_FLAGS))
    except FileNotFoundError:
        return False
    except OSError:
        pass
    return True
