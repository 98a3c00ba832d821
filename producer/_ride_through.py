"""Riding through a Redis outage: redis-py's Retry with a time budget, and its backoff.

Once a client has reached Redis, a command that meets a dropped connection, a
timeout, a server still loading its data, or a demoted primary is retried with
backoff for ``ride_through_s``; only then does the caller see the error. A server
never reached at all fails at once (a wrong URL should not look like an outage).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

T = TypeVar("T")

#: First and longest pause between two attempts of a ride-through: quick enough to be
#: back within a second of a restart, slow enough not to hammer a recovering server.
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 2.0
#: Errors a ride-through retries: the connection dropped or timed out, the server is loading
#: its data (BusyLoadingError is a ConnectionError), or it was demoted under us (READONLY).
#: OSError: redis-py retries a connect *before* turning its OSError (refused, no socket
#: file, timed out) into a ConnectionError, so a new connection to a restarting server
#: raises that.
RETRIED = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError)

#: Set while a command's ride-through runs, so the connect() nested inside it (redis-py
#: wraps both in the same Retry) makes one attempt and leaves the loop to the outer call.
_retrying: ContextVar[bool] = ContextVar("loadwarden_redis_retrying", default=False)


class RideThrough(Retry):
    """redis-py's Retry with a time budget instead of a count, shared by a client's connections.

    redis-py deep-copies a Retry into every connection; this one returns itself, so
    whether the client has ever reached Redis is known to all of its connections.
    """

    __slots__ = ("budget_s", "reached")

    def __init__(self, budget_s: float) -> None:
        super().__init__(NoBackoff(), 0, RETRIED)  # type: ignore[arg-type]
        self.budget_s = budget_s
        self.reached = False

    def __deepcopy__(self, memo: dict[int, Any]) -> RideThrough:
        return self

    async def call_with_retry(
        self, do: Callable[[], Awaitable[T]], fail: Callable[[RedisError], Any]
    ) -> T:
        if _retrying.get():
            return await do()
        token = _retrying.set(True)
        try:
            return await self._loop(do, fail)
        finally:
            _retrying.reset(token)

    async def _loop(self, do: Callable[[], Awaitable[T]], fail: Callable[[RedisError], Any]) -> T:
        started = time.monotonic()
        failures = 0
        while True:
            try:
                result = await do()
            except RETRIED as error:
                await fail(error)  # type: ignore[arg-type]  # drops the connection
                if not self.reached:
                    raise  # never reached: a wrong address, not an outage
                failures += 1
                # Full jitter: clients that lost the same server do not come back in step.
                pause = random.uniform(0, min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2**failures))
                elapsed = time.monotonic() - started
                if elapsed + pause >= self.budget_s:
                    raise type(error)(
                        f"{error} (still failing after {elapsed:.1f} s of retries; "
                        f"LOADWARDEN_REDIS__RIDE_THROUGH_S={self.budget_s:g})"
                    ) from error
                await asyncio.sleep(pause)
            else:
                self.reached = True
                return result


def stop_riding_through(client: Redis) -> None:
    """From now on this client's commands fail at the first error (a process shutting down
    should not wait out a Redis outage)."""
    retry = client.connection_pool.connection_kwargs.get("retry")
    if isinstance(retry, RideThrough):
        retry.budget_s = 0.0
