"""Landlock, through its three system calls (stdlib ctypes only: this runs in the load child).

A child restricts itself, after no_new_privs and before it touches the model: it
may read the model file and what the interpreter needs (the folders its modules
came from, shared libraries, its own /proc/PID/io), and nothing more: not the
working directory, not /proc/PID/net; it may not write or create
anything, nor execute anything; on ABI >= 4 it may not bind or connect TCP;
on ABI >= 6 it may not signal processes or reach abstract unix sockets outside
its own domain. No PyPI binding is used: the released one is a dev version.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import sys
import sysconfig
from collections.abc import Iterable

from loadwarden.worker._libc import libc

_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446  # same on every arch
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1

EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}
_NET_ALL = (1 << 0) | (1 << 1)  # BIND_TCP | CONNECT_TCP, ABI >= 4
_SCOPE_ALL = (1 << 0) | (1 << 1)  # ABSTRACT_UNIX_SOCKET | SIGNAL, ABI >= 6
_READ = READ_FILE | READ_DIR


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class Unavailable(OSError):
    """This kernel has no Landlock (ENOSYS) or has it disabled (EOPNOTSUPP): the only
    failure a caller may take as "no Landlock here" rather than as a broken sandbox."""


#: The errors of the ABI probe and of ruleset creation that mean "no Landlock here".
_ABSENT = (errno.ENOSYS, errno.EOPNOTSUPP)


def _check(result: int, *, absent: bool = False) -> int:
    """``result``, or the system call's errno raised (as ``Unavailable`` when ``absent``
    and it says Landlock is missing)."""
    if result < 0:
        err = ctypes.get_errno()
        if absent and err in _ABSENT:
            raise Unavailable(err, os.strerror(err))
        raise OSError(err, os.strerror(err))
    return result


def abi_version() -> int:
    """The kernel's Landlock ABI, or 0 when Landlock is not available."""
    result = libc().syscall(
        _SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION)
    )
    return max(0, int(result))


def _fs_rights(abi: int) -> int:
    return _FS_BY_ABI[max(k for k in _FS_BY_ABI if k <= abi)]


#: Folders the interpreter's modules came from, found once in the fork server (``prepare``).
_MODULE_FOLDERS: list[str] | None = None
#: The system's shared libraries (a lazily loaded extension's dependencies).
_SYSTEM_LIBRARIES = (
    "/usr/lib",
    "/usr/lib64",
    "/lib",
    "/lib64",
    "/usr/local/lib",
    "/etc/ld.so.cache",
)


def _outermost(paths: Iterable[str]) -> list[str]:
    """The paths, without those inside another one of them (a rule covers its subtree)."""
    kept: list[str] = []
    for path in sorted(set(paths)):
        if not any(path == k or path.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(path)
    return kept


def prepare() -> list[str]:
    """Find (once; the fork server calls it after preloading) the folders a child may read.

    The stdlib and site-packages folders, and the folder of every module already
    imported (an editable install's packages, the tests' loaders): never
    ``sys.path`` as given, whose first entry is the working directory under ``-m``.
    """
    global _MODULE_FOLDERS
    if _MODULE_FOLDERS is None:
        paths = sysconfig.get_paths()
        folders = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
        for module in list(sys.modules.values()):
            file = getattr(module, "__file__", None)
            if isinstance(file, str) and os.path.isabs(file):
                folders.add(os.path.dirname(file))
        _MODULE_FOLDERS = _outermost(folders)
    return _MODULE_FOLDERS


#: ``interpreter_paths`` without the per-process /proc file, found once (the fork server's).
_STATIC_PATHS: list[str] | None = None


def interpreter_paths() -> list[str]:
    """What a Python child reads: its modules' folders, shared libraries, its own /proc/PID/io.

    The folders and libraries that exist are found once, in the fork server, and
    inherited: each child then only opens them for ``restrict``. One may vanish, or turn
    from a folder into a file, while the worker runs (a deploy, an editable source
    folder): ``restrict`` leaves out what is gone and takes a rule's rights from what it
    opened, so a stale list only ever grants less.
    """
    global _STATIC_PATHS
    if _STATIC_PATHS is None:
        paths = {*prepare(), *_SYSTEM_LIBRARIES}
        _STATIC_PATHS = [p for p in sorted(paths) if p and os.path.exists(p)]
    return [*_STATIC_PATHS, f"/proc/{os.getpid()}/io"]


class Ruleset:
    """A Landlock ruleset being built, not yet enforced: its descriptor and the kernel's ABI.

    A load child builds one for the interpreter's paths while it waits for its spec
    (``ruleset``), then adds the model's descriptors and enforces it (``enforce``): the
    ~10 paths' opens and rules are off the load's path (measured: ~0.4 ms of a fresh
    child's CPU of the ~0.6 ms ``restrict`` took).
    """

    __slots__ = ("abi", "fd")

    def __init__(self, fd: int, abi: int) -> None:
        self.fd = fd
        self.abi = abi

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


def ruleset(read_paths: Iterable[str]) -> Ruleset:
    """A new ruleset letting this process read ``read_paths`` (``interpreter_paths``: a
    folder's whole subtree, a file itself), not enforced yet (``enforce``).

    A path that no longer exists (ENOENT, ENOTDIR) is left out: nothing to read there.
    Raises ``Unavailable`` where the kernel has no Landlock, and OSError for any other
    failure (the caller must not take that as "no Landlock").
    """
    abi = _check(
        libc().syscall(
            _SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION)
        ),
        absent=True,
    )
    if abi < 1:
        raise Unavailable(errno.EOPNOTSUPP, "Landlock is not supported by this kernel")
    fs_rights = _fs_rights(abi)
    attr = _RulesetAttr(fs_rights, _NET_ALL if abi >= 4 else 0, _SCOPE_ALL if abi >= 6 else 0)
    size = ctypes.sizeof(_RulesetAttr) if abi >= 6 else (16 if abi >= 4 else 8)
    rules = Ruleset(
        _check(
            libc().syscall(
                _SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0)
            ),
            absent=True,
        ),
        abi,
    )
    try:
        for path in read_paths:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except (FileNotFoundError, NotADirectoryError):
                continue  # gone since the fork server listed it
            try:
                # What was opened, not what was there at start: a folder's rights on a
                # file make the kernel refuse the rule (EINVAL).
                folder = stat.S_ISDIR(os.fstat(fd).st_mode)
                _add(rules.fd, fd, _READ if folder else READ_FILE)
            finally:
                os.close(fd)
    except BaseException:
        rules.close()
        raise
    return rules


def enforce(rules: Ruleset, read_fds: Iterable[int]) -> int:
    """Add ``read_fds``' files to ``rules`` and restrict this process to them; return the
    ABI. The ruleset is closed either way; OSError if it could not be enforced."""
    try:
        for fd in read_fds:
            _add(rules.fd, fd, READ_FILE)
        _check(libc().syscall(_SYS_RESTRICT_SELF, ctypes.c_int(rules.fd), ctypes.c_uint32(0)))
    finally:
        rules.close()
    return rules.abi


def restrict(read_fds: Iterable[int], read_paths: Iterable[str]) -> int:
    """Restrict this process to reading ``read_fds``' files and ``read_paths`` at once
    (``ruleset``, then ``enforce``); return the ABI."""
    return enforce(ruleset(read_paths), read_fds)


def _add(ruleset: int, fd: int, rights: int) -> None:
    rule = _PathBeneathAttr(rights, fd)
    _check(
        libc().syscall(
            _SYS_ADD_RULE,
            ctypes.c_int(ruleset),
            ctypes.c_int(_RULE_PATH_BENEATH),
            ctypes.byref(rule),
            ctypes.c_uint32(0),
        )
    )
