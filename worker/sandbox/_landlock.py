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
import os
import sys
import sysconfig
from collections.abc import Iterable

_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446  # same on every arch
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1

EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}
_NET_ALL = (1 << 0) | (1 << 1)  # BIND_TCP | CONNECT_TCP, ABI >= 4
_SCOPE_ALL = (1 << 0) | (1 << 1)  # ABSTRACT_UNIX_SOCKET | SIGNAL, ABI >= 6
_READ = READ_FILE | READ_DIR

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _check(result: int) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def abi_version() -> int:
    """The kernel's Landlock ABI, or 0 when Landlock is not available."""
    result = _libc.syscall(
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


def _rule(path: str) -> tuple[str, int]:
    return path, _READ if os.path.isdir(path) else READ_FILE


#: ``interpreter_rules`` without the per-process /proc file, found once (the fork server's).
_STATIC_RULES: list[tuple[str, int]] | None = None


def interpreter_rules() -> list[tuple[str, int]]:
    """What a Python child reads, as (path, rights): its modules' folders, shared libraries,
    its own /proc/PID/io.

    The folders and libraries are looked up (exists? a folder?) once, in the fork server,
    and inherited: each child then only opens them for ``restrict`` (two stat calls
    fewer per path in every child). They do not change while the worker runs.
    """
    global _STATIC_RULES
    if _STATIC_RULES is None:
        paths = {*prepare(), *_SYSTEM_LIBRARIES}
        _STATIC_RULES = [_rule(p) for p in sorted(paths) if p and os.path.exists(p)]
    return [*_STATIC_RULES, (f"/proc/{os.getpid()}/io", READ_FILE)]


def restrict(read_fds: Iterable[int], read_rules: Iterable[tuple[str, int]]) -> int:
    """Restrict this process to reading ``read_fds``' files and ``read_rules``' paths
    (``interpreter_rules``); return the ABI.

    Raises OSError where the kernel has no Landlock (the caller decides what that means).
    """
    abi = abi_version()
    if abi < 1:
        raise OSError(95, "Landlock is not supported by this kernel")
    fs_rights = _fs_rights(abi)
    attr = _RulesetAttr(fs_rights, _NET_ALL if abi >= 4 else 0, _SCOPE_ALL if abi >= 6 else 0)
    size = ctypes.sizeof(_RulesetAttr) if abi >= 6 else (16 if abi >= 4 else 8)
    ruleset = _check(
        _libc.syscall(
            _SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0)
        )
    )
    try:
        for fd in read_fds:
            _add(ruleset, fd, READ_FILE)
        for path, rights in read_rules:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                _add(ruleset, fd, rights)
            finally:
                os.close(fd)
        _check(_libc.syscall(_SYS_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)))
    finally:
        os.close(ruleset)
    return abi


def _add(ruleset: int, fd: int, rights: int) -> None:
    rule = _PathBeneathAttr(rights, fd)
    _check(
        _libc.syscall(
            _SYS_ADD_RULE,
            ctypes.c_int(ruleset),
            ctypes.c_int(_RULE_PATH_BENEATH),
            ctypes.byref(rule),
            ctypes.c_uint32(0),
        )
    )
