"""An idle worker is woken by an enqueue, a full one by a freed slot: no poll interval to wait.

Each test gives the worker a fallback poll (``poll_delay_s``) far longer than the
bound it checks: a job taken only at the worker's next look would miss it.
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from loadwarden.producer.client import Client
from loadwarden.producer.connection import redis_client
from loadwarden.producer.contract import LimitOverrides, LoadRequest, Outcome, RetryPolicy
from loadwarden.producer.keys import wake_key
from loadwarden.worker.config import Settings
from tests.conftest import eventually, running_worker

#: The worker's fallback poll in these tests (below the 5 s socket timeout BLPOP must fit in).
FALLBACK_S = 4.5
#: A tiny load, woken at once, ends far within this; one found by the fallback cannot.
BOUND_S = 3.0
#: How late after its backoff a retry may start (its wake, a look, a claim, a spawn).
RETRY_SLACK_S = 1.5


async def _blocked_on_wake(redis_url: str, settings: Settings) -> dict[str, str] | None:
    """The connection of a worker that sits in BLPOP on the queue's wake list now (CLIENT
    LIST's fields), if one does."""
    raw = redis_client(redis_url)
    try:
        clients = await raw.client_list()
    finally:
        await raw.aclose()
    blocked = [c for c in clients if c.get("cmd") == "blpop" and "b" in c.get("flags", "")]
    return blocked[0] if blocked else None


async def test_an_enqueue_wakes_an_idle_worker(
    redis_url: str, small_model: object, settings: Settings
) -> None:
    """A job enqueued while the worker waits on the wake list is taken at once."""
    slow = settings.model_copy(update={"poll_delay_s": FALLBACK_S})
    async with running_worker(slow), Client(settings=slow) as client:
        await eventually(lambda: _blocked_on_wake(redis_url, slow), what="worker blocked")
        handle = await client.enqueue(LoadRequest(source=str(small_model)))
        report = await handle.report(timeout_s=BOUND_S)
        assert report.outcome is Outcome.OK
        raw = redis_client(redis_url)
        assert await raw.llen(wake_key(slow.queue_name)) == 0  # the token was taken
        await raw.aclose()


async def test_the_look_after_a_wake_is_sent_with_the_wait(
    redis_url: str, small_model: object, settings: Settings
) -> None:
    """An idle worker's next look at the queue goes out with its BLPOP, queued behind it in
    Redis (which runs it as soon as BLPOP returns): a wake costs no round trip before the
    claim. The job that look finds is run."""
    slow = settings.model_copy(update={"poll_delay_s": FALLBACK_S})

    async def look_queued() -> bool:  # unread in the blocked connection's query buffer
        waiting = await _blocked_on_wake(redis_url, slow)
        return waiting is not None and int(waiting["qbuf"]) > 0

    async with running_worker(slow), Client(settings=slow) as client:
        await eventually(look_queued, timeout_s=BOUND_S, what="a look behind the BLPOP")
        handle = await client.enqueue(LoadRequest(source=str(small_model)))
        assert (await handle.report(timeout_s=BOUND_S)).outcome is Outcome.OK


async def test_a_freed_slot_wakes_a_full_worker(
    redis_url: str, small_model: object, settings: Settings
) -> None:
    """With every slot busy, the next job starts as soon as one ends, not at the next look."""
    slow = settings.model_copy(update={"poll_delay_s": FALLBACK_S, "concurrency": 1})
    async with running_worker(slow), Client(settings=slow) as client:
        await eventually(lambda: _blocked_on_wake(redis_url, slow), what="worker blocked")
        handles = [
            await client.enqueue(LoadRequest(source=str(small_model), labels={"n": str(i)}))
            for i in range(3)
        ]
        for handle in handles:
            assert (await handle.report(timeout_s=BOUND_S)).outcome is Outcome.OK


async def test_a_retry_wakes_an_idle_worker_when_due(
    redis_url: str, small_model: object, settings: Settings
) -> None:
    """A job re-queued for a retry (a later score) wakes the idle worker, which then waits
    only until the retry is due: the second attempt starts within a bound of its backoff,
    not at the fallback poll the worker's wait was computed for before the retry."""
    slow = settings.model_copy(update={"poll_delay_s": FALLBACK_S, "concurrency": 2})
    request = LoadRequest(
        source=str(small_model),
        limits=LimitOverrides(timeout_seconds=0.3),
        retry=RetryPolicy(max_attempts=2, base_s=0.5, max_s=0.5),
    )
    async with (
        running_worker(slow, loaders={"safetensors": "hang"}),
        Client(settings=slow) as client,
    ):
        await eventually(lambda: _blocked_on_wake(redis_url, slow), what="worker blocked")
        report = await (await client.enqueue(request)).report(timeout_s=2 * FALLBACK_S)
    first, second = report.attempts
    assert first.outcome is Outcome.TIMEOUT and first.delay_s is not None
    gap_s = (second.started_at - first.finished_at).total_seconds()
    assert gap_s < first.delay_s + RETRY_SLACK_S, (gap_s, first.delay_s)


def test_fallback_poll_must_fit_in_the_socket_timeout() -> None:
    """A fallback poll as long as the socket timeout would read as a dead connection."""
    with pytest.raises(ValidationError, match="poll_delay_s"):
        Settings(poll_delay_s=5.0)
