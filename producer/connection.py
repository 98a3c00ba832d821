"""How loadwarden reaches Redis: one client factory for plain and Sentinel URLs, with timeouts.

Every process that talks to Redis (client, CLI, worker, arq's own pool, the
exporter, the tests) gets its client from ``redis_client``, so they share one
set of timeouts and one reconnection policy (``RedisOptions`` in settings).

URLs::

    redis://[user:pass@]host[:port][/db]       rediss://… (TLS)     unix:///path[?db=N]
    redis+sentinel://[user:pass@]host:port[,host:port…]/service[/db]
    rediss+sentinel://…                        TLS to the Sentinels and to the data nodes

The user and password (or ``?username=`` / ``?password=``) are the data nodes'
(the primary's and replicas'), as in a plain URL; query options are redis-py's
own (``ssl_ca_certs``, ``ssl_cert_reqs``, ``ssl_certfile``, ``ssl_keyfile``, …).
Sentinels with an ACL of their own take ``?sentinel_username=…&sentinel_password=…``.
The primary is found through redis-py's asyncio ``Sentinel`` (never by hand): a
connection asks the Sentinels for the primary's address, and one that meets a
READONLY reply (its server was demoted) drops and asks again.

Ride-through: once a client has reached Redis, a command that meets a dropped
connection, a timeout, a server still loading its data, or a demoted primary is
retried with backoff for ``ride_through_s``; only then does the caller see the
error. A server never reached at all fails at once (a wrong URL should not
look like an outage).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import redis
import redis.sentinel
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.client import Pipeline, PubSub
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import (
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from loadwarden.producer.settings import RedisOptions

R = TypeVar("R", bound=Redis)
T = TypeVar("T")

#: URL schemes that name Sentinels rather than a server.
SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}
#: Sentinels listen on 26379 unless told otherwise (redis.io's sentinel docs).
SENTINEL_DEFAULT_PORT = 26379
#: First and longest pause between two attempts of a ride-through: quick enough to be
#: back within a second of a restart, slow enough not to hammer a recovering server.
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 2.0
#: The key written (INCR) right before WAIT: see ``confirm_replicated``.
WAIT_TICK_KEY = "loadwarden:replication:tick"
#: Errors a ride-through retries: the connection dropped or timed out, the server is loading
#: its data (BusyLoadingError is a ConnectionError), or it was demoted under us (READONLY).
#: OSError: redis-py retries a connect *before* turning its OSError (refused, no socket
#: file, timed out) into a ConnectionError, so a new connection to a restarting server
#: raises that.
RETRIED = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError)

#: Set while a command's ride-through runs, so the connect() nested inside it (redis-py
#: wraps both in the same Retry) makes one attempt and leaves the loop to the outer call.
_retrying: ContextVar[bool] = ContextVar("loadwarden_redis_retrying", default=False)


class NotReplicated(RedisError):
    """WAIT returned before the configured number of replicas acknowledged a write."""


@dataclass(frozen=True)
class RedisTarget:
    """A parsed Redis URL: a server (``sentinels`` empty) or a Sentinel-managed service."""

    url: str
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str | None = None
    ssl: bool = False
    #: Connection options for the data nodes (db, username, password, ssl_*), from the URL.
    options: dict[str, Any] = field(default_factory=dict)
    #: Options for the Sentinels themselves (their own ACL, TLS).
    sentinel_options: dict[str, Any] = field(default_factory=dict)

    @property
    def display(self) -> str:
        """The URL with any password masked, for messages and logs."""
        parts = urlsplit(self.url)
        if parts.password is None:
            return self.url
        return self.url.replace(f":{parts.password}@", ":***@", 1)


def _host_port(text: str) -> tuple[str, int]:
    if text.startswith("["):  # [v6]:port
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    if not host:
        raise ValueError(f"no host in {text!r}")
    try:
        return host, int(port) if port else SENTINEL_DEFAULT_PORT
    except ValueError:
        raise ValueError(f"bad port in {text!r}") from None


def parse_redis_url(url: str) -> RedisTarget:
    """Parse any URL loadwarden accepts; ValueError names what is wrong with it."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("redis", "rediss", "unix"):
        return RedisTarget(url=url, ssl=scheme == "rediss")
    if scheme not in SENTINEL_SCHEMES:
        raise ValueError(
            f"unsupported Redis URL scheme {parts.scheme!r}: use redis://, rediss://, "
            "unix://, redis+sentinel:// or rediss+sentinel://"
        )
    ssl = SENTINEL_SCHEMES[scheme]
    userinfo, _, hosts = parts.netloc.rpartition("@")
    sentinels = tuple(_host_port(h.strip()) for h in hosts.split(",") if h.strip())
    if not sentinels:
        raise ValueError("a Sentinel URL names at least one Sentinel: host:port[,host:port…]")
    path = [unquote(p) for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ValueError("a Sentinel URL's path is /SERVICE_NAME[/DB]")
    query = dict(parse_qsl(parts.query))
    options: dict[str, Any] = {}
    sentinel_options: dict[str, Any] = {}
    for key in ("sentinel_username", "sentinel_password"):
        if key in query:
            sentinel_options[key.removeprefix("sentinel_")] = query.pop(key)
    db = query.pop("db", path[1] if len(path) == 2 else "0")
    # The data nodes' credentials and TLS options, read exactly as redis-py reads a plain URL.
    plain = f"{'rediss' if ssl else 'redis'}://{userinfo + '@' if userinfo else ''}sentinel"
    parsed = redis.connection.parse_url(  # type: ignore[no-untyped-call]
        plain + ("?" + urlencode(query) if query else "")
    )
    parsed.pop("host", None)
    parsed.pop("port", None)
    parsed.pop("connection_class", None)
    try:
        options = {**parsed, "db": int(db)}
    except ValueError:
        raise ValueError(f"the database must be a number, not {db!r}") from None
    if ssl:
        sentinel_options |= {k: v for k, v in options.items() if k.startswith("ssl_")}
        sentinel_options["ssl"] = True
    return RedisTarget(
        url=url,
        sentinels=sentinels,
        service=path[0],
        ssl=ssl,
        options=options,
        sentinel_options=sentinel_options,
    )


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


class _CancelSafeWrites(AbstractConnection):
    """A connection whose writes keep a cancellation (redis-py 5 writes through wait_for).

    Python 3.11's ``asyncio.wait_for`` swallows a cancel that arrives as the write
    finishes (CPython gh-86296, fixed in 3.12), which is likely for a write that
    completes at once: measured, 3 in 200 cancelled pipelines kept running, and a
    lease-renewal task that ignores its cancel holds a job for ever. The same write
    under ``asyncio.timeout`` (which counts cancels correctly) instead.
    """

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        if not self.is_connected:
            await self.connect()  # type: ignore[no-untyped-call]
        elif check_health:
            await self.check_health()  # type: ignore[no-untyped-call]
        chunks = [command.encode()] if isinstance(command, str) else command
        chunks = [chunks] if isinstance(chunks, bytes) else chunks
        writer = self._writer
        assert writer is not None
        try:
            async with asyncio.timeout(self.socket_timeout):
                writer.writelines(chunks)
                await writer.drain()
        except TimeoutError:
            await self.disconnect(nowait=True)
            raise RedisTimeoutError("Timeout writing to socket") from None
        except OSError as exc:
            await self.disconnect(nowait=True)
            raise RedisConnectionError(f"Error while writing to socket: {exc}") from exc
        except BaseException:
            await self.disconnect(nowait=True)  # a partial write leaves the stream unusable
            raise


_SAFE: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def _cancel_safe(cls: type[AbstractConnection]) -> type[AbstractConnection]:
    if cls not in _SAFE:
        _SAFE[cls] = type(f"CancelSafe{cls.__name__}", (_CancelSafeWrites, cls), {})
    return _SAFE[cls]


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


class _SentinelPool(SentinelConnectionPool):
    """A Sentinel-managed pool whose final close also closes the Sentinels' connections."""

    async def disconnect(self, inuse_connections: bool = True) -> None:
        await super().disconnect(inuse_connections)
        if inuse_connections:  # a full close (not the drop of a demoted primary's connections)
            for sentinel in self.sentinel_manager.sentinels:
                await sentinel.aclose()


def stop_riding_through(client: Redis) -> None:
    """From now on this client's commands fail at the first error (a process shutting down
    should not wait out a Redis outage)."""
    retry = client.connection_pool.connection_kwargs.get("retry")
    if isinstance(retry, RideThrough):
        retry.budget_s = 0.0


class _ShieldedResetPipeline(Pipeline):
    """A pipeline whose reset (UNWATCH, release of its connection) a cancel cannot cut short.

    Cut short, the connection stays checked out and the pipeline is collected holding it
    ("Unclosed client session"): likely when a worker stops jobs mid-WATCH (arq's start).
    """

    async def reset(self) -> None:
        task = asyncio.ensure_future(super().reset())  # type: ignore[no-untyped-call]
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            await asyncio.wait({task})
            raise


class _SafePipelines(Redis):
    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        return _ShieldedResetPipeline(
            self.connection_pool, self.response_callbacks, transaction, shard_hint
        )


_SAFE_CLIENTS: dict[type[Redis], type[Redis]] = {}


def _safe_client_class(cls: type[Redis]) -> type[Redis]:
    if cls not in _SAFE_CLIENTS:
        _SAFE_CLIENTS[cls] = type(cls.__name__, (_SafePipelines, cls), {})
    return _SAFE_CLIENTS[cls]


def _connection_options(options: RedisOptions, *, tcp: bool = True) -> dict[str, Any]:
    extra = {"socket_keepalive": True} if tcp else {}  # the kernel watches idle TCP peers too
    return {
        "socket_connect_timeout": options.connect_timeout_s,
        "socket_timeout": options.socket_timeout_s,
        **extra,
        "health_check_interval": options.health_check_interval_s,
        "retry": RideThrough(options.ride_through_s),
        "retry_on_error": list(RETRIED),
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
    redis_class = _safe_client_class(redis_class)
    common = _connection_options(options, tcp=not url.startswith("unix:"))
    if target.service is None:
        pool = ConnectionPool.from_url(url, **common)
        pool.connection_class = _cancel_safe(pool.connection_class)
        return redis_class.from_pool(pool)
    sentinel_options = {
        "socket_connect_timeout": options.connect_timeout_s,
        "socket_timeout": options.socket_timeout_s,
        "socket_keepalive": True,
        **target.sentinel_options,
    }
    sentinel = _Sentinels(
        list(target.sentinels),
        ride=common["retry"],
        sentinel_kwargs=sentinel_options,
        **common,
        **target.options,
        ssl=target.ssl,
    )
    managed = SentinelManagedSSLConnection if target.ssl else SentinelManagedConnection
    client: Redis = sentinel.master_for(
        target.service,
        redis_class=redis_class,
        connection_pool_class=_SentinelPool,
        connection_class=_cancel_safe(managed),
    )
    return client


def blocking_redis_client(url: str, options: RedisOptions | None = None) -> redis.Redis:
    """The synchronous twin of ``redis_client`` (same URLs and timeouts, no ride-through)."""
    options = options or RedisOptions()
    target = parse_redis_url(url)
    tcp = not url.startswith("unix:")
    common = {k: v for k, v in _connection_options(options, tcp=tcp).items() if "socket" in k}
    if target.service is None:
        return redis.Redis.from_url(url, **common)
    sentinel = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
        list(target.sentinels),
        sentinel_kwargs={**common, **target.sentinel_options},
        **common,
        **target.options,
        ssl=target.ssl,
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
