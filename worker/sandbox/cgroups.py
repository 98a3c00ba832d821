"""A cgroup per load where the worker may create them: memory (and pids) limits, OOM kills read.

cgroup v2: the worker's own cgroup must be a delegated, writable subtree with the
memory controller enabled for children. cgroup v1: the memory controller's
folder of the worker's own cgroup must be writable (as on our CI machines);
the pids controller is used too when its folder is writable. Where neither
works, ``detect()`` says why once and the sandbox relies on rlimits.
"""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


def _own_paths() -> dict[str, str]:
    """This process's cgroup path per controller ("" is the v2 unified hierarchy)."""
    paths: dict[str, str] = {}
    with open("/proc/self/cgroup") as fh:
        for line in fh.read().splitlines():
            _, controllers, path = line.split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                paths[controller] = path
    return paths


def _writable_dir(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


@dataclass(frozen=True, slots=True)
class Cgroup:
    """The cgroup(s) of one load."""

    version: int
    memory: Path
    pids: Path | None

    def add(self, pid: int) -> None:
        for folder in (self.memory, self.pids):
            if folder is not None:
                (folder / "cgroup.procs").write_text(str(pid))

    def oom_killed(self) -> bool:
        """Whether the kernel's OOM killer acted inside this cgroup."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            text = (self.memory / name).read_text()
        except OSError:
            return False
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and int(value) > 0:
                return True
        return False

    def peak_bytes(self) -> int | None:
        """The cgroup's peak memory use (anonymous memory and page cache it charged)."""
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        try:
            return int((self.memory / name).read_text())
        except (OSError, ValueError):
            return None

    def remove(self) -> None:
        """Remove the (empty) cgroup folders; a failure leaves them for the next sweep."""
        for folder in (self.pids, self.memory):
            if folder is not None:
                with contextlib.suppress(OSError):
                    folder.rmdir()


class CgroupManager:
    """Creates a cgroup per load under ``<own cgroup>/loadwarden-<pid>``."""

    def __init__(self, version: int, memory_base: Path, pids_base: Path | None) -> None:
        self.version = version
        self.memory_base = memory_base
        self.pids_base = pids_base

    @property
    def mechanism(self) -> str:
        return f"cgroup_v{self.version}_memory" + ("+pids" if self.pids_base else "")

    @classmethod
    def detect(cls) -> tuple[CgroupManager | None, str]:
        """A manager if this worker may create cgroups, with a sentence saying what it found."""
        try:
            own = _own_paths()
        except OSError as exc:
            return None, f"cannot read /proc/self/cgroup: {exc}"
        tag = f"loadwarden-{os.getpid()}"
        if "memory" in own:
            memory = ROOT / "memory" / own["memory"].lstrip("/")
            if _writable_dir(memory):
                pids = ROOT / "pids" / own.get("pids", "/").lstrip("/")
                return cls._make(1, memory / tag, pids / tag if _writable_dir(pids) else None)
            return None, f"cgroup v1 memory folder {memory} is not writable"
        if "" in own:
            unified = ROOT / own[""].lstrip("/")
            try:
                controllers = (unified / "cgroup.subtree_control").read_text().split()
            except OSError:
                controllers = []
            if _writable_dir(unified) and "memory" in controllers:
                return cls._make(2, unified / tag, unified / tag if "pids" in controllers else None)
            return None, f"cgroup v2 folder {unified} is not a delegated subtree with memory"
        return None, "no memory cgroup controller is mounted"

    @classmethod
    def _make(
        cls, version: int, memory: Path, pids: Path | None
    ) -> tuple[CgroupManager | None, str]:
        try:
            memory.mkdir(exist_ok=True)
            if pids is not None and pids != memory:
                pids.mkdir(exist_ok=True)
        except OSError as exc:
            return None, f"cannot create {memory}: {exc.strerror}"
        return cls(version, memory, pids), f"cgroup v{version}: one cgroup per load under {memory}"

    def create(self, name: str, memory_bytes: int, pids_max: int) -> Cgroup:
        memory = self.memory_base / name
        pids = self.pids_base / name if self.pids_base else None
        memory.mkdir()
        if self.version == 1:
            (memory / "memory.limit_in_bytes").write_text(str(memory_bytes))
            with contextlib.suppress(OSError):  # no swap accounting on this kernel
                (memory / "memory.memsw.limit_in_bytes").write_text(str(memory_bytes))
        else:
            (memory / "memory.max").write_text(str(memory_bytes))
            with contextlib.suppress(OSError):
                (memory / "memory.swap.max").write_text("0")
        if pids is not None:
            if pids != memory:
                pids.mkdir()
            (pids / "pids.max").write_text(str(pids_max))
        return Cgroup(self.version, memory, pids if pids != memory else None)

    def close(self) -> None:
        """Remove the worker's own folders (after every load's cgroup is gone)."""
        for base in (self.pids_base, self.memory_base):
            if base is None:
                continue
            for child in base.iterdir() if base.exists() else []:
                if child.is_dir():
                    with contextlib.suppress(OSError):
                        child.rmdir()
            try:
                base.rmdir()
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.EBUSY):
                    raise
