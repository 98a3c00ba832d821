"""How a waiting producer learns that a job finished: a push on ``loadwarden:finished``.

A worker publishes a job's id on ``FINISHED_CHANNEL`` right after arq has stored
its result; a client keeps one subscription (one connection, started on its first
wait) for all the jobs it waits on. Waiting is then: watch the job, *then* read
the result, and wait for a push only if it was not there. A result that lands
between the read and the wait still wakes the waiter: its push sets the watch's
event, or, if it came before the subscription stood, the subscription standing
does (every watch is woken then, to read once more). The first read does not
wait for the subscription: a report already there comes back at once.

The push only says "look now": the result in ``arq:result:<id>`` stays the one
source of truth, so a lost push costs latency, never a report. A waiter still
reads the result every ``FALLBACK_POLL_S`` while subscribed, and every
``UNSUBSCRIBED_POLL_S`` while the subscription is down (Redis restarting, a
Sentinel failover): then every watch is woken when it stands again, to catch up
on what was published meanwhile.

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

from redis.asyncio import Redis

from loadwarden.producer.connection import follow
from loadwarden.producer.keys import FINISHED_CHANNEL
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

# The standard library's logging, as httpx and redis-py log: a producer carries no structlog.
log = logging.getLogger("loadwarden.client")


class FinishWatch:
    """One client's subscription to finished jobs, shared by all of its waiters."""

    def __init__(self, redis: Redis, options: RedisOptions) -> None:
        self._redis = redis
        self._options = options
        self._watches: dict[str, set[asyncio.Event]] = {}
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
                FINISHED_CHANNEL,
                self._options,
                on_subscribed=self._caught_up,
                on_lost=self._lost,
                first_s=RESUBSCRIBE_FIRST_S,
                max_s=RESUBSCRIBE_MAX_S,
            ):
                for event in self._watches.get(data.decode(errors="replace"), ()):
                    event.set()
        finally:
            self._subscribed.clear()

    def _lost(self, exc: Exception, delay_s: float) -> None:
        """The subscription dropped: waiters poll until it stands again."""
        self._subscribed.clear()
        log.debug("finish_watch_lost: %s (subscribing again in %.2f s)", exc, delay_s)
