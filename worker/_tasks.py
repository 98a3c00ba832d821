"""Small asyncio helpers shared by the worker's modules."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

T = TypeVar("T")


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel a task and wait until it has finished, without raising what it raised.

    Safe in a ``finally`` that runs because the caller is being cancelled: the
    wait does not re-raise the task's own CancelledError; only a new
    cancellation of the caller interrupts it.
    """
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled() and task.exception() is not None:
        task.exception()  # retrieved: the caller is tearing down, not interested


async def finish_despite_cancel(work: Awaitable[T]) -> T:
    """Await ``work`` to its end even if the caller is cancelled meanwhile, then re-raise.

    For short bookkeeping in ``finally`` blocks (a Redis write): plain ``shield`` lets
    a second cancellation return early and orphan the write on a connection that is
    about to be closed.
    """
    task = asyncio.ensure_future(work)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done() and task.cancelled():
                raise
            cancelled = True
        except BaseException:
            if not cancelled:
                raise
            # The work failed after we were cancelled (a write to a Redis that is gone, as
            # a shutdown often meets): the cancel wins, else a caller that catches the
            # error would carry on as if never cancelled (a heartbeat beat on forever).
    if cancelled:
        raise asyncio.CancelledError
    return task.result()


async def in_thread(fn: Callable[[], T], executor: Executor | None = None) -> T:
    """Run blocking work in a thread (the default executor's, or ``executor``'s); if
    cancelled, let it finish first (it may use our fds)."""
    future = (
        asyncio.ensure_future(asyncio.to_thread(fn))
        if executor is None
        else asyncio.get_running_loop().run_in_executor(executor, fn)
    )
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await future
        raise
