"""Deadlines: ``until`` keeps every one (each stage of a job, the child's conversation),
blocking work in a thread (``_tasks.in_thread``), and the child's deadline cut to what is
left of the job's."""

from __future__ import annotations

import asyncio
import functools
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


class CancelFlag(asyncio.Event):
    """A job's cancel: an ``asyncio.Event`` that ``until`` follows without a task of its own.

    ``until`` waits on each stage of a job (three for a tiny load); following a plain event
    takes a task per stage, whose start and cancel were half of ``until``'s cost.
    """

    def __init__(self) -> None:
        super().__init__()
        self._followers: set[asyncio.Future[None]] = set()

    def set(self) -> None:
        super().set()
        for future in self._followers:
            _wake(future)

    def follow(self, future: asyncio.Future[None]) -> None:
        """Resolve ``future`` once this is set (at once if it is): until ``unfollow``."""
        self._followers.add(future)
        if self.is_set():
            _wake(future)

    def unfollow(self, future: asyncio.Future[None]) -> None:
        self._followers.discard(future)


def _wake(future: asyncio.Future[None], *_: object) -> None:
    if not future.done():
        future.set_result(None)


async def until(work: Awaitable[T], deadline: float, cancel: asyncio.Event | None) -> T:
    """Await ``work`` unless the loop's clock reaches ``deadline`` or ``cancel`` is set first.

    The one place a deadline is kept (each stage of a job, the child's conversation).
    Either way the work is cancelled and awaited (a download closes its connection, an
    inspection child is killed) before ``Stopped`` says why. A ``Stopped`` for a deadline
    and a cancel at once says cancel: somebody asked for it.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(work)
    woken: asyncio.Future[None] = loop.create_future()  # the work ended, the clock or a cancel
    task.add_done_callback(functools.partial(_wake, woken))
    timer = loop.call_at(deadline, _wake, woken)
    watcher: asyncio.Task[Any] | None = None
    if isinstance(cancel, CancelFlag):
        cancel.follow(woken)
    elif cancel is not None:
        watcher = asyncio.ensure_future(cancel.wait())
        watcher.add_done_callback(functools.partial(_wake, woken))
    stopped = False
    try:
        await woken
    finally:
        timer.cancel()
        if isinstance(cancel, CancelFlag):
            cancel.unfollow(woken)
        if watcher is not None:
            await cancel_and_wait(watcher)
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
