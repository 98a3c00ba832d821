"""How a waiting producer learns that a job finished: a push on ``loadwarden:finished``.

A worker publishes a job's id on ``FINISHED_CHANNEL`` right after arq has stored
its result; a client keeps one subscription (one connection, started on its first
wait) for all the jobs it waits on. Waiting is then: watch the job, *then* read
the result, and wait for a push only if it was not there. A result that lands
between the read and the wait still wakes the waiter: its push sets the watch's
event, or, if it came before the subscription stood, the subscription standing
does (every watch is woken then, to read once more). The first read does not
wait for the subscription: a report already there comes back at once.

A lost push costs latency, never a report: the result in ``arq:result:<id>`` is
always there to read. A push that carries the result (below) is taken as it, so
whoever may PUBLISH on the reports channel is trusted as much as whoever may write
results: give producers and workers one Redis ACL, not publish rights to others. A waiter still
reads the result every ``FALLBACK_POLL_S`` while subscribed, and every
``UNSUBSCRIBED_POLL_S`` while the subscription is down (Redis restarting, a
Sentinel failover): then every watch is woken when it stands again, to catch up
on what was published meanwhile.

The push carries the result itself (``FINISHED_REPORTS_CHANNEL``: the stored
document, byte for byte, up to ``PUSHED_RESULT_MAX_BYTES``; past that only
``{"id": ...}``), so a waiter woken by it need not read it back: one round trip
less. It comes from Redis as the stored one does and is validated the same way;
one that does not hold a valid report is read from ``arq:result:<id>`` instead.
``FINISHED_CHANNEL`` keeps carrying the bare id, for clients that speak to Redis
directly (README, "Enqueueing from another language"). A client subscribes to the
reports channel only: with workers older than it, it falls back to its slow poll.

Why one channel for all jobs and not one per job: a subscription per waited job
costs a round trip per wait and a confirmation to track before the read; one
channel costs each subscribed client a few dozen bytes per finished job, which is
nothing at the rates a model loader runs (hundreds of jobs per second at most).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Any

from redis.asyncio import Redis

from loadwarden.producer import wire
from loadwarden.producer.connection import follow
from loadwarden.producer.errors import ContractError
from loadwarden.producer.keys import FINISHED_REPORTS_CHANNEL
from loadwarden.producer.settings import RedisOptions

#: While subscribed, a waiter still reads its result this often (a push lost on the way,
#: a worker of an older version that does not publish): a slow safety net, not the path.
FALLBACK_POLL_S = 1.0
#: While the subscription is down, waiters poll as they did before pushes existed.
UNSUBSCRIBED_POLL_S = 0.05
#: How long a first wait gives the subscription to stand before it polls instead.
SUBSCRIBE_WAIT_S = 1.0
#: First and longest pause before subscribing again after the connection dropped.
RESUBSCRIBE_FIRST_S = 0.1
RESUBSCRIBE_MAX_S = 5.0
#: Results up to this size travel in the push (a tiny load's is 1-3 KiB): every subscribed
#: client receives every push, and Redis drops a subscriber whose unread pushes pass 8 MiB
#: for a minute (its default pubsub buffer limit), so a big report (a checkpoint with
#: thousands of tensors) is read instead.
PUSHED_RESULT_MAX_BYTES = 16 * 1024

# The standard library's logging, as httpx and redis-py log: a producer carries no structlog.
log = logging.getLogger("loadwarden.client")


def push_message(job_id: str, result: bytes | None) -> bytes:
    """What a worker publishes on ``FINISHED_REPORTS_CHANNEL`` once ``result`` is stored."""
    if result is not None and len(result) <= PUSHED_RESULT_MAX_BYTES:
        return result  # arq's result document names its job ("id")
    return wire.dumps({"id": job_id})


def read_push(data: bytes) -> tuple[str, dict[str, Any] | None]:
    """The job a push names, and the result document it carries (None: read it instead).

    A push that is not our JSON is taken as a bare job id (a worker that publishes only
    that): at worst it wakes nobody, or wakes a waiter that then reads its result.
    """
    try:
        document = wire.loads(data)
    except ContractError:
        return data.decode(errors="replace"), None
    job_id = document.get("id")
    if not isinstance(job_id, str):
        return "", None
    return job_id, (document if "r" in document else None)


class FinishWatch:
    """One client's subscription to finished jobs, shared by all of its waiters."""

    def __init__(self, redis: Redis, options: RedisOptions) -> None:
        self._redis = redis
        self._options = options
        self._watches: dict[str, set[asyncio.Event]] = {}
        #: Result documents pushed for watched jobs, until a waiter takes them or unwatches.
        self._pushed: dict[str, dict[str, Any]] = {}
        self._subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def live(self) -> bool:
        """Whether pushes arrive now (else waiters poll at UNSUBSCRIBED_POLL_S)."""
        return self._subscribed.is_set()

    @property
    def poll_s(self) -> float:
        """How long a waiter may wait for a push before it reads its result anyway."""
        return FALLBACK_POLL_S if self.live else UNSUBSCRIBED_POLL_S

    def watch(self, job_ids: Iterable[str], event: asyncio.Event | None = None) -> asyncio.Event:
        """An event set when any of ``job_ids`` is announced (or the subscription came back)."""
        event = event or asyncio.Event()
        for job_id in job_ids:
            self._watches.setdefault(job_id, set()).add(event)
        return event

    def unwatch(self, job_ids: Iterable[str], event: asyncio.Event) -> None:
        for job_id in job_ids:
            events = self._watches.get(job_id)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._watches[job_id]
                    self._pushed.pop(job_id, None)

    def take(self, job_id: str) -> dict[str, Any] | None:
        """The result document a push brought for ``job_id`` (once), else None."""
        return self._pushed.pop(job_id, None)

    def start(self) -> None:
        """Subscribe, in the background, unless done already.

        Every watch is woken once the subscription stands: a waiter that watched its job
        before reading its result then reads again, so nothing stored before the
        subscription is missed, and anything stored after it is pushed.
        """
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._follow(), name="loadwarden-finish-watch")

    async def ready(self, wait_s: float = SUBSCRIBE_WAIT_S) -> bool:
        """Start the subscription if needed and wait (at most ``wait_s``) until it stands."""
        self.start()
        if not self._subscribed.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await self._subscribed.wait()
        return self._subscribed.is_set()

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._subscribed.clear()

    async def _caught_up(self) -> None:
        """The subscription stands (again): wake every waiter to read its result once more."""
        self._subscribed.set()
        for events in self._watches.values():
            for event in events:
                event.set()

    async def _follow(self) -> None:
        try:
            async for data in follow(
                self._redis,
                FINISHED_REPORTS_CHANNEL,
                self._options,
                on_subscribed=self._caught_up,
                on_lost=self._lost,
                first_s=RESUBSCRIBE_FIRST_S,
                max_s=RESUBSCRIBE_MAX_S,
            ):
                job_id, document = read_push(data)
                events = self._watches.get(job_id)
                if events:
                    if document is not None:
                        self._pushed[job_id] = document
                    for event in events:
                        event.set()
        finally:
            self._subscribed.clear()

    def _lost(self, exc: Exception, delay_s: float) -> None:
        """The subscription dropped: waiters poll until it stands again."""
        self._subscribed.clear()
        log.debug("finish_watch_lost: %s (subscribing again in %.2f s)", exc, delay_s)
