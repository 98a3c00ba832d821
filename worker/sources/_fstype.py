"""The filesystem type of an open descriptor (``fstatfs``), to refuse kernel pseudo-filesystems.

A path string cannot tell that ``/models/p`` is a bind mount of ``/proc``, or that an
allowed root sits on ``sysfs``; the kernel's ``f_type`` of the descriptor can. The stdlib
offers ``os.fstatvfs``, which has no ``f_type``: this calls ``fstatfs(2)`` through ctypes
(hand-written because no maintained binding exposes it, and it is one call).
"""

from __future__ import annotations

import ctypes
import os

from loadwarden.worker._libc import libc

#: ``f_type`` magic numbers (linux/magic.h) of filesystems that never hold model files:
#: their "files" are kernel state (reading them can have effects) or devices.
PSEUDO_FILESYSTEMS: dict[int, str] = {
    0x9FA0: "proc",
    0x62656572: "sysfs",
    0x1CD1: "devpts",
    0x27E0EB: "cgroup",
    0x63677270: "cgroup2",
    0x64626720: "debugfs",
    0x74726163: "tracefs",
    0x73636673: "securityfs",
    0xCAFE4A11: "bpf",
    0x62656570: "configfs",
    0x6165676C: "pstore",
    0xDE5E81E4: "efivarfs",
    0x19800202: "mqueue",
    0x42494E4D: "binfmt_misc",
    0x65735543: "fusectl",
    0xF97CFF8C: "selinuxfs",
    0x6E736673: "nsfs",
}


#: ``f_type`` magic numbers of filesystems on a local disk (or in memory), whose metadata
#: calls answer without a network round trip: a file under a root on one of these may be
#: opened on the event loop (``sources._ondisk.open_local_inline``). Not overlayfs: its
#: look-ups go down into its layers, which may be FUSE (lazy-pulling snapshotters) or NFS.
LOCAL_FILESYSTEMS: dict[int, str] = {
    0xEF53: "ext2/3/4",
    0x58465342: "xfs",
    0x9123683E: "btrfs",
    0xF2F52010: "f2fs",
    0x2FC12FC1: "zfs",
    0x01021994: "tmpfs",
    0x858458F6: "ramfs",
}


class _StatFs(ctypes.Structure):
    # f_type is the first member (__fsword_t, a long) on every Linux ABI; the rest of
    # struct statfs is padding to us, sized generously.
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 256)]


def fs_type(fd: int) -> int:
    """The ``f_type`` of the filesystem ``fd`` (any descriptor, O_PATH included) lives on."""
    buf = _StatFs()
    if libc().fstatfs(fd, ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(buf.f_type) & 0xFFFFFFFF


def on_local_disk(fd: int) -> bool:
    """Whether ``fd`` lives on a local-disk (or in-memory) filesystem, not a network one."""
    return fs_type(fd) in LOCAL_FILESYSTEMS


def pseudo_filesystem(fd: int) -> str | None:
    """The name of the kernel pseudo-filesystem ``fd`` is on, or None for a real one."""
    return PSEUDO_FILESYSTEMS.get(fs_type(fd))
