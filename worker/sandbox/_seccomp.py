"""A seccomp filter that takes sockets away from a load child (stdlib ctypes only: runs there).

A loader child talks to the supervisor over the one socket it was forked with and
needs no other. Landlock covers TCP only (ABI >= 4) and abstract unix sockets
(ABI >= 6); a pathname unix socket (an embedded Valkey's, found in
/proc/net/unix), UDP, netlink or raw sockets stay open to it. This filter makes
``socket``, ``socketpair``, ``connect``, ``bind`` and ``io_uring_setup`` (whose
ring can open sockets without those system calls) fail with EPERM, whatever the
family. Sending on the inherited socket is untouched.

A second filter (``install_no_new_sessions``), stacked by each child right after it
made its own session, makes ``setsid`` and ``setpgid`` fail with EPERM: a process the
loader forks stays in the child's process group, which ``stop_child`` kills as one
(a grandchild that left by ``setsid`` outlived the load, paused in its cgroup). It
cannot be part of the fork server's filter: each child's own ``setsid`` comes after
the fork.

Hand-written (16 BPF instructions) rather than through libseccomp: its Python
binding is a Debian package (``python3-seccomp``), not a wheel a venv can
install, and the filter is too small to be worth a C dependency. Only x86_64
and aarch64 are described; elsewhere ``install`` raises and the child runs
without it (the report's confinement list says so by omission). A system call
from another ABI (i386 or x32 on x86_64) kills the process: a genuine loader
never makes one, and filtering by number would be wrong there.
"""

from __future__ import annotations

import ctypes
import errno
import platform

from loadwarden.worker.sandbox import _linux

_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
_RET_KILL_PROCESS = 0x80000000
_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K
_NR_OFFSET, _ARCH_OFFSET = 0, 4  # struct seccomp_data
_X32_BIT = 0x40000000

#: machine -> (AUDIT_ARCH_*, {socket, socketpair, connect, bind, io_uring_setup}, has x32)
_ARCHES: dict[str, tuple[int, tuple[int, ...], bool]] = {
    "x86_64": (0xC000003E, (41, 53, 42, 49, 425), True),
    "aarch64": (0xC00000B7, (198, 199, 203, 200, 425), False),
}
#: machine -> {setsid, setpgid}: the second filter's (``install_no_new_sessions``).
_SESSION_CALLS: dict[str, tuple[int, ...]] = {"x86_64": (112, 109), "aarch64": (157, 154)}


class _Instruction(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_Instruction))]


def program(machine: str, denied: tuple[int, ...] | None = None) -> list[tuple[int, int, int, int]]:
    """The filter for ``machine`` as (code, jt, jf, k) instructions, denying ``denied``
    system calls (default: the socket calls); KeyError if the machine is unknown."""
    arch, sockets, has_x32 = _ARCHES[machine]
    denied = sockets if denied is None else denied
    checks: list[tuple[int, int]] = []  # (jump code, k) that each jump to "deny" when true
    if has_x32:
        checks.append((_JGE_K, _X32_BIT))
    checks += [(_JEQ_K, nr) for nr in denied]
    # Layout: load arch, check arch, load nr, checks..., allow, deny, kill.
    n = len(checks)
    code = [
        (_LD_W_ABS, 0, 0, _ARCH_OFFSET),
        (_JEQ_K, 0, n + 3, arch),  # other ABI -> kill (n checks + load + allow + deny ahead)
        (_LD_W_ABS, 0, 0, _NR_OFFSET),
    ]
    for i, (jump, k) in enumerate(checks):
        code.append((jump, n - i, 0, k))  # to "deny": past the remaining checks and "allow"
    code += [
        (_RET_K, 0, 0, _RET_ALLOW),
        (_RET_K, 0, 0, _RET_ERRNO | errno.EPERM),
        (_RET_K, 0, 0, _RET_KILL_PROCESS),
    ]
    return code


def available() -> bool:
    """Whether this machine's architecture has a filter (``install`` may still be refused)."""
    return platform.machine() in _ARCHES


#: Whether ``install`` succeeded in this process or in the process it was forked from (a
#: filter is inherited across fork and can never be removed).
installed = False


def install() -> None:
    """Deny this process (and what it forks) new sockets; needs no_new_privs first.

    Raises OSError where the architecture is not described or the kernel refuses.
    """
    global installed
    machine = platform.machine()
    if machine not in _ARCHES:
        raise OSError(errno.ENOSYS, f"no seccomp filter written for {machine}")
    _install(program(machine))
    installed = True


def install_no_new_sessions() -> None:
    """Deny this process (and what it forks) ``setsid`` and ``setpgid``; after no_new_privs.

    Raises OSError where the architecture is not described or the kernel refuses.
    """
    machine = platform.machine()
    if machine not in _SESSION_CALLS:
        raise OSError(errno.ENOSYS, f"no seccomp filter written for {machine}")
    _install(program(machine, _SESSION_CALLS[machine]))


def _install(code: list[tuple[int, int, int, int]]) -> None:
    instructions = (_Instruction * len(code))(*(_Instruction(*ins) for ins in code))
    prog = _Program(len(code), instructions)
    _linux.prctl3(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(prog))


__all__ = ["available", "install", "install_no_new_sessions", "program"]
