"""A lost fork server's restart as ``forkserver.ForkServer`` keeps it: its backoff, the task
that starts another, the start that loads wait for, and what the lost one left to reap.

A load that needs a child while the fork server restarts waits for the restart's next start
(``ForkServer.running``, bounded by the job's deadline) instead of failing at once: a queue
of jobs no longer burns its attempts in seconds while the sandbox merely restarts. Only a
start that really failed fails the loads waiting for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from loadwarden.producer.errors import describe
from loadwarden.worker._tasks import cancel_and_wait
from loadwarden.worker.sandbox import _orphans
from loadwarden.worker.sandbox._backoff import Backoff
from loadwarden.worker.sandbox.children import SandboxError

log = structlog.get_logger("loadwarden.sandbox")


class Restart:
    """The restart of the fork server lost last (none under way at first)."""

    def __init__(self) -> None:
        self.backoff = Backoff()
        self._task: asyncio.Task[None] | None = None
        #: The restart's next start: resolved when it runs, failed when that start failed.
        self._next_start: asyncio.Future[None] | None = None
        #: The lost ones' children, ours to reap once they are reparented (PID 1 only).
        self._left: list[int] = []
        self._reaping: set[asyncio.Task[list[int]]] = set()

    @property
    def under_way(self) -> bool:
        return self._task is not None and not self._task.done()

    def next_start(self) -> asyncio.Future[None] | None:
        """The start loads wait for, while it is still to come."""
        start = self._next_start
        return start if start is not None and not start.done() else None

    def lost(self, children: list[int], come_back: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """A fork server was lost with these ``children`` (forked, not reported reaped):
        a start is to come, by the restart under way or by ``come_back`` in a new task."""
        if _orphans.reaps_orphans():
            self._left += children
        if self.next_start() is None:
            self._next_start = asyncio.get_running_loop().create_future()
        if not self.under_way:  # else lost again while restarting: that restart goes on
            self._task = asyncio.get_running_loop().create_task(
                come_back(), name="loadwarden-forkserver-restart"
            )
            self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        """A restart that ended with no start (a failure of its own) leaves no load waiting."""
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("forkserver_restart_failed", error=describe(exc))
        if task is self._task:  # not one ended as the next began (lost again at once)
            self.settle(SandboxError("the fork server's restart stopped"), again=False)

    def reap_left(self) -> None:
        """Reap what the lost fork servers left (PID 1 only), once they are reaped themselves:
        their children are reparented to us then. In a task: it waits for them to exit."""
        if self._left:
            task = asyncio.get_running_loop().create_task(
                _orphans.reap(self._left), name="loadwarden-forkserver-orphans"
            )
            self._reaping.add(task)
            task.add_done_callback(self._reaping.discard)
            self._left = []

    def settle(self, error: SandboxError | None, *, again: bool = True) -> None:
        """Tell the loads waiting for the next start how it went; after a failed one, the
        restart goes on (``again``): its next start is waited for anew."""
        start = self.next_start()
        if start is None:
            return
        if error is None:
            start.set_result(None)
            return
        start.set_exception(error)
        start.exception()  # retrieved: maybe no load was waiting
        if again:
            self._next_start = asyncio.get_running_loop().create_future()

    async def close(self) -> None:
        """Stop restarting: the loads waiting fail; the reaping stops (the rest is init's)."""
        if self._task is not None:
            await cancel_and_wait(self._task)
        self.settle(SandboxError("the worker is closing"), again=False)
        for task in list(self._reaping):
            await cancel_and_wait(task)
