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
from loadwarden.producer.keys import FINISHED_CHANNEL, FINISHED_REPORTS_CHANNEL
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
        await raw.publish(FINISHED_REPORTS_CHANNEL, finished.push_message("job-b", None))
        await raw.publish(FINISHED_REPORTS_CHANNEL, finished.push_message("job-a", None))
        await asyncio.wait_for(event.wait(), 10)
        watch.unwatch(["job-a"], event)
        assert watch._watches == {}
    finally:
        await raw.aclose()


async def test_the_push_carries_the_stored_result(
    client: Client, settings: Settings, small_model: Path, redis_url: str
) -> None:
    """A worker pushes a finished job's stored result as stored, and its id on the id channel."""
    raw = redis_client(redis_url)
    pubsub = raw.pubsub()
    try:
        await pubsub.subscribe(FINISHED_CHANNEL, FINISHED_REPORTS_CHANNEL)
        handle = await client.enqueue(LoadRequest(source=str(small_model)))
        async with running_worker(settings):
            messages: dict[str, bytes] = {}
            async with asyncio.timeout(20):
                while len(messages) < 2:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                    if message is not None:
                        messages[message["channel"].decode()] = message["data"]
        stored = await raw.get(result_key_prefix + handle.job_id)
    finally:
        await pubsub.aclose()
        await raw.aclose()
    assert messages[FINISHED_CHANNEL] == handle.job_id.encode()
    assert messages[FINISHED_REPORTS_CHANNEL] == stored
    assert finished.read_push(stored)[0] == handle.job_id


async def test_a_pushed_report_is_not_read_back(
    no_fallback: None, client: Client, redis_url: str
) -> None:
    """A waiter takes the valid report a push carries; one that carries an invalid report
    (or only an id) sends it to the stored result, which is judged as before."""
    raw = redis_client(redis_url)
    try:
        handle = await client.enqueue(LoadRequest(source="/nowhere.safetensors"))
        waiter = await _subscribed_waiter(client, handle.job_id)
        # Nothing stored: only the push can answer. A bad report in it wakes the waiter,
        # which reads the (absent) stored result and waits on.
        bad = {"id": handle.job_id, "s": True, "r": {"job_id": handle.job_id}}
        before = await _gets(client)
        await raw.publish(FINISHED_REPORTS_CHANNEL, wire.dumps(bad))
        await eventually(lambda: _more_gets(client, before), what="the read after a bad push")
        assert not waiter.done()
        good = {"id": handle.job_id, "s": True, "r": _minimal_report(handle.job_id)}
        before = await _gets(client)
        await raw.publish(FINISHED_REPORTS_CHANNEL, wire.dumps(good))
        found = await asyncio.wait_for(waiter, 10)
        assert found.job_id == handle.job_id  # type: ignore[attr-defined]
        assert await _gets(client) == before  # taken from the push, not read back
        assert (await client.finish_watch())._pushed == {}
    finally:
        await raw.aclose()


def test_a_big_result_is_pushed_as_its_id() -> None:
    """A result past the cap travels as its job's id only; a bare id is read as one."""
    small = wire.dumps({"id": "j", "s": True, "r": {}})
    big = wire.dumps({"id": "j", "s": True, "r": {"x": "y" * finished.PUSHED_RESULT_MAX_BYTES}})
    assert finished.read_push(finished.push_message("j", small)) == ("j", wire.loads(small))
    assert finished.read_push(finished.push_message("j", big)) == ("j", None)
    assert finished.read_push(finished.push_message("j", None)) == ("j", None)
    assert finished.read_push(b"plain-id") == ("plain-id", None)


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


def test_a_blocking_client_is_subscribed_only_during_a_call(redis_url: str) -> None:
    """Between two calls nothing reads a BlockingClient's subscription, so none is left
    open: pushes for every finished job in the fleet would pile up in Redis for it."""
    from loadwarden.producer.client import BlockingClient
    from loadwarden.producer.connection import blocking_redis_client
    from loadwarden.producer.errors import JobNotFound, ReportTimeout
    from tests.conftest import call_until

    probe = blocking_redis_client(redis_url)

    def subscribers() -> int:
        [(_channel, count)] = probe.pubsub_numsub(FINISHED_REPORTS_CHANNEL)
        return int(count)

    try:
        with BlockingClient(redis_url) as client:
            handle = client.enqueue(LoadRequest(source="/nowhere/model.safetensors"))
            # No worker runs: the wait subscribes, reads, and gives up at its timeout.
            with pytest.raises(ReportTimeout):
                client.report(handle.job_id, timeout_s=0.5)
            call_until(lambda: subscribers() == 0, timeout_s=5.0)
            with pytest.raises(JobNotFound):
                client.report("no-such-job", timeout_s=5.0)
            call_until(lambda: subscribers() == 0, timeout_s=5.0)
    finally:
        probe.close()
