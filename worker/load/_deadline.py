"""Deadlines: ``until`` keeps every one (each stage of a job, the child's conversation),
blocking work in a thread (``_tasks.in_thread``), and the child's deadline cut to what is
left of the job's."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from loadwarden.producer.contract import Limits
from loadwarden.worker._tasks import cancel_and_wait
from loadwarden.worker.load._outcome import Early, Stop, failure

T = TypeVar("T")


class Stopped(Exception):
    """``until`` stopped the work: its deadline passed or it was cancelled (``why``)."""

    def __init__(self, why: Stop) -> None:
        super().__init__(f"stopped by {why}")
        self.why = why


async def until(work: Awaitable[T], deadline: float, cancel: asyncio.Event | None) -> T:
    """Await ``work`` unless the loop's clock reaches ``deadline`` or ``cancel`` is set first.

    The one place a deadline is kept (each stage of a job, the child's conversation).
    Either way the work is cancelled and awaited (a download closes its connection, an
    inspection child is killed) before ``Stopped`` says why. A ``Stopped`` for a deadline
    and a cancel at once says cancel: somebody asked for it.
    """
    task = asyncio.ensure_future(work)
    waiters: set[asyncio.Future[Any]] = {task}
    cancelled = asyncio.ensure_future(cancel.wait()) if cancel is not None else None
    if cancelled is not None:
        waiters.add(cancelled)
    timeout = max(0.0, deadline - asyncio.get_running_loop().time())
    stopped = False
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if cancelled is not None:
            await cancel_and_wait(cancelled)
        if not task.done():
            stopped = True
            await cancel_and_wait(task)
    if not stopped:
        return task.result()
    if not task.cancelled() and task.exception() is None:
        _discard(task.result())  # it finished as it was being stopped: close what it opened
    raise Stopped(Stop.CANCEL if cancel is not None and cancel.is_set() else Stop.DEADLINE)


@dataclass(frozen=True, slots=True)
class JobDeadline:
    """The whole job's deadline (source, inspection, load) on the loop's clock, its length,
    and the event that cancels the job."""

    at: float
    budget_s: float
    cancel: asyncio.Event | None = None

    @classmethod
    def starting_now(cls, budget_s: float, cancel: asyncio.Event | None) -> JobDeadline:
        return cls(asyncio.get_running_loop().time() + budget_s, budget_s, cancel)

    def remaining_s(self) -> float:
        return self.at - asyncio.get_running_loop().time()

    async def before(self, work: Awaitable[T], stage: str) -> T:
        """``until`` for a stage of the job, its end told as the job's cancel or timeout."""
        try:
            return await until(work, self.at, self.cancel)
        except Stopped as exc:
            if exc.why is Stop.CANCEL:
                raise failure(Early.CANCELLED, f"cancelled while {stage}") from None
            raise failure(
                Early.DEADLINE, f"the job's {self.budget_s:g} s deadline passed while {stage}"
            ) from None


def _discard(result: object) -> None:
    close = getattr(result, "close", None)
    if callable(close):
        close()


#: Waits the job's deadline paid for (admission, a fork server's restart) that took more
#: than this share of the child's limit make its timeout not the model's (``failures``).
WAITED_SHARE = 0.1


def within(limits: Limits, deadline: JobDeadline, waits_began: float) -> tuple[Limits, bool]:
    """``limits`` with the child's deadline cut to what is left of the job's, and whether
    waits since ``waits_began`` (the loop's clock) took over ``WAITED_SHARE`` of it."""
    now = asyncio.get_running_loop().time()
    if deadline.at - now >= limits.timeout_seconds:
        return limits, False
    cut = max(0.001, round(deadline.at - now, 3))
    waited = now - waits_began > WAITED_SHARE * limits.timeout_seconds
    return limits.model_copy(update={"timeout_seconds": cut}), waited
