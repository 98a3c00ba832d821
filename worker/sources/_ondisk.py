"""What lets a local open run on the event loop: roots seen on a local disk, and the bail-out.

A network filesystem's metadata calls may wait on a server (for ever, when it is hard-mounted
and gone): those opens stay in a thread. A root an open in a thread found on a local-disk
filesystem (``_fstype.LOCAL_FILESYSTEMS``) is noted with its device; a later open under it
may run on the loop (``_local.open_local_inline``), and bails out to a thread
(``NeedsThread``) at the first component on another device, or a root remounted.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from loadwarden.worker.sources._fstype import on_local_disk

#: Allowed roots (as given, made absolute) an open in a thread looked at: their device when
#: on a local-disk filesystem (later opens under them may run on the event loop), else None.
local_roots: dict[str, int | None] = {}


class NeedsThread(Exception):
    """An open on the event loop met what could block or take long (another filesystem, a
    folder or an index to read, a signature): nothing it opened is left open."""


def learn_roots(roots: Sequence[Path]) -> None:
    """Note, once, which roots are on a local disk (``open_local_inline``); in a thread."""
    for given in [os.path.abspath(r) for r in roots] or [os.getcwd()]:
        if given in local_roots:
            continue
        try:
            fd = os.open(given, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:  # the open itself says why, if this root is the one used
            continue
        try:
            local_roots[given] = os.fstat(fd).st_dev if on_local_disk(fd) else None
        except OSError:
            pass
        finally:
            os.close(fd)


def root_device(given: str, root_fd: int) -> int:
    """The device noted for the root ``given``, or ``NeedsThread`` (``root_fd`` closed) when
    it is not the one it is on now (remounted: the next open in a thread looks again)."""
    device = local_roots.get(given)
    if device is None or os.fstat(root_fd).st_dev != device:
        os.close(root_fd)
        local_roots.pop(given, None)
        raise NeedsThread(given)
    return device


def exists(dir_fd: int, name: str) -> bool:
    """Whether ``name`` is in ``dir_fd`` (an error but ENOENT says yes: the thread looks)."""
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    except OSError:
        pass
    return True
