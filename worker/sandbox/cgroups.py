"""A cgroup per load where the worker may create them: memory (and pids) limits, OOM kills read.

cgroup v2: the worker's own cgroup U must be delegated to it (writable, with
``memory`` in ``U/cgroup.controllers``). The no-internal-process rule forbids
enabling controllers for U's children while U holds processes, so the
supervisor first moves itself into a leaf ``U/loadwarden-<pid>-supervisor``,
then writes ``+memory +pids`` into ``U/cgroup.subtree_control`` and into that
of the per-worker cgroup ``U/loadwarden-<pid>``; only then does a per-load
``U/loadwarden-<pid>/child-<pid>/memory.max`` exist. Any other process left in U
makes the kernel answer EBUSY, which ``detect()`` reports.
cgroup v1: the memory controller's folder of the worker's own cgroup must be
writable (as on our CI machines); the pids controller is used too when its
folder is writable. Where neither works, ``detect()`` says why once and the
sandbox relies on rlimits (and the container's own limit).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import structlog

from loadwarden.worker.sandbox._sweep import sweep_dead
from loadwarden.worker.sandbox.memory_limit import cgroup_folder, own_cgroups

log = structlog.get_logger("loadwarden.sandbox")

ROOT = Path("/sys/fs/cgroup")
_SLASH = PurePosixPath("/")
#: What each load's cgroup limits, in the order they are enabled.
V2_CONTROLLERS = ("memory", "pids")
#: Threads for the cgroup calls made off the event loop (``CgroupManager.threads``). The
#: kernel serializes them on its cgroup mutex anyway; their own threads keep their waits
#: (a grace period) from holding the default executor's, which open, hash and verify models.
#: Their price, measured (bench: a 300-job tiny backlog, 46 rounds alternating with the commit
#: before they came, worker CPU): +0.2 ms per load (3.13 -> 3.32 ms, median), the hand-offs
#: (futex wakes of a GIL waiter on the loop, a thread waking, GIL waits). Not recovered by
#: keeping the GIL through the calls that take no cgroup lock (ctypes.PyDLL), by one hop
#: per load (the removal riding on the next placement) or by sys.setswitchinterval.
CGROUP_THREADS = 2
#: How long ``remove_soon`` waits for an unreaped child to leave its cgroup (not for a
#: process that escaped the kill: a thread blocked that long would delay other loads).
REMOVE_WAIT_S = 2.0


def _write(path: Path, text: str) -> None:
    """One write of a cgroup file. os-level, not Path.write_text: a load's cgroup takes
    about ten of these, and a text wrapper per call was a third of their cost (bench/tiny.py)."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _read(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 65536).decode()
    finally:
        os.close(fd)


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
                _write(folder / "cgroup.procs", str(pid))

    def oom_killed(self) -> bool:
        """Whether the kernel's OOM killer acted inside this cgroup."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            text = _read(self.memory / name)
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
            return int(_read(self.memory / name))
        except (OSError, ValueError):
            return None

    def remove(self, wait_s: float = 0.0) -> None:
        """Remove the (empty) cgroup folders; a failure leaves them to ``CgroupManager.close``.
        ``wait_s`` (in a thread: it blocks) is how long one may still hold a dying process
        (EBUSY): a child killed when no fork server was left to reap it first."""
        deadline = time.monotonic() + wait_s
        for folder in (self.pids, self.memory):
            if folder is not None:
                _rmdir(folder, deadline)


def _rmdir(folder: Path, deadline: float) -> None:
    while True:
        try:
            os.rmdir(folder)
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                return
        time.sleep(0.005)  # polled: cgroup v1 has no event for a cgroup that emptied


def _controllers(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except OSError:
        return []


def enable_controllers(folder: Path, controllers: Sequence[str]) -> list[str]:
    """Enable ``controllers`` for ``folder``'s children; returns those this call turned on."""
    missing = [c for c in controllers if c not in _controllers(folder / "cgroup.subtree_control")]
    if missing:
        (folder / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in missing))
    return missing


@dataclass(slots=True)
class Delegation:
    """What ``delegate_v2`` changed, so that ``undo`` can put it back."""

    unified: Path
    leaf: Path
    worker: Path
    enabled: list[str]
    controllers: tuple[str, ...] = ()  # what ``worker``'s children get (``_fresh``)

    def undo(self) -> None:
        """Best effort: the supervisor back into its cgroup, controllers off, folders gone."""
        with contextlib.suppress(OSError):
            self.worker.rmdir()
        if self.enabled:
            with contextlib.suppress(OSError):
                text = " ".join(f"-{c}" for c in reversed(self.enabled))
                (self.unified / "cgroup.subtree_control").write_text(text)
        with contextlib.suppress(OSError):
            (self.unified / "cgroup.procs").write_text(str(os.getpid()))
        with contextlib.suppress(OSError):
            self.leaf.rmdir()


def delegate_v2(unified: Path, tag: str, controllers: Sequence[str]) -> Delegation:
    """Make ``unified/tag`` a cgroup whose children get ``controllers``.

    Moves this process into the leaf ``unified/<tag>-supervisor`` first (the
    no-internal-process rule), then enables the controllers in ``unified`` and in
    ``unified/tag``. On failure everything done so far is undone and OSError raised.
    """
    leaf, worker = unified / f"{tag}-supervisor", unified / tag
    done = Delegation(unified, leaf, worker, [], tuple(controllers))
    try:
        leaf.mkdir(exist_ok=True)
        (leaf / "cgroup.procs").write_text(str(os.getpid()))
        try:
            done.enabled = enable_controllers(unified, controllers)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                others = (unified / "cgroup.procs").read_text().split()
                raise OSError(
                    exc.errno,
                    f"{unified} still holds other processes ({', '.join(others[:5])}); "
                    "run the worker as the only process of its cgroup",
                ) from exc
            raise
        worker.mkdir(exist_ok=True)
        enable_controllers(worker, controllers)
    except OSError:
        done.undo()
        raise
    return done


class CgroupManager:
    """Creates a cgroup per load under ``<own cgroup>/loadwarden-<pid>``."""

    def __init__(
        self,
        version: int,
        memory_base: Path,
        pids_base: Path | None,
        delegation: Delegation | None = None,
    ) -> None:
        self.version = version
        self.memory_base = memory_base
        self.pids_base = pids_base
        self.delegation = delegation
        #: Where cgroups are made, placed and removed off the event loop (see CGROUP_THREADS).
        self.threads = ThreadPoolExecutor(CGROUP_THREADS, thread_name_prefix="loadwarden-cgroup")
        #: Removals of finished loads' cgroups still running in ``threads`` (``remove_soon``).
        self._removing: set[Future[None]] = set()

    @property
    def mechanism(self) -> str:
        return f"cgroup_v{self.version}_memory" + ("+pids" if self.pids_base else "")

    @classmethod
    def detect(cls, root: Path = ROOT) -> tuple[CgroupManager | None, str]:
        """A manager if this worker may create cgroups, with a sentence saying what it found.

        ``root`` is where the cgroup filesystem is mounted (``Settings.cgroup_root``).
        """
        own = own_cgroups()
        if not own:
            return None, "cannot read /proc/self/cgroup"
        tag = f"loadwarden-{os.getpid()}"
        if "memory" in own:
            memory = cgroup_folder(root / "memory", _SLASH, own["memory"])
            if _writable_dir(memory):
                pids = cgroup_folder(root / "pids", _SLASH, own.get("pids", _SLASH))
                return cls._make(1, memory / tag, pids / tag if _writable_dir(pids) else None)
            return None, f"cgroup v1 memory folder {memory} is not writable"
        if "" in own:
            return cls._delegate(cgroup_folder(root, _SLASH, own[""]), tag)
        return None, "no memory cgroup controller is mounted"

    @classmethod
    def _delegate(cls, unified: Path, tag: str) -> tuple[CgroupManager | None, str]:
        available = _controllers(unified / "cgroup.controllers")
        if "memory" not in available:
            return None, (
                f"cgroup v2 {unified}: the memory controller is not delegated to it "
                f"(cgroup.controllers: {' '.join(available) or 'none'})"
            )
        if not _writable_dir(unified):
            return None, f"cgroup v2 folder {unified} is read-only (not delegated)"
        wanted = [c for c in V2_CONTROLLERS if c in available]
        sweep_dead(unified)
        try:
            delegation = delegate_v2(unified, tag, wanted)
        except OSError as exc:
            return None, f"cgroup v2 {unified}: cannot enable {' '.join(wanted)}: {exc.strerror}"
        worker = delegation.worker
        pids = worker if "pids" in wanted else None
        note = f"cgroup v2: supervisor in {delegation.leaf}, one cgroup per load under {worker}"
        return cls(2, worker, pids, delegation), note

    @classmethod
    def _make(
        cls, version: int, memory: Path, pids: Path | None
    ) -> tuple[CgroupManager | None, str]:
        for parent in {memory.parent, *([pids.parent] if pids is not None else [])}:
            sweep_dead(parent)
        try:
            memory.mkdir(exist_ok=True)
            if pids is not None and pids != memory:
                pids.mkdir(exist_ok=True)
        except OSError as exc:
            return None, f"cannot create {memory}: {exc.strerror}"
        return cls(version, memory, pids), f"cgroup v{version}: one cgroup per load under {memory}"

    def create(self, name: str, memory_bytes: int, pids_max: int) -> Cgroup:
        """A load's cgroup, its limits written (``prepare``, then ``limit``)."""
        cgroup = self.prepare(name, pids_max)
        try:
            self.limit(cgroup, memory_bytes)
        except OSError:
            cgroup.remove()
            raise
        return cgroup

    def prepare(self, name: str, pids_max: int) -> Cgroup:
        """A cgroup with its pids limit and no memory limit yet (a child forked ahead waits in
        one: running nothing of a load's until ``limit`` has been written)."""
        memory = self.memory_base / name
        pids = self.pids_base / name if self.pids_base else None
        cgroup = Cgroup(self.version, memory, pids if pids != memory else None)
        self._fresh(memory)
        try:
            if cgroup.pids is not None:
                self._fresh(cgroup.pids)
            if pids is not None:
                _write(pids / "pids.max", str(pids_max))
        except OSError:
            cgroup.remove()
            raise
        return cgroup

    def _fresh(self, folder: Path) -> None:
        """Make a load's folder, mending what another process may have done to ours. ENOENT:
        a worker beside us swept our own folder (``sweep_dead``, not seeing our pid): made
        again, or every later load fails until restart. EEXIST: left by an earlier child of
        the same pid (its removal failed), with counters (oom_kill, peak) and limits that
        would be read as this load's: removed first (EBUSY if it holds a process: not ours)."""
        try:
            os.mkdir(folder)
        except FileNotFoundError:
            folder.parent.mkdir(exist_ok=True)  # the other cgroup thread may have been first
            if self.delegation is not None:  # v2: its children get the controllers again
                enable_controllers(folder.parent, self.delegation.controllers)
            log.warning("cgroup_folder_restored", folder=str(folder.parent))
            os.mkdir(folder)
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):  # its removal ran meanwhile
                os.rmdir(folder)
            os.mkdir(folder)

    def limit(self, cgroup: Cgroup, memory_bytes: int) -> None:
        """Write a load's memory limit (swap included where the kernel accounts it)."""
        if self.version == 1:
            _write(cgroup.memory / "memory.limit_in_bytes", str(memory_bytes))
            with contextlib.suppress(OSError):  # no swap accounting on this kernel
                _write(cgroup.memory / "memory.memsw.limit_in_bytes", str(memory_bytes))
        else:
            _write(cgroup.memory / "memory.max", str(memory_bytes))
            with contextlib.suppress(OSError):
                _write(cgroup.memory / "memory.swap.max", "0")

    def remove_soon(self, cgroup: Cgroup, *, unreaped: bool = False) -> None:
        """Remove a finished load's cgroup in ``threads``, off the event loop and off the
        job's path (its figures are read already): rmdir takes the kernel's cgroup mutex,
        which a migration (a cgroup.procs write, ours for the next child or another
        process's) holds through an RCU grace period, 10-60 ms. ``drain`` waits for them.

        A bare ``submit``, not ``run_in_executor``: nothing on the loop waits for the
        removal, so its end need not wake the loop (one wake-up less per load).
        ``unreaped``: its child was killed with no fork server left to reap it first, and
        may not have left yet: wait for that (``REMOVE_WAIT_S``), in the thread."""
        removing = self.threads.submit(cgroup.remove, REMOVE_WAIT_S if unreaped else 0.0)
        self._removing.add(removing)
        removing.add_done_callback(self._removing.discard)  # in the thread, or here if done

    async def drain(self) -> None:
        """Wait until every ``remove_soon`` has run (before ``close``)."""
        while pending := list(self._removing):
            await asyncio.gather(*map(asyncio.wrap_future, pending))

    def close(self) -> None:
        """Remove the worker's own folders (after every load's cgroup is gone: ``drain``)."""
        self.threads.shutdown(wait=True)
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
        if self.delegation is not None:
            self.delegation.undo()
