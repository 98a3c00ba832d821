"""A FUSE mount whose daemon never answers: every look-up below it waits (killably) until
the mount is torn down, as under a hung network or FUSE filesystem.

Run as a script to try an inline open (``_ondisk.open_local_inline``) under a root that
holds such a mount: it prints what the open gave, or hangs (the test kills it).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from loadwarden.worker._libc import libc

_MS_NOSUID, _MS_NODEV, _MNT_DETACH = 2, 4, 2


def can_mount() -> str | None:
    """Why no FUSE mount can be made here, or None."""
    if os.geteuid() != 0:
        return "FUSE mounts need root"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "no /dev/fuse"
    return None


@contextlib.contextmanager
def mounted(kind: bytes, target: Path, options: bytes | None) -> Iterator[None]:
    """A filesystem of ``kind`` mounted on ``target``, detached on exit."""
    if libc().mount(kind, os.fsencode(target), kind, _MS_NOSUID | _MS_NODEV, options):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(target))
    try:
        yield
    finally:
        libc().umount2(os.fsencode(target), _MNT_DETACH)


@contextlib.contextmanager
def hung_mount(target: Path, *, directory: bool = True) -> Iterator[None]:
    """A FUSE filesystem mounted on ``target`` (a folder, or a file when not ``directory``)
    that no daemon serves; unmounted (and its waiters released) on exit."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    mode = "40000" if directory else "100000"
    try:
        with mounted(b"fuse", target, f"fd={fd},rootmode={mode},user_id=0,group_id=0".encode()):
            yield
    finally:
        os.close(fd)  # after the detach: aborts the connection, any waiter gets ENOTCONN


def tmpfs_mount(target: Path) -> contextlib.AbstractContextManager[None]:
    """A tmpfs mounted on ``target`` (a change to the mount table), unmounted on exit."""
    return mounted(b"tmpfs", target, None)


def overlay_mount(lower: Path, target: Path) -> contextlib.AbstractContextManager[None]:
    """A read-only overlayfs of ``lower`` on ``target`` (made), unmounted on exit."""
    target.mkdir(parents=True, exist_ok=True)
    empty = target.with_name(target.name + ".empty")
    empty.mkdir(exist_ok=True)
    return mounted(b"overlay", target, f"lowerdir={lower}:{empty}".encode())  # no upper


def main(root: str, *sources: str) -> None:
    from loadwarden.worker.sources._ondisk import _roots, open_local_inline

    _roots.learn([Path(root)])
    assert _roots.learnt[root].fd is not None, "the root is not learnt as on a local disk"
    for source in sources:
        try:
            opened = open_local_inline(source, [Path(root)])
        except Exception as exc:  # printed for the test to judge
            print(f"{source}: {type(exc).__name__} {getattr(exc, 'code', '')}", flush=True)
            continue
        print(f"{source}: {'thread' if opened is None else 'opened'}", flush=True)
        if opened is not None:
            opened.close()


if __name__ == "__main__":
    main(sys.argv[1], *sys.argv[2:])
