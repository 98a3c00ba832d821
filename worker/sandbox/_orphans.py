"""What a lost fork server leaves to a worker running as PID 1 (a container with no init).

The fork server is its children's parent, and the subreaper of what they fork. When it is
lost, they are reparented to the nearest subreaper, or to the PID namespace's init: to us
when the worker is PID 1. They die by ``PR_SET_PDEATHSIG`` or by the kill of their load,
and nobody else reaps them: each stays a zombie, holding a pid, until reaped here.

Only the lost fork server's own are reaped, never a child someone else waits on (the new
fork server and Popen, asyncio's child watchers): the pids it forked (``known``, as its
FORKED packets told us) and the members of their process groups. A load child leads its own
session (``setsid``) and its loader cannot leave it (``_seccomp``): a process outside our
session cannot join one of those groups, so whatever is in one was forked by a load.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Collection

import psutil
import structlog

from loadwarden.worker.sandbox.children import kill_group, one_exits

log = structlog.get_logger("loadwarden.sandbox")

#: Past this, what has not exited yet is left (logged): SIGKILLed, it is stuck in the kernel.
REAP_WAIT_S = 10.0


def reaps_orphans() -> bool:
    """Whether orphans are ours to reap: PID 1 of its namespace (not a subreaper of ours)."""
    return os.getpid() == 1


def _left_to_us(known: Collection[int]) -> list[int]:
    """Our children that the lost fork server forked, or that were forked in their groups."""
    left = []
    for child in psutil.Process().children():
        with contextlib.suppress(ProcessLookupError):  # reaped meanwhile
            if child.pid in known or os.getpgid(child.pid) in known:
                left.append(child.pid)
    return left


def _reaped(pid: int) -> bool:
    """Reap ``pid`` if it has exited; whether it is gone."""
    try:
        done, _status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # reaped meanwhile
        return True
    return done == pid


async def reap(known: Collection[int]) -> list[int]:
    """Kill and reap the lost fork server's children (``known``) and their groups, once they
    are ours; returns the pids reaped. Call it once the fork server itself is reaped."""
    reaped: list[int] = []
    for pid in _left_to_us(known):
        if pid in known:  # ours, not yet reaped: its pid (and so its group) is not reused
            kill_group(pid)
    try:
        async with asyncio.timeout(REAP_WAIT_S):
            while left := _left_to_us(known):  # again: what a reaped one forked is ours now
                reaped += [pid for pid in left if _reaped(pid)]
                if running := [pid for pid in left if pid not in reaped]:
                    await one_exits(running)
    except TimeoutError:
        log.warning("orphans_left", pids=_left_to_us(known))
    if reaped:
        log.info("orphans_reaped", pids=reaped)
    return reaped
