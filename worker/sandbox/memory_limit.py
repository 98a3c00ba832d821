"""The memory limit as a container sees it: cgroup v1 or v2, with or without a cgroup namespace.

``/proc/self/cgroup`` names this process's cgroup *in the hierarchy*, while
``/sys/fs/cgroup`` shows only the part of the hierarchy that was mounted into
the container. In a cgroup-v1 container without a cgroup namespace (Docker's
and most Kubernetes nodes' v1 default) the two disagree: ``/proc/self/cgroup``
says ``/kubepods/burstable/pod…/<id>`` while ``/sys/fs/cgroup/memory`` *is*
that folder. Joining the two names a folder that does not exist, the limit is
missed, and the budget becomes the node's RAM. So the cgroup path is taken
relative to the mount's own root (the fourth field of ``/proc/self/mountinfo``),
and when that still names nothing, the mount point's own files are read: in a
container they are the container's.

Every path is read under ``root`` (``/`` in production) so tests point the
detection at fixture trees of both layouts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

#: A cgroup v1 "no limit" reads as a huge page-aligned number; anything above this is unlimited.
UNLIMITED = 1 << 60
_SLASH = PurePosixPath("/")


@dataclass(frozen=True, slots=True)
class CgroupMount:
    """One cgroup filesystem mount: where it is and which hierarchy path it shows."""

    mount_point: PurePosixPath
    #: The hierarchy path mounted there ("/" with a cgroup namespace, or on the host).
    root: PurePosixPath


@dataclass(frozen=True, slots=True)
class MemoryLimit:
    """The tightest memory limit over this process's cgroup and its visible ancestors."""

    limit_bytes: int | None
    #: Which file it came from, or why none was found (for the worker's start-up log).
    source: str


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    try:
        value = int(text)
    except ValueError:  # "max", or empty
        return None
    return value if 0 < value < UNLIMITED else None


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (``\\040``)."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def memory_mounts(root: Path = Path("/")) -> dict[int, CgroupMount]:
    """The v2 mount (key 2) and the v1 memory-controller mount (key 1), from mountinfo."""
    found: dict[int, CgroupMount] = {}
    try:
        lines = (root / "proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        # id parent major:minor root mount-point options [optional...] - fstype source super
        head, sep, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if not sep or len(fields) < 5 or len(rest) < 3:
            continue
        version = {"cgroup2": 2, "cgroup": 1}.get(rest[0])
        if version is None or (version == 1 and "memory" not in rest[2].split(",")):
            continue
        mount_point, mount_root = PurePosixPath(_unescape(fields[4])), _unescape(fields[3])
        found.setdefault(version, CgroupMount(mount_point, PurePosixPath(mount_root)))
    return found


def own_cgroups(root: Path = Path("/")) -> dict[str, PurePosixPath]:
    """This process's cgroup path per v1 controller; "" is the v2 unified hierarchy."""
    paths: dict[str, PurePosixPath] = {}
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return paths
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for controller in parts[1].split(",") if parts[1] else [""]:
            paths[controller] = PurePosixPath(parts[2])
    return paths


def cgroup_folder(base: Path, mount_root: PurePosixPath, path: PurePosixPath) -> Path:
    """The folder of hierarchy path ``path`` in a cgroup mount at ``base`` showing ``mount_root``.

    The path is taken relative to the mount's root; if it does not lie under it, or the
    folder does not exist, the mount point itself: in a container, its own cgroup.
    """
    try:
        relative = path.relative_to(mount_root)
    except ValueError:
        return base
    folder = base / relative
    return folder if folder.is_dir() else base


def _tightest(base: Path, folder: Path, name: str) -> tuple[int, Path] | None:
    """The smallest ``name`` limit from ``folder`` up to ``base`` (a parent's limit binds too)."""
    best: tuple[int, Path] | None = None
    current = folder
    while True:
        limit = _read_limit(current / name)
        if limit is not None and (best is None or limit < best[0]):
            best = (limit, current / name)
        if current == base or base not in current.parents:
            return best
        current = current.parent


def _v1_hierarchical(folder: Path) -> tuple[int, Path] | None:
    """v1's own answer for "the limit, ancestors included": memory.stat's hierarchical limit."""
    try:
        text = (folder / "memory.stat").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "hierarchical_memory_limit":
            try:
                number = int(value)
            except ValueError:
                return None
            return (number, folder / "memory.stat") if 0 < number < UNLIMITED else None
    return None


#: Where the usual layouts mount the hierarchies, for a process that cannot read mountinfo.
_USUAL_MOUNTS = {
    2: CgroupMount(PurePosixPath("/sys/fs/cgroup"), _SLASH),
    1: CgroupMount(PurePosixPath("/sys/fs/cgroup/memory"), _SLASH),
}


def detect_memory_limit(root: Path = Path("/")) -> MemoryLimit:
    """This process's memory limit as its container sees it (v2 first, then v1's memory)."""
    mounts, own = memory_mounts(root) or dict(_USUAL_MOUNTS), own_cgroups(root)
    notes = []
    layouts = ((2, "", "memory.max"), (1, "memory", "memory.limit_in_bytes"))
    for version, controller, name in layouts:
        mount = mounts.get(version)
        if mount is None or controller not in own:
            continue
        base = root / mount.mount_point.relative_to(_SLASH)
        folder = cgroup_folder(base, mount.root, own[controller])
        found = _tightest(base, folder, name)
        if version == 1:
            hierarchical = _v1_hierarchical(folder)
            if hierarchical is not None and (found is None or hierarchical[0] < found[0]):
                found = hierarchical
        if found is not None:
            where = found[1]
            shown = "/" + str(where.relative_to(root)) if where.is_relative_to(root) else str(where)
            return MemoryLimit(found[0], f"cgroup v{version} {shown}")
        notes.append(f"cgroup v{version}: no limit in {folder} or above")
    return MemoryLimit(None, "; ".join(notes) or "no memory cgroup found")
