"""The memory budget as a container sees it: cgroup v1 and v2 layouts, with and without cgroupns.

Each case builds the files a container would see (``/proc/self/cgroup``,
``/proc/self/mountinfo`` and the ``/sys/fs/cgroup`` tree) under ``tmp_path`` and
points the detection at it: the layouts are test data, the code reads real files.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from loadwarden.worker.config import Settings
from loadwarden.worker.load.admission import detect_memory_bytes
from loadwarden.worker.load.supervisor import Supervisor
from loadwarden.worker.sandbox.memory_limit import detect_memory_limit

GiB = 1 << 30
POD = "/kubepods/burstable/pod6f1c/3a9e0c"
SCOPE = "/kubepods.slice/kubepods-pod6f1c.slice/cri-containerd-3a9e0c.scope"
#: What a v1 node says for "no limit" (page-aligned LONG_MAX).
V1_UNLIMITED = "9223372036854771712"


def _layout(
    root: Path,
    proc_cgroup: str,
    mountinfo: str | None,
    files: dict[str, str],
) -> Path:
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text(proc_cgroup)
    if mountinfo is not None:
        (root / "proc/self/mountinfo").write_text(mountinfo)
    for name, text in files.items():
        path = root / name.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return root


def _v1_mountinfo(memory_root: str) -> str:
    return (
        "24 30 0:22 / /sys/fs/cgroup ro,nosuid,nodev,noexec - tmpfs tmpfs ro,mode=755\n"
        f"35 24 0:30 {memory_root} /sys/fs/cgroup/memory ro,nosuid,nodev,noexec,relatime "
        "master:15 - cgroup cgroup rw,memory\n"
        f"36 24 0:31 {memory_root} /sys/fs/cgroup/pids ro,nosuid,nodev,noexec,relatime "
        "master:16 - cgroup cgroup rw,pids\n"
    )


def _v1_cgroup(path: str) -> str:
    return f"12:pids:{path}\n4:memory:{path}\n1:name=systemd:{path}\n0::/\n"


@pytest.mark.parametrize("mountinfo", [True, False], ids=["mountinfo", "no-mountinfo"])
def test_v1_container_without_cgroup_namespace(tmp_path: Path, mountinfo: bool) -> None:
    """v1, no cgroupns: /proc/self/cgroup names the host path, the mount is the container's."""
    root = _layout(
        tmp_path,
        _v1_cgroup(POD),
        _v1_mountinfo(POD) if mountinfo else None,
        {
            "/sys/fs/cgroup/memory/memory.limit_in_bytes": str(4 * GiB),
            "/sys/fs/cgroup/memory/memory.stat": f"cache 0\nhierarchical_memory_limit {4 * GiB}",
        },
    )
    found = detect_memory_limit(root)
    assert found.limit_bytes == 4 * GiB, found
    assert "/sys/fs/cgroup/memory/" in found.source


def test_v1_container_with_cgroup_namespace(tmp_path: Path) -> None:
    """cgroup v1 with cgroupns: everything reads "/", the limit is at the mount point."""
    root = _layout(
        tmp_path,
        _v1_cgroup("/"),
        _v1_mountinfo("/"),
        {"/sys/fs/cgroup/memory/memory.limit_in_bytes": str(3 * GiB)},
    )
    assert detect_memory_limit(root).limit_bytes == 3 * GiB


def test_v1_host_takes_an_ancestors_tighter_limit(tmp_path: Path) -> None:
    """On a v1 host the worker's own cgroup is unlimited but its parent is not: the parent binds."""
    root = _layout(
        tmp_path,
        _v1_cgroup("/workers/w1"),
        _v1_mountinfo("/"),
        {
            "/sys/fs/cgroup/memory/memory.limit_in_bytes": V1_UNLIMITED,
            "/sys/fs/cgroup/memory/workers/memory.limit_in_bytes": str(6 * GiB),
            "/sys/fs/cgroup/memory/workers/w1/memory.limit_in_bytes": V1_UNLIMITED,
        },
    )
    assert detect_memory_limit(root).limit_bytes == 6 * GiB


def _v2_mountinfo(mount_root: str) -> str:
    return (
        f"30 25 0:26 {mount_root} /sys/fs/cgroup ro,nosuid,nodev,noexec,relatime "
        "- cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n"
    )


@pytest.mark.parametrize("namespaced", [True, False], ids=["cgroupns", "no-cgroupns"])
def test_v2_container(tmp_path: Path, namespaced: bool) -> None:
    """cgroup v2 with or without cgroupns: the container's memory.max is found."""
    path = "/" if namespaced else SCOPE
    root = _layout(
        tmp_path,
        f"0::{path}\n",
        _v2_mountinfo(path),
        {"/sys/fs/cgroup/memory.max": str(2 * GiB), "/sys/fs/cgroup/cgroup.controllers": "memory"},
    )
    found = detect_memory_limit(root)
    assert found.limit_bytes == 2 * GiB, found
    assert found.source == "cgroup v2 /sys/fs/cgroup/memory.max"


def test_v2_nested_cgroup_limited_by_parent(tmp_path: Path) -> None:
    """v2: a worker in a sub-cgroup with memory.max "max" is bound by its parent's limit."""
    root = _layout(
        tmp_path,
        "0::/pod/worker\n",
        _v2_mountinfo("/"),
        {
            "/sys/fs/cgroup/pod/memory.max": str(5 * GiB),
            "/sys/fs/cgroup/pod/worker/memory.max": "max",
        },
    )
    assert detect_memory_limit(root).limit_bytes == 5 * GiB


def test_no_limit_anywhere_falls_back_to_the_machine(tmp_path: Path) -> None:
    """No limit in any layout: none is reported, and the budget is the machine's memory."""
    root = _layout(
        tmp_path, "0::/\n", _v2_mountinfo("/"), {"/sys/fs/cgroup/cgroup.controllers": "memory"}
    )
    found = detect_memory_limit(root)
    assert found.limit_bytes is None and "no limit" in found.source
    assert detect_memory_bytes(root) > 0


def test_the_stated_container_memory_sets_the_budget() -> None:
    """LOADWARDEN_CONTAINER_MEMORY_BYTES (downward API) minus the reserve is the budget."""
    settings = Settings(container_memory_bytes=4 * GiB, memory_reserve_bytes=GiB // 2)
    assert Supervisor(settings).admission.budget_bytes == 4 * GiB - GiB // 2
