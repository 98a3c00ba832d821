"""Preloaded into a fork server: a seccomp filter makes Landlock's system calls fail with
ENOSYS in it and in every child it forks, as in a kernel without Landlock, while the
supervisor (which the filter does not reach) found Landlock and asks children for it.

The numbers are the same on every architecture, and the filter does not check which one
it runs on: it confines nothing, it only takes Landlock away from a test's fork server.
"""

import ctypes
import errno

from loadwarden.worker.sandbox import _linux, _seccomp

_LANDLOCK = (444, 445, 446)  # create_ruleset, add_rule, restrict_self
_LD_NR, _JEQ, _RET = 0x20, 0x15, 0x06  # BPF_LD|W|ABS (offset 0: the number), JEQ K, RET K
_ALLOW, _ERRNO = 0x7FFF0000, 0x00050000


def _install() -> None:
    n = len(_LANDLOCK)
    code = [(_LD_NR, 0, 0, 0)]
    code += [(_JEQ, n - i, 0, nr) for i, nr in enumerate(_LANDLOCK)]  # to the ENOSYS return
    code += [(_RET, 0, 0, _ALLOW), (_RET, 0, 0, _ERRNO | errno.ENOSYS)]
    instructions = (_seccomp._Instruction * len(code))(
        *(_seccomp._Instruction(*ins) for ins in code)
    )
    prog = _seccomp._Program(len(code), instructions)
    _linux.prctl(_linux.PR_SET_NO_NEW_PRIVS, 1)
    _linux.prctl3(22, 2, ctypes.addressof(prog))  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER


_install()
