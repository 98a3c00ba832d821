"""The fork server: a lean, single-threaded process that imports loaders once and forks children.

Run as ``python -m loadwarden.worker.sandbox._forkserver CONTROL_FD SUPERVISOR_PID PRELOAD...`` by
``forkserver.ForkServer``. It forks a child for every spawn request, reaps every
child with ``wait4`` and reports the kernel's own accounting (status, CPU time,
peak RSS) to the supervisor. It dies with the supervisor (``PR_SET_PDEATHSIG``)
and its children die with it. After preloading it confines itself with what
every child needs and it can bear (no_new_privs, the seccomp filter: no new
sockets), so that children inherit both instead of each paying for them, and
it has run a tiny load's Python once (``_child.warm_up``) so that children
inherit that code warm.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import selectors
import signal
import socket
import sys

from loadwarden.worker.sandbox import _landlock, _linux, _protocol, _seccomp

#: Past any descriptor the fork server could hold (closerange uses close_range(2): cheap).
_MAX_FD = os.sysconf("SC_OPEN_MAX")


def _reap(control: socket.socket) -> None:
    while True:
        try:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        message = _protocol.REAPED + _protocol.REAPED_MSG.pack(
            pid,
            status,
            round(usage.ru_utime * 1e6),
            round(usage.ru_stime * 1e6),
            usage.ru_maxrss,
        )
        with contextlib.suppress(OSError):
            control.send(message)


def _keep_only(fd: int) -> None:
    """Leave a new child only ``fd`` (its socket) and /dev/null as stdin, stdout and stderr.

    Everything else the fork server holds would be the loader's to abuse: the
    supervisor's stdout (a forged ``load --json`` line), the selector's epoll
    descriptor (shared with the fork server: registering an always-ready fd on it
    makes the server spin), the signal wake-up pipe.
    """
    null = os.open(os.devnull, os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(null, target)
    if null > 2:
        os.close(null)
    os.closerange(3, fd)
    os.closerange(fd + 1, _MAX_FD)


def _fork_child(
    control: socket.socket, token: int, child_end: socket.socket, rehearse: bool
) -> None:
    try:
        pid = os.fork()
    except OSError as exc:
        child_end.close()
        _tell(
            control, _protocol.FORK_FAILED + _protocol.FORK_FAILED_MSG.pack(token, exc.errno or 0)
        )
        return
    if pid == 0:  # the load child
        status = 70
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            control.close()
            _keep_only(child_end.fileno())
            from loadwarden.worker.sandbox import _child

            status = _child.main(child_end, rehearse=rehearse)
        finally:
            os._exit(status)
    child_end.close()
    _tell(control, _protocol.FORKED + _protocol.FORKED_MSG.pack(token, pid))


def _tell(control: socket.socket, message: bytes) -> None:
    """Send to the supervisor; one that closed its end meanwhile (it stopped us while a
    request was queued: ``launch(fork_ahead=True)``) is seen as EOF next, and we return:
    the child dies with us (``PR_SET_PDEATHSIG``)."""
    with contextlib.suppress(OSError):
        control.send(message)


def _serve(control: socket.socket) -> None:
    wakeup_r, wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wakeup_w)
    # A handler (not SIG_IGN) so that children stay reapable and the wakeup fd fires.
    signal.signal(signal.SIGCHLD, lambda *_: None)
    selector = selectors.DefaultSelector()
    selector.register(control, selectors.EVENT_READ, "control")
    selector.register(wakeup_r, selectors.EVENT_READ, "wakeup")
    while True:
        for key, _ in selector.select():
            if key.data == "wakeup":
                with contextlib.suppress(BlockingIOError):
                    os.read(wakeup_r, 4096)
                _reap(control)
                continue
            try:
                data, fds, _flags, _addr = socket.recv_fds(control, _protocol.MAX_CONTROL_BYTES, 1)
            except InterruptedError:
                continue
            except ConnectionResetError:  # the supervisor closed with our FORKED unread
                return
            if not data:  # the supervisor is gone
                return
            kind = data[:1]
            if kind not in (_protocol.SPAWN, _protocol.SPAWN_IDLE) or len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                continue
            (token,) = _protocol.TOKEN.unpack(data[1:])
            child_end = socket.socket(fileno=fds[0])
            _fork_child(control, token, child_end, kind == _protocol.SPAWN_IDLE)
        _reap(control)


def _confine_self() -> None:
    """What every child needs and the fork server can bear: no_new_privs and the seccomp filter.

    Both are inherited across fork and can never be undone, so every child has them
    before it runs any code of its own, and does not pay for them (installing the
    filter in each child cost ~0.2 ms of its CPU). The fork server itself never
    needs a new socket: it receives descriptors on the control socket it was given
    and forks. Where the filter cannot be installed, the child tries again itself and
    reports what it got (``_child._apply_seccomp``).
    """
    _linux.prctl(_linux.PR_SET_NO_NEW_PRIVS, 1)
    with contextlib.suppress(OSError):
        _seccomp.install()


def main(argv: list[str]) -> int:
    control_fd, supervisor = int(argv[0]), int(argv[1])
    _linux.prctl(_linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != supervisor:  # the supervisor died before the prctl took hold
        return 1
    # Grandchildren that a loader starts are reparented here and reaped, not leaked to init.
    with contextlib.suppress(OSError):
        _linux.prctl(_linux.PR_SET_CHILD_SUBREAPER, 1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for name in argv[2:]:
        importlib.import_module(name)
    _landlock.interpreter_paths()  # once here, not in every child: what Landlock lets them read
    from loadwarden.worker.sandbox import _child  # every child runs it: preloaded in any case

    try:
        _child.warm_up()  # the bytecode children run, quickened here once (see warm_up)
    except Exception as exc:  # only an optimisation: never worth a fork server that can't start
        print(f"loadwarden fork server: warm-up skipped: {exc!r}", file=sys.stderr, flush=True)
    _confine_self()
    control = socket.socket(fileno=control_fd)
    control.send(_protocol.READY)
    _serve(control)
    return 0


if __name__ == "__main__":
    status = main(sys.argv[1:])
    # Every child is reaped and nothing is buffered: skip the interpreter's teardown
    # (numpy's modules, a last collection), which the supervisor's close waits for.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
