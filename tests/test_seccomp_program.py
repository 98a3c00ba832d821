"""The child's seccomp filter as a program, run by a small BPF interpreter for both
architectures (the kernel only ever runs this machine's: test_sandbox_escape.py)."""

from __future__ import annotations

import errno
import struct

import pytest

from loadwarden.worker.sandbox._seccomp import child_program

PID = 4242
ALLOW, EPERM, KILL = 0x7FFF0000, 0x00050000 | errno.EPERM, 0x80000000
ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
#: machine -> system call numbers (from the kernel's unistd headers)
NR = {
    "x86_64": {
        "read": 0, "kill": 62, "tgkill": 234, "rt_sigqueueinfo": 129, "prlimit64": 302,
        "fcntl": 72, "ioctl": 16, "setsid": 112, "ptrace": 101, "pidfd_send_signal": 424,
    },
    "aarch64": {
        "read": 63, "kill": 129, "tgkill": 131, "rt_sigqueueinfo": 138, "prlimit64": 261,
        "fcntl": 25, "ioctl": 29, "setsid": 157, "ptrace": 117, "pidfd_send_signal": 424,
    },
}  # fmt: skip


def run(code: list[tuple[int, int, int, int]], data: bytes) -> int:
    """What the filter returns for ``data`` (struct seccomp_data); only the opcodes it uses."""
    pc, acc = 0, 0
    while True:
        op, jt, jf, k = code[pc]
        pc += 1
        if op == 0x20:  # LD W ABS
            (acc,) = struct.unpack_from("<I", data, k)
        elif op in (0x15, 0x35):  # JEQ K, JGE K
            pc += jt if (acc == k if op == 0x15 else acc >= k) else jf
        elif op == 0x05:  # JA
            pc += k
        elif op == 0x06:  # RET K
            return k
        else:
            raise AssertionError(f"unexpected opcode {op:#x}")


def call(machine: str, name: str, *args: int, arch: int | None = None) -> int:
    """The filter's verdict on system call ``name`` with ``args`` (as the kernel packs them)."""
    words = [a & 0xFFFFFFFFFFFFFFFF for a in (*args, 0, 0, 0, 0, 0, 0)[:6]]
    data = struct.pack("<iIQ6Q", NR[machine][name], arch or ARCH[machine], 0, *words)
    return run(child_program(machine, PID), data)


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
@pytest.mark.parametrize(
    ("name", "args", "verdict"),
    [
        ("read", (3, 0, 10), ALLOW),
        ("kill", (PID, 9), ALLOW),
        ("kill", (0, 9), ALLOW),
        ("kill", (-PID, 9), ALLOW),
        ("kill", (PID + 1, 9), EPERM),
        ("kill", (-1, 9), EPERM),
        ("kill", (1 << 32 | PID, 9), ALLOW),  # the kernel reads the low 32 bits: PID
        ("kill", (PID << 32 | 1, 9), EPERM),  # ... here 1: init
        ("rt_sigqueueinfo", (PID + 1, 9, 0), EPERM),
        ("tgkill", (PID, 77, 6), ALLOW),  # a thread of its own
        ("tgkill", (PID + 1, PID + 1, 9), EPERM),
        ("prlimit64", (0, 0, 0, 0), ALLOW),
        ("prlimit64", (PID + 1, 0, 0, 0), EPERM),
        ("fcntl", (3, 8, PID + 1), EPERM),  # F_SETOWN to another process
        ("fcntl", (3, 8, -(PID + 1)), EPERM),  # ... or another group
        ("fcntl", (3, 8, -PID), ALLOW),
        ("fcntl", (3, 15, 0), EPERM),  # F_SETOWN_EX: its target is behind a pointer
        ("fcntl", (3, 4, 0x800), ALLOW),  # F_SETFL
        ("ioctl", (3, 0x8901, 0), EPERM),  # FIOSETOWN
        ("ioctl", (3, 0x5401, 0), ALLOW),  # TCGETS (isatty)
        ("setsid", (), EPERM),
        ("ptrace", (16, PID + 1), EPERM),
        ("pidfd_send_signal", (3, 9, 0, 0), EPERM),
    ],
)
def test_the_filter_allows_signals_to_the_child_and_its_group_only(
    machine: str, name: str, args: tuple[int, ...], verdict: int
) -> None:
    """Signals, F_SETOWN and prlimit reach the child's pid, 0 or its group; nothing else,
    compared on the 32 bits the kernel reads; setsid and ptrace are denied outright."""
    assert call(machine, name, *args) == verdict


def test_another_abi_is_killed() -> None:
    """An i386 system call on x86_64 (its numbers mean other calls) kills the process."""
    assert call("x86_64", "read", 0, arch=0x40000003) == KILL


def test_x32_calls_are_denied() -> None:
    """An x32 call (the 0x40000000 bit) is denied, as by the socket filter."""
    data = struct.pack("<iIQ6Q", 0x40000000 | 62, ARCH["x86_64"], 0, 1, 9, 0, 0, 0, 0)
    assert run(child_program("x86_64", PID), data) == EPERM
