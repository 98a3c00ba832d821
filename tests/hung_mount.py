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

_MS_NOSUID, _MS_NODEV, _MNT_DETACH = 2, 4, 2
_libc = ctypes.CDLL(None, use_errno=True)


def can_mount() -> str | None:
    """Why no FUSE mount can be made here, or None."""
    if os.geteuid() != 0:
        return "FUSE mounts need root"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "no /dev/fuse"
    return None


@contextlib.contextmanager
def hung_mount(target: Path, *, directory: bool = True) -> Iterator[None]:
    """A FUSE filesystem mounted on ``target`` (a folder, or a file when not ``directory``)
    that no daemon serves; unmounted (and its waiters released) on exit."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    mode = "40000" if directory else "100000"
    options = f"fd={fd},rootmode={mode},user_id=0,group_id=0".encode()
    if _libc.mount(b"hung", os.fsencode(target), b"fuse", _MS_NOSUID | _MS_NODEV, options):
        err = ctypes.get_errno()
        os.close(fd)
        raise OSError(err, os.strerror(err), str(target))
    try:
        yield
    finally:
        _libc.umount2(os.fsencode(target), _MNT_DETACH)
        os.close(fd)  # aborts the connection: any waiter gets ENOTCONN


@contextlib.contextmanager
def tmpfs_mount(target: Path) -> Iterator[None]:
    """A tmpfs mounted on ``target`` (a change to the mount table), unmounted on exit."""
    if _libc.mount(b"none", os.fsencode(target), b"tmpfs", _MS_NOSUID | _MS_NODEV, None):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(target))
    try:
        yield
    finally:
        _libc.umount2(os.fsencode(target), _MNT_DETACH)


def main(root: str, *sources: str) -> None:
    from loadwarden.worker.sources._ondisk import _roots, open_local_inline

    _roots.learn([Path(root)])
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
