"""How loadwarden reaches Redis: one client factory for plain and Sentinel URLs, with timeouts.

Every process that talks to Redis (client, CLI, worker, arq's own pool, the
exporter, the embedded mode, the tests) gets its client from ``redis_client`` (or
its synchronous twin ``blocking_redis_client``), so they share one set of timeouts
and one reconnection policy (``RedisOptions`` in settings). What the factory puts
together lives beside it: the URLs it accepts (``_redis_url``), the ride-through of
an outage (``_ride_through``), connections and pipelines safe to cancel
(``_cancel_safe``), connections that pay less CPU per command (``_lean_io``), and how a
long-lived connection comes back (``_reconnect``).

The primary behind a Sentinel URL is found through redis-py's asyncio ``Sentinel``
(never by hand): a connection asks the Sentinels for the primary's address, and one
that meets a READONLY reply (its server was demoted) drops and asks again.
"""

from __future__ import annotations

from typing import Any, TypeVar, overload

import redis
import redis.sentinel
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.sentinel import (
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)
from redis.exceptions import RedisError

from loadwarden.producer._cancel_safe import cancel_safe_client, cancel_safe_connection
from loadwarden.producer._reconnect import Pauses, follow, subscribe
from loadwarden.producer._redis_url import (
    SENTINEL_DEFAULT_PORT,
    SENTINEL_SCHEMES,
    RedisTarget,
    parse_redis_url,
)
from loadwarden.producer._ride_through import (
    BACKOFF_FIRST_S,
    BACKOFF_MAX_S,
    RETRIED,
    RideThrough,
    stop_riding_through,
)
from loadwarden.producer.settings import RedisOptions

__all__ = [
    "BACKOFF_FIRST_S",
    "BACKOFF_MAX_S",
    "RETRIED",
    "SENTINEL_DEFAULT_PORT",
    "SENTINEL_SCHEMES",
    "WAIT_TICK_KEY",
    "NotReplicated",
    "Pauses",
    "RedisTarget",
    "RideThrough",
    "blocking_redis_client",
    "confirm_replicated",
    "follow",
    "parse_redis_url",
    "redis_client",
    "stop_riding_through",
    "subscribe",
]

R = TypeVar("R", bound=Redis)

#: The key written (INCR) right before WAIT: see ``confirm_replicated``.
WAIT_TICK_KEY = "loadwarden:replication:tick"


class NotReplicated(RedisError):
    """WAIT returned before the configured number of replicas acknowledged a write."""


class _Sentinels(Sentinel):
    """redis-py's Sentinel client, telling the ride-through when a Sentinel has answered.

    A Sentinel that knows the service proves the URL right: a primary that is down
    or being replaced is then an outage to ride through, not a wrong address.
    """

    def __init__(self, *args: Any, ride: RideThrough, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self._ride = ride

    def check_master_state(self, state: dict[str, Any], service_name: str) -> bool:
        self._ride.reached = True
        return bool(super().check_master_state(state, service_name))


async def _dropped(error: RedisError) -> None:
    """Nothing to drop: a failed checkout gave its connection back to the pool already."""


class _RidingCheckout(ConnectionPool):
    """A pool whose checkout rides through an outage too: redis-py connects a connection it
    hands out (its handshake: HELLO/AUTH/CLIENT SETINFO/SELECT) outside the command's Retry,
    so a connection lost in its handshake would fail the command at once."""

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        retry = self.connection_kwargs.get("retry")
        if not isinstance(retry, RideThrough):
            return await super().get_connection(*args, **kwargs)
        return await retry.call_with_retry(
            lambda: super(_RidingCheckout, self).get_connection(*args, **kwargs), _dropped
        )


class _SentinelPool(_RidingCheckout, SentinelConnectionPool):
    """A Sentinel-managed pool whose final close also closes the Sentinels' connections."""

    async def disconnect(self, inuse_connections: bool = True) -> None:
        await super().disconnect(inuse_connections)
        if inuse_connections:  # a full close (not the drop of a demoted primary's connections)
            for sentinel in self.sentinel_manager.sentinels:
                await sentinel.aclose()


def _socket_options(options: RedisOptions, url: str) -> dict[str, Any]:
    """Timeouts for every connection, to the data nodes and to the Sentinels alike."""
    # The kernel watches idle TCP peers too (a unix socket has none to watch).
    tcp = {"socket_keepalive": True} if not url.startswith("unix:") else {}
    return {
        "socket_connect_timeout": options.connect_timeout_s,
        "socket_timeout": options.socket_timeout_s,
        **tcp,
    }


def _sentinel_options(target: RedisTarget, socket: dict[str, Any]) -> dict[str, Any]:
    """What a Sentinel client takes besides its addresses: its own options and the data nodes'."""
    return {
        "sentinel_kwargs": {**socket, **target.sentinel_options},
        **target.options,
        "ssl": target.ssl,
    }


@overload
def redis_client(url: str, options: RedisOptions | None = None) -> Redis: ...
@overload
def redis_client(url: str, options: RedisOptions | None = None, *, redis_class: type[R]) -> R: ...
def redis_client(
    url: str, options: RedisOptions | None = None, *, redis_class: type[Redis] = Redis
) -> Redis:
    """A client for ``url`` (not yet connected; it connects on its first command)."""
    options = options or RedisOptions()
    target = parse_redis_url(url)
    redis_class = cancel_safe_client(redis_class)
    socket = _socket_options(options, url)
    common = {
        **socket,
        "health_check_interval": options.health_check_interval_s,
        "retry": RideThrough(options.ride_through_s),
        "retry_on_error": list(RETRIED),
    }
    if target.service is None:
        pool = _RidingCheckout.from_url(url, **common)
        pool.connection_class = cancel_safe_connection(pool.connection_class)
        return redis_class.from_pool(pool)
    sentinel = _Sentinels(
        list(target.sentinels),
        ride=common["retry"],
        **common,
        **_sentinel_options(target, socket),
    )
    managed = SentinelManagedSSLConnection if target.ssl else SentinelManagedConnection
    client: Redis = sentinel.master_for(
        target.service,
        redis_class=redis_class,
        connection_pool_class=_SentinelPool,
        connection_class=cancel_safe_connection(managed),
    )
    return client


def blocking_redis_client(url: str, options: RedisOptions | None = None) -> redis.Redis:
    """The synchronous twin of ``redis_client`` (same URLs and timeouts, no ride-through)."""
    options = options or RedisOptions()
    target = parse_redis_url(url)
    socket = _socket_options(options, url)
    if target.service is None:
        return redis.Redis.from_url(url, **socket)
    sentinel = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
        list(target.sentinels), **socket, **_sentinel_options(target, socket)
    )
    client: redis.Redis = sentinel.master_for(target.service)  # type: ignore[no-untyped-call]
    return client


async def confirm_replicated(client: Redis, options: RedisOptions) -> int | None:
    """With ``wait_replicas`` N > 0: block until N replicas have every write made so far.

    WAIT covers the writes of the connection it is sent on, and a client's pool may have
    made ours on another connection; so one INCR goes first on the same connection.
    Redis applies writes in one order and replicas take them in that order, so a
    replica that has the INCR has every write acknowledged before it, ours included.
    Returns the replicas that acknowledged (None when not asked); raises
    NotReplicated when fewer than N did within ``wait_timeout_s``.
    """
    wanted = options.wait_replicas
    if wanted <= 0:
        return None
    async with client.pipeline(transaction=False) as pipe:
        pipe.incr(WAIT_TICK_KEY)
        pipe.execute_command("WAIT", wanted, int(options.wait_timeout_s * 1000))
        _, acked = await pipe.execute()
    if int(acked) < wanted:
        raise NotReplicated(
            f"only {acked} of {wanted} replicas confirmed the write within "
            f"{options.wait_timeout_s:g} s (LOADWARDEN_REDIS__WAIT_REPLICAS)"
        )
    return int(acked)
