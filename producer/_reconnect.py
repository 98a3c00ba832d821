"""Coming back after Redis dropped a long-lived connection: the pauses, and a subscription.

``Pauses`` is how long to wait before each new attempt (doubling, up to a
ceiling, back to the first once the connection works): the one backoff of every
reconnect loop (this module's ``follow``, the worker's restart of arq).
``subscribe`` yields a channel's messages until its connection fails; ``follow``
subscribes again after each loss, for as long as its caller listens.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from loadwarden.producer.settings import RedisOptions


class Pauses:
    """Waits between attempts to reconnect: ``first_s``, doubling up to ``max_s``, until reset."""

    def __init__(self, first_s: float, max_s: float) -> None:
        self.first_s = first_s
        self.max_s = max_s
        #: The pause before the next attempt (what a log line says it will wait).
        self.next_s = first_s

    def reset(self) -> None:
        """The connection works again: the next loss waits ``first_s``."""
        self.next_s = self.first_s

    def advance(self) -> float:
        """The pause to take now; the one after it is twice as long (at most ``max_s``)."""
        pause, self.next_s = self.next_s, min(self.next_s * 2, self.max_s)
        return pause

    async def wait(self) -> None:
        await asyncio.sleep(self.advance())


async def subscribe(
    client: Redis,
    channel: str,
    options: RedisOptions,
    on_subscribed: Callable[[], Awaitable[None]] | None = None,
) -> AsyncIterator[bytes]:
    """Yield the messages of ``channel``; raise ConnectionError when the connection goes quiet.

    redis-py's own health check sends PINGs on a subscribed connection but never
    notices that no answer came back, so a half-open connection would silence the
    channel for ever: here a PING goes out every ``health_check_interval_s`` (or 1 s)
    and a PONG must follow within ``socket_timeout_s``. ``on_subscribed`` runs each time
    the subscription stands (Redis confirmed it), the first time and after redis-py
    reconnected and subscribed again by itself, to catch up on what was published while
    it did not.
    """
    interval = options.health_check_interval_s or 1.0
    pubsub: PubSub = client.pubsub()
    async with pubsub:
        await pubsub.subscribe(channel)
        # SUBSCRIBE is only sent so far: until Redis confirms it, a publish may still pass us
        # by, and a read made on another connection to "catch up" could come before it.
        async with asyncio.timeout(options.socket_timeout_s):
            while True:
                confirmed = await pubsub.get_message(timeout=options.socket_timeout_s)
                if confirmed is not None and confirmed.get("type") == "subscribe":
                    break
        if on_subscribed is not None:
            await on_subscribed()
        loop = asyncio.get_running_loop()
        me = asyncio.current_task()
        next_ping = loop.time() + interval
        awaiting_pong_since: float | None = None
        while True:
            message = await pubsub.get_message(timeout=min(1.0, interval))
            if me is not None and me.cancelling():
                # redis-py's read timeout can swallow a cancel that lands as it expires.
                raise asyncio.CancelledError
            now = loop.time()
            if message is not None:
                kind = message.get("type")
                if kind == "pong":
                    awaiting_pong_since = None
                elif kind == "message":
                    yield bytes(message["data"])
                elif kind == "subscribe" and on_subscribed is not None:
                    # redis-py reconnected under us and subscribed again (its retry does so
                    # without telling): what was published in between is caught up on too.
                    await on_subscribed()
            if awaiting_pong_since is not None and now - awaiting_pong_since > (
                options.socket_timeout_s
            ):
                raise RedisConnectionError(
                    f"no answer on the {channel!r} subscription for {options.socket_timeout_s:g} s"
                )
            if awaiting_pong_since is None and now >= next_ping:
                await pubsub.ping()
                awaiting_pong_since = now
                next_ping = now + interval


async def follow(
    client: Redis,
    channel: str,
    options: RedisOptions,
    *,
    on_subscribed: Callable[[], Awaitable[None]] | None = None,
    on_lost: Callable[[Exception, float], object],
    first_s: float,
    max_s: float,
) -> AsyncIterator[bytes]:
    """``subscribe`` for ever: when the connection is lost, ``on_lost(error, pause_s)`` is
    called and the subscription made again after the pause, which doubles from ``first_s``
    to ``max_s`` while no message comes through (a message brings it back to ``first_s``)."""
    pauses = Pauses(first_s, max_s)
    while True:
        try:
            async for data in subscribe(client, channel, options, on_subscribed):
                pauses.reset()
                yield data
        except (RedisError, OSError) as exc:
            on_lost(exc, pauses.next_s)
        await pauses.wait()
