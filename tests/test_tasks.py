"""The worker's small asyncio helpers keep a cancel whatever the work they wait on does."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from loadwarden.worker._tasks import finish_despite_cancel


async def test_a_cancel_outlives_work_that_fails_after_it() -> None:
    """Cancelled mid-write, then the write fails (Redis gone): the caller ends cancelled,
    not with the write's error, which a caller catching Redis errors would swallow."""
    started, fail = asyncio.Event(), asyncio.Event()

    async def write() -> None:
        started.set()
        await fail.wait()
        raise RedisConnectionError("Connection closed by server.")

    async def caller() -> str:
        try:
            await finish_despite_cancel(write())
        except RedisConnectionError:
            return "carried on"  # what the heartbeat did: log it and beat again
        return "finished"

    task = asyncio.create_task(caller())
    await started.wait()
    task.cancel()  # reaches the caller before the failure reaches the write: both queued
    fail.set()
    done, _ = await asyncio.wait({task}, timeout=10)
    assert done == {task}
    assert task.cancelled()


async def test_work_that_fails_uncancelled_raises_its_error() -> None:
    async def write() -> None:
        raise RedisConnectionError("gone")

    with pytest.raises(RedisConnectionError):
        await finish_despite_cancel(write())


async def test_work_finishes_before_the_cancel_is_raised() -> None:
    """The write still completes when the caller is cancelled meanwhile."""
    started, release = asyncio.Event(), asyncio.Event()
    written: list[str] = []

    async def write() -> str:
        started.set()
        await release.wait()
        written.append("x")
        return "ok"

    task = asyncio.create_task(finish_despite_cancel(write()))
    await started.wait()
    task.cancel()
    release.set()
    done, _ = await asyncio.wait({task}, timeout=10)
    assert done == {task} and task.cancelled() and written == ["x"]
