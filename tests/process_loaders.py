"""Test-only loaders that reach past their own process group (sandbox_loaders imports them)."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import platform
import resource
import signal
import struct
import threading
from collections.abc import Callable
from typing import Any

from loadwarden.worker._libc import libc
from loadwarden.worker.sandbox._registry import register_loader
from loadwarden.worker.sandbox.spec import ChildSpec

#: The worker's pid: the fork server's parent when it preloads this module (a child
#: inherits the value; in the test process itself it names pytest's parent, unused).
_WORKER_PID = os.getppid()
#: machine -> the system calls ``reach_others`` makes through libc's ``syscall``.
_CALLS = {
    "x86_64": {"tkill": 200, "tgkill": 234, "sigqueue": 129, "tgsigqueue": 297, "ptrace": 101},
    "aarch64": {"tkill": 130, "tgkill": 131, "sigqueue": 138, "tgsigqueue": 240, "ptrace": 117},
}


def _outcome(call: Callable[[], object]) -> str:
    """The word "allowed", or the errno's name the call failed with ("EPERM": the sandbox's)."""
    try:
        call()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return "allowed"


def _syscall(name: str, *args: int | ctypes.Array[ctypes.c_char]) -> Callable[[], object]:
    nr = _CALLS[platform.machine()][name]

    def call() -> None:
        if libc().syscall(nr, *args) < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    return call


def _pidfd_signal(pid: int) -> None:
    pidfd = os.pidfd_open(pid)
    try:
        signal.pidfd_send_signal(pidfd, 0)
    finally:
        os.close(pidfd)


@register_loader("reach_others")
def reach_others(fd: int, spec: ChildSpec) -> dict[str, Any]:
    """Try to signal (or prlimit, ptrace, own the SIGIO of a pipe for) the fork server and the
    worker, and the same on itself and its group; raise with what each call did. Signal 0
    probes permission, except one SIGKILL to the fork server (it would die, and this child
    with it by pdeathsig)."""
    me, server = os.getpid(), os.getppid()
    info = ctypes.create_string_buffer(128)  # a siginfo_t; si_code SI_QUEUE, as sigqueue(3)
    struct.pack_into("i", info, 8, -1)  # (the kernel refuses SI_USER to another process)
    read_end, write_end = os.pipe()
    others = {
        "kill_server": lambda: os.kill(server, signal.SIGKILL),
        "kill_worker": lambda: os.kill(_WORKER_PID, 0),
        "kill_all": lambda: os.kill(-1, 0),
        "killpg_server": lambda: os.killpg(os.getpgid(server), 0),
        "tgkill_server": _syscall("tgkill", server, server, 0),
        "tkill_server": _syscall("tkill", server, 0),
        "sigq_server": _syscall("sigqueue", server, 0, info),
        "tgsigq_server": _syscall("tgsigqueue", server, server, 0, info),
        "pidfd_server": lambda: _pidfd_signal(server),
        "setown_server": lambda: fcntl.fcntl(read_end, fcntl.F_SETOWN, server),
        "setown_worker_pg": lambda: fcntl.fcntl(read_end, fcntl.F_SETOWN, -_WORKER_PID),
        "fiosetown": lambda: fcntl.ioctl(read_end, 0x8901, struct.pack("i", server)),
        "prlimit_server": lambda: resource.prlimit(server, resource.RLIMIT_CORE),
        "ptrace_server": _syscall("ptrace", 2, server, 0, 0),  # PTRACE_PEEKDATA
    }
    own = {
        "kill_self": lambda: os.kill(me, 0),
        "kill_0": lambda: os.kill(0, 0),
        "killpg_own": lambda: os.killpg(me, 0),
        "tgkill_self": lambda: signal.pthread_kill(threading.get_ident(), 0),
        "setown_self": lambda: fcntl.fcntl(read_end, fcntl.F_SETOWN, me),
        "prlimit_self": lambda: resource.prlimit(me, resource.RLIMIT_CORE),
    }
    outcomes: dict[str, list[str]] = {}  # outcome -> names: short enough for the error message
    try:
        for name, call in {**own, **others}.items():
            outcomes.setdefault(_outcome(call), []).append(name)
    finally:
        os.close(read_end)
        os.close(write_end)
    raise RuntimeError(json.dumps(outcomes, separators=(",", ":")))
