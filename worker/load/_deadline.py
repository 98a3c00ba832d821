"""The whole job's deadline: each stage (source, inspection, hashing) awaited before it or
a cancel, blocking work in a thread, and the child's deadline cut to what is left."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from loadwarden.producer.contract import Limits
from loadwarden.producer.errors import LoadCancelled, LoadTimeout
from loadwarden.worker._tasks import cancel_and_wait

T = TypeVar("T")


async def in_thread(fn: Callable[[], T]) -> T:
    """Run blocking work in a thread; if cancelled, let it finish first (it may use our fds)."""
    future = asyncio.ensure_future(asyncio.to_thread(fn))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await future
        raise


async def before_deadline(
    work: Awaitable[T],
    stage: str,
    deadline: float,
    budget_s: float,
    cancel: asyncio.Event | None,
) -> T:
    """Await ``work`` unless the job's deadline passes or it is cancelled first.

    Either way the work is cancelled and awaited (a download closes its
    connection, an inspection child is killed) before the error is raised.
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
    if cancel is not None and cancel.is_set():
        raise LoadCancelled(f"cancelled while {stage}", code="cancelled")
    raise LoadTimeout(f"the job's {budget_s:g} s deadline passed while {stage}", code="deadline")


def _discard(result: object) -> None:
    close = getattr(result, "close", None)
    if callable(close):
        close()


def within(limits: Limits, remaining_s: float) -> Limits:
    """``limits`` with the child's deadline cut to what is left of the job's."""
    if remaining_s >= limits.timeout_seconds:
        return limits
    return limits.model_copy(update={"timeout_seconds": max(0.001, round(remaining_s, 3))})
