"""The cgroup folders that killed workers left (``CgroupManager.detect`` sweeps them first)."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

#: A worker's own folders (``loadwarden-<pid>``, and on v2 its ``-supervisor`` leaf).
_WORKER_FOLDER = re.compile(r"loadwarden-(\d+)(?:-supervisor)?")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _holds_processes(folder: Path) -> bool:
    for procs in (folder / "cgroup.procs", *folder.glob("*/cgroup.procs")):
        with contextlib.suppress(OSError):
            if procs.read_text().strip():
                return True
    return False


def sweep_dead(parent: Path) -> list[str]:
    """Remove the folders that workers killed by SIGKILL (or a lost node) left in ``parent``:
    ``loadwarden-<pid>`` with its loads' folders, where that pid is gone and nothing in them
    holds a process. A worker that is alive, or a folder still holding a process (a load
    child that outlived its worker), is left alone. A live worker whose pid we cannot see
    (another pid namespace on the tree) may lose its empty folder: it makes it again
    (``CgroupManager._fresh``)."""
    removed: list[str] = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        found = _WORKER_FOLDER.fullmatch(entry.name)
        if found is None or not entry.is_dir(follow_symlinks=False) or _alive(int(found[1])):
            continue
        folder = Path(entry.path)
        try:  # another worker starting beside us may sweep it first; a folder not ours
            if _holds_processes(folder):
                continue
            for load in folder.iterdir():
                if load.is_dir():
                    with contextlib.suppress(OSError):
                        load.rmdir()
            folder.rmdir()
        except OSError:
            continue
        removed.append(entry.name)
    return removed
