"""What the supervisor waits for on the fork server's control socket (``forkserver``): each
spawn's FORKED (or FORK_FAILED) packet, then each child's REAPED one."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from loadwarden.worker.sandbox import _protocol
from loadwarden.worker.sandbox.children import ChildExit, SandboxError, kill_group

#: A child's pid and the future of its exit, as its FORKED packet gives them.
Forked = tuple[int, "asyncio.Future[ChildExit]"]


class Waiters:
    """The futures of spawns and of children's exits, resolved by the fork server's packets."""

    def __init__(self) -> None:
        #: Spawn token -> the child's pid and its exit, resolved by its FORKED packet (the
        #: exit is taken then: a REAPED read in the same burst would leave none to look up).
        self.forks: dict[int, asyncio.Future[Forked]] = {}
        self.exits: dict[int, asyncio.Future[ChildExit]] = {}

    def dispatch(self, data: bytes) -> None:
        """Resolve what one packet answers."""
        kind, body = data[:1], data[1:]
        if kind == _protocol.FORKED:
            token, pid = _protocol.FORKED_MSG.unpack(body)
            waiter = self.forks.pop(token, None)
            exited = self.exits.setdefault(pid, asyncio.get_running_loop().create_future())
            if waiter is None or waiter.done():  # its spawn() was cancelled: do not leak it
                kill_group(pid)
            else:
                waiter.set_result((pid, exited))
        elif kind == _protocol.FORK_FAILED:
            token, errno = _protocol.FORK_FAILED_MSG.unpack(body)
            waiter = self.forks.pop(token, None)
            if waiter is not None and not waiter.done():
                waiter.set_exception(SandboxError(f"fork failed: {os.strerror(errno)}"))
        elif kind == _protocol.REAPED:
            pid, status, utime, stime, maxrss = _protocol.REAPED_MSG.unpack(body)
            future = self.exits.pop(pid, None)  # None: a reparented grandchild
            if future is not None and not future.done():
                future.set_result(ChildExit.from_wait(pid, status, utime, stime, maxrss))

    def gone(self) -> list[int]:
        """The fork server exited: every wait fails; returns the pids of the children it
        forked and did not report reaped."""
        gone = SandboxError("the fork server exited")
        children = list(self.exits)
        waiting: list[asyncio.Future[Any]] = [*self.forks.values(), *self.exits.values()]
        for pending in waiting:
            if not pending.done():
                pending.set_exception(gone)
                pending.exception()  # mark retrieved: a cancelled waiter never reads it
        self.forks.clear()
        self.exits.clear()
        return children
