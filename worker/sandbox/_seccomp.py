"""A load child's seccomp filters: no sockets; no sessions, signals or ptrace past itself (ctypes).

A loader child talks to the supervisor over the one socket it was forked with and
needs no other. Landlock covers TCP only (ABI >= 4) and abstract unix sockets
(ABI >= 6); a pathname unix socket (an embedded Valkey's, found in
/proc/net/unix), UDP, netlink or raw sockets stay open to it. This filter makes
``socket``, ``socketpair``, ``connect``, ``bind`` and ``io_uring_setup`` (whose
ring can open sockets without those system calls) fail with EPERM, whatever the
family. Sending on the inherited socket is untouched.

A second filter (``install_child``), stacked by each child right after it made its own
session, names that child's pid, so it cannot be part of the fork server's filter:

- ``setsid`` and ``setpgid`` fail with EPERM: a process the loader forks stays in the
  child's process group, which ``stop_child`` kills as one (a grandchild that left by
  ``setsid`` outlived the load, paused in its cgroup);
- signals reach only the child itself and its process group: ``kill`` and
  ``rt_sigqueueinfo`` to the child's pid, its group (0, -pid) only; ``tgkill``,
  ``tkill`` and ``rt_tgsigqueueinfo`` to its own pid only (the kernel refuses 0 and
  negatives there); ``pidfd_send_signal`` never; ``fcntl(F_SETOWN)`` (a SIGIO, or any
  signal chosen by ``F_SETSIG``, sent when the descriptor is ready) to the same
  targets as ``kill``, ``F_SETOWN_EX`` and the ``FIOSETOWN`` / ``SIOCSPGRP`` ioctls
  never; ``prlimit64`` on itself only (an RLIMIT_CPU set on the fork server kills it
  with SIGXCPU/SIGKILL, and Landlock does not scope prlimit). Where Landlock's signal
  scoping (ABI >= 6) is missing or off, a loader could otherwise kill its fork server;
- ``ptrace``, ``process_vm_readv``/``writev``, ``process_madvise`` and
  ``pidfd_getfd`` fail with EPERM (Landlock denies ptrace outside its domain at any
  ABI, but only where it is on).

A pid is compared on its low 32 bits, as the kernel reads a ``pid_t``. What the loader
forks inherits the filter with the child's pid in it: a grandchild may signal the child
and its group, not itself by its own pid (``os.kill(os.getpid())`` there is EPERM).

Hand-written (16 and 40 BPF instructions) rather than through libseccomp: its Python
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
from typing import NamedTuple

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
_JA = 0x05  # BPF_JMP | BPF_JA
_F_SETOWN, _F_SETOWN_EX = 8, 15
_FIOSETOWN, _SIOCSPGRP = 0x8901, 0x8902


def _arg(n: int) -> int:
    """Offset of system call argument ``n``'s low 32 bits in struct seccomp_data."""
    return 16 + 8 * n


class _ChildCalls(NamedTuple):
    """One architecture's system call numbers for the child's filter (``child_program``)."""

    #: setsid, setpgid: no new session or process group.
    sessions: tuple[int, ...]
    #: kill, rt_sigqueueinfo, tgkill, tkill, rt_tgsigqueueinfo, prlimit64: first argument
    #: a pid, allowed only for the child's own pid, 0 or -pid.
    own_pid: tuple[int, ...]
    #: pidfd_send_signal, ptrace, process_vm_readv, process_vm_writev, process_madvise,
    #: pidfd_getfd: another process's signals, memory or descriptors.
    others: tuple[int, ...]
    fcntl: int
    ioctl: int


_CHILD_CALLS: dict[str, _ChildCalls] = {
    "x86_64": _ChildCalls(
        (112, 109), (62, 129, 234, 200, 297, 302), (424, 101, 310, 311, 440, 438), 72, 16
    ),
    "aarch64": _ChildCalls(
        (157, 154), (129, 138, 131, 130, 240, 261), (424, 117, 270, 271, 440, 438), 25, 29
    ),
}


class _Instruction(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_Instruction))]


def program(machine: str) -> list[tuple[int, int, int, int]]:
    """The filter for ``machine`` as (code, jt, jf, k) instructions; KeyError if unknown."""
    arch, denied, has_x32 = _ARCHES[machine]
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


#: What ``install``'s filter confines, as a load report's ``confinement`` names it.
SOCKETS = "seccomp_no_sockets"
#: What ``install_child``'s filter confines, as a load report's ``confinement`` names them.
CHILD = ("seccomp_no_new_sessions", "seccomp_signals_own_group", "seccomp_no_ptrace")


def label() -> str:
    """What the filters confine on this machine, as one metric label value: the report's
    names without ``seccomp_``, joined by ``+`` ("none": no filter for this architecture)."""
    machine = platform.machine()
    names = ([SOCKETS] if machine in _ARCHES else []) + list(
        CHILD if machine in _CHILD_CALLS else ()
    )
    return "+".join(name.removeprefix("seccomp_") for name in names) or "none"


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


#: An instruction whose jumps name labels (None: the next instruction), or a label.
_Line = tuple[int, str | None, str | None, int] | str


def _assemble(lines: list[_Line]) -> list[tuple[int, int, int, int]]:
    """Resolve labels into forward jump offsets (BPF jumps only forward, by at most 255)."""
    at: dict[str, int] = {}
    instructions: list[tuple[int, str | None, str | None, int]] = []
    for line in lines:
        if isinstance(line, str):
            at[line] = len(instructions)
        else:
            instructions.append(line)
    code = []
    for pc, (op, jt, jf, k) in enumerate(instructions):
        offsets = [0 if label is None else at[label] - pc - 1 for label in (jt, jf)]
        if not all(0 <= o < 256 for o in offsets):
            raise ValueError(f"jump out of range at {pc}: {offsets}")
        if op == _JA:  # an unconditional jump carries its offset in k
            code.append((op, 0, 0, offsets[0]))
        else:
            code.append((op, offsets[0], offsets[1], k))
    return code


def child_program(machine: str, pid: int) -> list[tuple[int, int, int, int]]:
    """The child's filter (no new sessions; signals, prlimit only to itself or its group;
    no ptrace) for process ``pid``, as (code, jt, jf, k); KeyError if the machine is unknown."""
    arch, _sockets, has_x32 = _ARCHES[machine]
    calls = _CHILD_CALLS[machine]
    own = (0, pid & 0xFFFFFFFF, -pid & 0xFFFFFFFF)  # itself, its group (it leads it)
    lines: list[_Line] = [
        (_LD_W_ABS, None, None, _ARCH_OFFSET),
        (_JEQ_K, None, "kill", arch),
        (_LD_W_ABS, None, None, _NR_OFFSET),
    ]
    if has_x32:
        lines.append((_JGE_K, "deny", None, _X32_BIT))
    lines += [(_JEQ_K, "deny", None, nr) for nr in calls.sessions + calls.others]
    lines += [(_JEQ_K, "own_arg0", None, nr) for nr in calls.own_pid]
    lines += [
        (_JEQ_K, "fcntl", None, calls.fcntl),
        (_JEQ_K, "ioctl", None, calls.ioctl),
        (_JA, "allow", None, 0),
        "own_arg0",
        (_LD_W_ABS, None, None, _arg(0)),
        *[(_JEQ_K, "allow", None, k) for k in own],
        (_JA, "deny", None, 0),
        "fcntl",
        (_LD_W_ABS, None, None, _arg(1)),
        (_JEQ_K, "deny", None, _F_SETOWN_EX),
        (_JEQ_K, None, "allow", _F_SETOWN),
        (_LD_W_ABS, None, None, _arg(2)),
        *[(_JEQ_K, "allow", None, k) for k in own],
        (_JA, "deny", None, 0),
        "ioctl",
        (_LD_W_ABS, None, None, _arg(1)),
        (_JEQ_K, "deny", None, _FIOSETOWN),
        (_JEQ_K, "deny", None, _SIOCSPGRP),
        "allow",
        (_RET_K, None, None, _RET_ALLOW),
        "deny",
        (_RET_K, None, None, _RET_ERRNO | errno.EPERM),
        "kill",
        (_RET_K, None, None, _RET_KILL_PROCESS),
    ]
    return _assemble(lines)


def install_child(pid: int) -> None:
    """Stack the child's filter (``child_program``) on this process, whose pid (and process
    group, after its ``setsid``) is ``pid``; after no_new_privs.

    Raises OSError where the architecture is not described or the kernel refuses.
    """
    machine = platform.machine()
    if machine not in _CHILD_CALLS:
        raise OSError(errno.ENOSYS, f"no seccomp filter written for {machine}")
    _install(child_program(machine, pid))


def _install(code: list[tuple[int, int, int, int]]) -> None:
    instructions = (_Instruction * len(code))(*(_Instruction(*ins) for ins in code))
    prog = _Program(len(code), instructions)
    _linux.prctl3(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(prog))


__all__ = [
    "CHILD",
    "SOCKETS",
    "available",
    "child_program",
    "install",
    "install_child",
    "label",
    "program",
]
