"""Per-load cgroups: v2 delegation on a real cgroup2 hierarchy, fail-closed settings, labels.

The v2 test mounts a cgroup2 hierarchy in a private mount namespace (``unshare
--mount``, which needs root) and runs the delegation there in a child process.
On a host whose memory and pids controllers are bound to cgroup v1 (this CI
machine), cgroup2 offers only the controllers v1 does not hold (``hugetlb``):
the test then delegates that one. The kernel enforces the no-internal-process
rule the same way for every controller, which is what the test is about.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loadwarden.producer.contract import LoadRequest, Outcome
from loadwarden.worker.config import Settings
from loadwarden.worker.load.supervisor import Supervisor
from loadwarden.worker.sandbox import _seccomp
from loadwarden.worker.sandbox._landlock import abi_version
from loadwarden.worker.sandbox.cgroups import CgroupManager
from loadwarden.worker.sandbox.children import SandboxError
from loadwarden.worker.sandbox.forkserver import ForkServer
from tests.conftest import TEST_LOADERS, require_cgroups, require_facility

#: Runs in the private mount namespace with cgroup2 mounted at argv[1].
V2_SCRIPT = r"""
import errno, json, os, sys
from pathlib import Path
from loadwarden.worker.sandbox.cgroups import CgroupManager, delegate_v2, enable_controllers

mnt = Path(sys.argv[1])
available = (mnt / "cgroup.controllers").read_text().split()
wanted = [c for c in ("memory", "pids") if c in available] or available[:1]
out = {"available": available, "wanted": wanted}
if not wanted:
    print(json.dumps(out)); sys.exit(0)
root_enabled = enable_controllers(mnt, wanted)  # the root is exempt from the rule
box = mnt / f"lw-test-{os.getpid()}"            # stands in for a pod's delegated cgroup
box.mkdir()
try:
    (box / "cgroup.procs").write_text(str(os.getpid()))
    try:
        enable_controllers(box, wanted)
        out["enable_while_inside"] = "ok"
    except OSError as exc:
        out["enable_while_inside"] = errno.errorcode[exc.errno]
    done = delegate_v2(box, "loadwarden-test", wanted)
    out["own_cgroup"] = Path("/proc/self/cgroup").read_text().splitlines()[-1]
    out["box_subtree"] = (box / "cgroup.subtree_control").read_text().split()
    out["worker_subtree"] = (done.worker / "cgroup.subtree_control").read_text().split()
    load = done.worker / "child-1"
    load.mkdir()
    out["load_files"] = sorted(p.name for p in load.iterdir())
    load.rmdir()
    manager = CgroupManager(2, done.worker, done.worker if "pids" in wanted else None, done)
    manager.threads.shutdown()
    done.worker.rmdir()  # swept by a worker that could not see our pid
    manager.prepare("child-2", 16).remove()
    out["restored_subtree"] = (done.worker / "cgroup.subtree_control").read_text().split()
    done.undo()
    out["after_undo"] = sorted(p.name for p in box.iterdir() if p.is_dir())
finally:
    (mnt / "cgroup.procs").write_text(str(os.getpid()))
    box.rmdir()
    if root_enabled:
        (mnt / "cgroup.subtree_control").write_text(" ".join("-" + c for c in root_enabled))
print(json.dumps(out))
"""


def _run_in_cgroup2_namespace(tmp_path: Path) -> dict[str, object]:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("mounting a cgroup2 hierarchy needs root and util-linux's unshare")
    mnt = tmp_path / "cgroup2"
    mnt.mkdir()
    shell = 'mount -t cgroup2 none "$1" || exit 77; shift; exec "$@"'
    unshare = ["unshare", "--mount", "--propagation", "private", "sh", "-c", shell, "sh"]
    done = subprocess.run(
        [*unshare, str(mnt), sys.executable, "-c", V2_SCRIPT, str(mnt)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode == 77:
        pytest.skip(f"this kernel does not let us mount cgroup2: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.splitlines()[-1])  # after any log
    return result


def test_v2_delegation_moves_the_supervisor_into_a_leaf(tmp_path: Path) -> None:
    """Real cgroup2: enabling controllers fails EBUSY from inside; after the leaf move it works."""
    out = _run_in_cgroup2_namespace(tmp_path)
    wanted = out["wanted"]
    if not wanted:
        pytest.skip(f"cgroup2 here offers no controller at all: {out['available']}")
    assert isinstance(wanted, list)
    # The no-internal-process rule: a cgroup holding a process cannot enable controllers.
    assert out["enable_while_inside"] == "EBUSY"
    assert str(out["own_cgroup"]).endswith("/loadwarden-test-supervisor")
    assert set(wanted) <= set(out["box_subtree"])  # type: ignore[arg-type]
    assert set(wanted) <= set(out["worker_subtree"])  # type: ignore[arg-type]
    # The worker's folder swept and made again by the next load: its controllers with it.
    assert out["restored_subtree"] == out["worker_subtree"]
    # A per-load cgroup gets each controller's files: memory.max where memory is delegated.
    load_files = out["load_files"]
    assert isinstance(load_files, list)
    for controller in wanted:
        assert any(name.startswith(f"{controller}.") for name in load_files), load_files
    if "memory" in wanted:
        assert "memory.max" in load_files
    assert out["after_undo"] == []


def test_v2_subtree_control_files_are_written(tmp_path: Path) -> None:
    """Detection on a delegated v2 layout asks for +memory +pids in both subtree_control files."""
    # A plain folder tree: the kernel's rules are covered above; this checks what is written.
    unified = tmp_path / "pod"
    unified.mkdir()
    (unified / "cgroup.controllers").write_text("cpu memory pids\n")
    (unified / "cgroup.subtree_control").write_text("\n")
    (unified / "cgroup.procs").write_text("")
    from loadwarden.worker.sandbox.cgroups import delegate_v2

    done = delegate_v2(unified, "loadwarden-1", ["memory", "pids"])
    assert (unified / "cgroup.subtree_control").read_text() == "+memory +pids"
    assert (done.leaf / "cgroup.procs").read_text() == str(os.getpid())
    assert done.enabled == ["memory", "pids"]


def test_detection_says_why_without_a_cgroup_filesystem(tmp_path: Path) -> None:
    """With nothing mounted where cgroups are expected, detection returns no manager and why."""
    manager, note = CgroupManager.detect(tmp_path)
    assert manager is None
    assert "not" in note and str(tmp_path) in note


async def test_require_cgroups_refuses_to_start(tmp_path: Path) -> None:
    """require_cgroups with no usable cgroup filesystem: the supervisor refuses to start."""
    supervisor = Supervisor(Settings(require_cgroups=True, cgroup_root=tmp_path))
    with pytest.raises(SandboxError, match="require_cgroups"):
        await supervisor.start()
    assert supervisor.forkserver.pid is None  # no fork server was started


async def test_require_landlock_follows_the_kernel() -> None:
    """require_landlock starts where the kernel has Landlock and refuses where it has none."""
    supervisor = Supervisor(Settings(require_landlock=True, use_cgroups=False))
    if abi_version():
        async with supervisor:
            labels = supervisor.confinement_labels()
        assert labels["landlock"] == f"abi{abi_version()}"
    else:
        with pytest.raises(SandboxError, match="require_landlock"):
            await supervisor.start()


def test_a_requirement_without_its_mechanism_is_a_settings_error() -> None:
    """require_cgroups with use_cgroups off would refuse every start: rejected as settings."""
    with pytest.raises(ValueError, match="require_cgroups needs use_cgroups"):
        Settings(require_cgroups=True, use_cgroups=False)


#: Both seccomp filters, as the label names them (the socket filter, then the child's own).
SECCOMP_LABEL = "no_sockets+no_new_sessions+signals_own_group+no_ptrace"


async def test_confinement_is_exported_as_labels(tmp_path: Path, small_model: Path) -> None:
    """loadwarden_confinement_info carries what confines loads: cgroups, landlock, and seccomp
    naming each filter a load's report lists (no sockets; sessions, signals, ptrace)."""
    async with Supervisor(Settings(cgroup_root=tmp_path)) as supervisor:
        seccomp = SECCOMP_LABEL if _seccomp.available() else "none"
        sample = supervisor.metrics.registry.get_sample_value(
            "loadwarden_confinement_info",
            {
                "cgroups": "none",
                "landlock": f"abi{abi_version()}" if abi_version() else "none",
                "seccomp": seccomp,
                "address_space_limit": "on",
            },
        )
        report = await supervisor.load(LoadRequest(source=str(small_model)))
    assert sample == 1
    assert report.outcome is Outcome.OK, report.error
    reported = sorted(c.removeprefix("seccomp_") for c in report.confinement if "seccomp" in c)
    assert reported == sorted(seccomp.split("+")) if seccomp != "none" else reported == []


def test_a_killed_workers_folders_are_swept_by_the_next(tmp_path: Path) -> None:
    """A worker killed by SIGKILL leaves ``loadwarden-<pid>`` (and its loads' folders) in
    its cgroup; the next worker there removes them, and leaves a live worker's alone."""
    manager = _manager()
    parent = manager.memory_base.parent
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that was a process and is no more
    dead, live = parent / f"loadwarden-{gone.pid}", parent / "loadwarden-1"  # pid 1 lives
    try:
        (dead / "child-7").mkdir(parents=True)
        live.mkdir()
        again, _ = CgroupManager.detect()
        assert again is not None
        again.threads.shutdown()  # the same folders as ``manager``'s: closed once, below
        assert not dead.exists(), "the dead worker's folders were left"
        assert live.is_dir(), "a live worker's folder was removed"
        assert manager.memory_base.is_dir(), "this (live) worker's own folder was removed"
    finally:
        for folder in (dead / "child-7", dead, live):
            with contextlib.suppress(OSError):
                folder.rmdir()
        manager.close()


def _manager() -> CgroupManager:
    manager, note = CgroupManager.detect()
    require_facility(manager is not None, f"needs cgroups this worker may create: {note}")
    assert manager is not None
    return manager


def _bases(manager: CgroupManager) -> list[Path]:
    return list(dict.fromkeys(b for b in (manager.memory_base, manager.pids_base) if b))


def test_a_swept_worker_folder_is_made_again() -> None:
    """Our empty ``loadwarden-<pid>`` swept by a worker that could not see our pid (another
    pid namespace sharing the tree): the next load's cgroup is made anyway, limits and all."""
    manager = _manager()
    try:
        for base in _bases(manager):
            base.rmdir()  # what that worker's ``sweep_dead`` does
        cgroup = manager.create("child-1", 64 << 20, 16)
        try:
            limit = "memory.limit_in_bytes" if cgroup.version == 1 else "memory.max"
            assert int((cgroup.memory / limit).read_text()) == 64 << 20
            if cgroup.pids is not None:
                assert (cgroup.pids / "pids.max").read_text().strip() == "16"
        finally:
            cgroup.remove()
        assert all(base.is_dir() for base in _bases(manager))
    finally:
        manager.close()


def test_a_stale_load_folder_of_the_same_name_is_replaced() -> None:
    """A ``child-<pid>`` left by an earlier child of the same pid (its removal failed) is
    replaced by a fresh one: its old limits are not the new load's."""
    manager = _manager()
    try:
        stale = manager.prepare("child-2", 16)
        manager.limit(stale, 32 << 20)
        fresh = manager.prepare("child-2", 16)  # the pid reused: the same name again
        try:
            limit = "memory.limit_in_bytes" if fresh.version == 1 else "memory.max"
            assert (fresh.memory / limit).read_text().strip() != str(32 << 20)
        finally:
            fresh.remove()
    finally:
        manager.close()


def test_a_stale_load_folder_holding_a_process_is_left_alone() -> None:
    """A stale ``child-<pid>`` that still holds a process is not taken over: the new cgroup
    fails (the load is a retried crash) and the process stays where it was."""
    manager = _manager()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        stale = manager.prepare("child-3", 16)
        stale.add(holder.pid)
        with pytest.raises(OSError, match="busy"):  # EBUSY
            manager.prepare("child-3", 16)
        assert str(holder.pid) in (stale.memory / "cgroup.procs").read_text().split()
    finally:
        holder.kill()
        holder.communicate()
        manager.close()


async def test_a_load_runs_after_the_workers_folder_was_swept(small_model: Path) -> None:
    """Through the supervisor: the folder swept while no child waited in it (none forked
    ahead), the next load still runs confined by its cgroup and ends ok."""
    forkserver = ForkServer(preload=[TEST_LOADERS], ready=0)
    async with Supervisor(Settings(), forkserver=forkserver) as sup:
        require_cgroups(sup)
        assert sup.cgroups is not None
        for base in _bases(sup.cgroups):
            base.rmdir()
        report = await sup.load(LoadRequest(source=str(small_model)))
    assert report.outcome is Outcome.OK, report.error
    assert sup.cgroups.mechanism in report.confinement


async def test_a_cgroup_is_removed_once_its_killed_child_has_left() -> None:
    """A child killed with no fork server left to reap it first may still be in its cgroup
    when the load ends: ``remove_soon`` removes the cgroup once it has left, not never."""
    manager = _manager()
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import sys; sys.stdin.read()", stdin=asyncio.subprocess.PIPE
    )
    try:
        cgroup = manager.prepare("child-4", 16)
        cgroup.add(holder.pid)
        manager.remove_soon(cgroup, unreaped=True)  # finds it busy: the child is still there
        assert holder.stdin is not None
        holder.stdin.close()  # it leaves now
        await holder.wait()
        await manager.drain()
        assert not cgroup.memory.exists(), "the cgroup was left"
        assert cgroup.pids is None or not cgroup.pids.exists()
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()
        manager.close()
