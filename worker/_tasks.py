"""Small asyncio helpers shared by the worker's modules."""

from __future__ import annotations

import asyncio
from typing import Any


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
