"""The node's memory budget: a load starts only when its limit fits beside the running ones."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

from loadwarden.producer.errors import SourceRefused
from loadwarden.worker.sandbox.memory_limit import detect_memory_limit


def detect_memory_bytes(root: Path = Path("/")) -> int:
    """The memory this worker may use: its container's (cgroup) limit, else the machine's."""
    machine = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = detect_memory_limit(root).limit_bytes
    return min(machine, limit) if limit else machine


class Admission:
    """Admits loads, first come first served, while the sum of their memory limits fits the budget.

    Waiting loads hold no CPU: each waits on a future that a release resolves.
    Strict FIFO: a large load at the head is not starved by small ones behind it.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.in_use_bytes = 0
        self.running = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _grant(self, memory_bytes: int) -> None:
        self.in_use_bytes += memory_bytes
        self.running += 1

    def _release(self, memory_bytes: int) -> None:
        self.in_use_bytes -= memory_bytes
        self.running -= 1
        while self._waiters:
            need, future = self._waiters[0]
            if future.done():  # cancelled while waiting
                self._waiters.popleft()
                continue
            if self.in_use_bytes + need > self.budget_bytes:
                break
            self._waiters.popleft()
            self._grant(need)
            future.set_result(None)

    @contextlib.asynccontextmanager
    async def reserve(self, memory_bytes: int) -> AsyncIterator[None]:
        """Hold ``memory_bytes`` of the budget for the body, waiting until it fits.

        A load whose limit exceeds the whole budget can never start: refused at once.
        """
        if memory_bytes > self.budget_bytes:
            raise SourceRefused(
                f"the load's memory limit of {memory_bytes} bytes exceeds this worker's whole "
                f"budget of {self.budget_bytes} bytes; send it to a worker with more memory",
                code="over_budget",
            )
        if not self._waiters and self.in_use_bytes + memory_bytes <= self.budget_bytes:
            self._grant(memory_bytes)
        else:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append((memory_bytes, future))
            try:
                await future
            except asyncio.CancelledError:
                if future.done() and not future.cancelled():  # granted as we were cancelled
                    self._release(memory_bytes)
                raise
        try:
            yield
        finally:
            self._release(memory_bytes)
