"""A waiting producer learns of a finished job by the worker's push, not by polling."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from arq.constants import result_key_prefix

from loadwarden.producer import finished, wire
from loadwarden.producer.client import Client
from loadwarden.producer.connection import redis_client
from loadwarden.producer.contract import (
    LimitOverrides,
    LoadReport,
    LoadRequest,
    Outcome,
    WorkerInfo,
)
from loadwarden.producer.keys import FINISHED_CHANNEL
from loadwarden.worker.config import Settings
from tests.conftest import eventually, running_worker


@pytest.fixture
def no_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Waiters never poll while subscribed: a report can only come by a push (or a catch-up)."""
    monkeypatch.setattr(finished, "FALLBACK_POLL_S", 3600.0)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[Client]:
    async with Client(settings=settings) as c:
        yield c


async def _gets(client: Client) -> int:
    """How many GETs the server has run (the waiter's read of the report is one)."""
    stats = await (await client.redis()).info("commandstats")
    return int(stats.get("cmdstat_get", {}).get("calls", 0))


async def _subscribed_waiter(client: Client, job_id: str) -> asyncio.Task[object]:
    """A report() waiting on ``job_id``, returned once it has read once and waits for a push."""
    before = await _gets(client)
    waiter: asyncio.Task[object] = asyncio.create_task(client.report(job_id, timeout_s=60))
    watch = await client.finish_watch()
    await eventually(lambda: watch.live and job_id in watch._watches, what="waiter subscribed")
    # Its first read of the report has reached the server (and found none): from here only
    # a push (the fallback poll is an hour away) can end the wait.
    await eventually(lambda: _more_gets(client, before), what="the waiter's first read")
    assert not waiter.done()
    return waiter


async def _more_gets(client: Client, before: int) -> bool:
    return await _gets(client) > before


async def test_report_comes_by_the_workers_push(
    no_fallback: None, client: Client, settings: Settings, small_model: Path
) -> None:
    """A report() already waiting when the worker starts returns on the worker's push."""
    handle = await client.enqueue(LoadRequest(source=str(small_model)))
    waiter = await _subscribed_waiter(client, handle.job_id)
    async with running_worker(settings):
        report = await asyncio.wait_for(waiter, 20)
    assert report.outcome is Outcome.OK  # type: ignore[attr-defined]


async def test_preload_follows_its_jobs_by_pushes(
    no_fallback: None, client: Client, settings: Settings, small_model: Path
) -> None:
    """A batch whose jobs finish after it began waiting ends on the workers' pushes."""
    requests = [  # two jobs: a batch's job ids do not count labels
        LoadRequest(source=str(small_model), limits=LimitOverrides(timeout_seconds=60 + i))
        for i in range(2)
    ]
    batch = asyncio.create_task(client.preload(requests))
    watch = await client.finish_watch()
    await eventually(lambda: watch.live and len(watch._watches) == 2, what="batch subscribed")
    async with running_worker(settings):
        result = await asyncio.wait_for(batch, 30)
    assert result.totals.ok == 2


async def test_a_dropped_subscription_catches_up_on_what_it_missed(
    no_fallback: None, client: Client, redis_url: str
) -> None:
    """A result stored while the subscription was down (its push lost) still ends the wait."""
    raw = redis_client(redis_url)
    try:
        handle = await client.enqueue(LoadRequest(source="/nowhere.safetensors"))
        waiter = await _subscribed_waiter(client, handle.job_id)
        # Stored with no push, then the subscription is cut: only its catch-up can see it.
        result = wire.dumps({"s": True, "r": _minimal_report(handle.job_id), "t": 1, "f": "load"})
        await raw.set(result_key_prefix + handle.job_id, result)
        await raw.client_kill_filter(_type="pubsub")
        found = await asyncio.wait_for(waiter, 10)
        assert found.job_id == handle.job_id  # type: ignore[attr-defined]
    finally:
        await raw.aclose()


async def test_push_before_the_wait_is_not_missed(client: Client, redis_url: str) -> None:
    """A watch made before the subscription stands sees a push published right after."""
    raw = redis_client(redis_url)
    try:
        watch = await client.finish_watch()
        event = watch.watch(["job-a"])
        assert await watch.ready()
        await raw.publish(FINISHED_CHANNEL, "job-b")
        await raw.publish(FINISHED_CHANNEL, "job-a")
        await asyncio.wait_for(event.wait(), 10)
        watch.unwatch(["job-a"], event)
        assert watch._watches == {}
    finally:
        await raw.aclose()


def _minimal_report(job_id: str) -> dict[str, object]:
    """A valid LoadReport document with nothing but what identifies it."""
    now = datetime.now(UTC)
    return LoadReport(
        job_id=job_id,
        source="/nowhere.safetensors",
        outcome=Outcome.OK,
        attempts=[],
        worker=WorkerInfo(id="w", hostname="h", pid=1, version="0"),
        started_at=now,
        finished_at=now,
    ).model_dump(mode="json")
