"""How loadwarden reaches Redis: URLs, ride-through of a restart, half-open connections, WAIT."""

from __future__ import annotations

import ast
import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from loadwarden.producer import Client, LoadRequest
from loadwarden.producer.connection import (
    NotReplicated,
    Pauses,
    RideThrough,
    blocking_redis_client,
    confirm_replicated,
    follow,
    parse_redis_url,
    redis_client,
    subscribe,
)
from loadwarden.producer.contract import Outcome
from loadwarden.producer.errors import RedisUnavailable
from loadwarden.producer.settings import RedisOptions
from loadwarden.worker._tasks import cancel_and_wait
from loadwarden.worker.config import Settings
from loadwarden.worker.queue._redis_server import RedisServer
from loadwarden.worker.queue.runner import WorkerRunner
from tests.conftest import StartWorker, call_until, eventually
from tests.tcp_proxy import FreezingProxy

LOADWARDEN = str(Path(sys.executable).parent / "loadwarden")
#: Tight bounds so a half-open connection is given up on in about two seconds.
TIGHT = RedisOptions(
    connect_timeout_s=0.5,
    socket_timeout_s=0.5,
    health_check_interval_s=0.2,
    ride_through_s=1.5,
    wait_timeout_s=0.2,
)


@pytest.mark.parametrize(
    ("url", "sentinels", "service", "db", "ssl"),
    [
        ("redis+sentinel://h1:26379,h2:1/svc", [("h1", 26379), ("h2", 1)], "svc", 0, False),
        ("redis+sentinel://:pw@h1/svc/3", [("h1", 26379)], "svc", 3, False),
        ("rediss+sentinel://u:p@[::1]:5000,h:1/s?db=2", [("::1", 5000), ("h", 1)], "s", 2, True),
    ],
)  # fmt: skip
def test_sentinel_urls_parse(
    url: str, sentinels: list[tuple[str, int]], service: str, db: int, ssl: bool
) -> None:
    """A Sentinel URL names its Sentinels, the service and the database; TLS by scheme."""
    target = parse_redis_url(url)
    assert list(target.sentinels) == sentinels
    assert (target.service, target.options["db"], target.ssl) == (service, db, ssl)


def test_sentinel_url_credentials_are_the_data_nodes() -> None:
    """user:pass@ is the primary's password (URL-decoded); the Sentinels' own comes by query."""
    target = parse_redis_url(
        "rediss+sentinel://u:p%40ss@h:1/svc?sentinel_password=s&ssl_cert_reqs=none"
    )
    assert (target.options["username"], target.options["password"]) == ("u", "p@ss")
    assert target.sentinel_options["password"] == "s" and target.sentinel_options["ssl"]
    assert "p@ss" not in target.display and "p%40ss" not in target.display


@pytest.mark.parametrize(
    "url", ["redis+sentinel:///svc", "redis+sentinel://h:1/", "redis+sentinel://h:x/s", "http://h"]
)
def test_bad_urls_are_refused_with_a_reason(url: str) -> None:
    """A URL that names no Sentinel, no service, a bad port or an unknown scheme is refused."""
    with pytest.raises(ValueError, match=r"Sentinel|port|scheme"):
        parse_redis_url(url)


async def test_client_refuses_a_bad_url_clearly() -> None:
    """The client reports a malformed URL as RedisUnavailable naming the URL."""
    with pytest.raises(RedisUnavailable, match="bad Redis URL"):
        await Client("redis+sentinel://nohost:abc/svc").connect()


async def test_report_rides_through_a_restart(
    start_worker: StartWorker, small_model: Path, tmp_path: Path
) -> None:
    """A preload under way while Redis (AOF) restarts finishes: every entry ok, no error raised."""
    server = RedisServer(appendonly=True, data_dir=tmp_path / "redis").start()
    try:
        start_worker(server.url, "brief", concurrency=4, lease_s=2, lease_renew_s=0.5)
        requests = [
            (f"m{i}", LoadRequest(source=str(small_model), labels={"n": str(i)})) for i in range(24)
        ]
        async with Client(server.url) as client:
            done = asyncio.Event()

            def progress(entry: object, *_: object) -> None:
                done.set()

            batch = asyncio.create_task(client.preload(requests, on_progress=progress))
            await asyncio.wait_for(done.wait(), 30)  # the batch is under way
            server.stop()
            server.start()
            result = await asyncio.wait_for(batch, 55)
        assert result.totals.ok == len(requests), result.totals
    finally:
        server.close()


async def test_redis_gone_for_good_is_a_clear_error_in_bounded_time(tmp_path: Path) -> None:
    """Once the ride-through is spent, the client raises RedisUnavailable saying so."""
    server = RedisServer(data_dir=tmp_path / "redis").start()
    settings = Settings(redis_url=server.url, redis=TIGHT)
    try:
        async with Client(settings=settings) as client:
            handle = await client.enqueue(LoadRequest(source=str(tmp_path / "m.safetensors")))
            server.stop(kill=True)
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(RedisUnavailable, match="RIDE_THROUGH_S"):
                await handle.report(timeout_s=60)
            assert loop.time() - started < TIGHT.ride_through_s + 2 * TIGHT.socket_timeout_s + 1
    finally:
        server.close()


async def test_half_open_connection_does_not_hang_report(redis_url: str) -> None:
    """A connection whose peer stops answering fails report() within its bound, not never."""
    port = urlsplit(redis_url).port or 6379
    async with FreezingProxy(port) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/9"
        async with Client(settings=Settings(redis_url=url, redis=TIGHT)) as client:
            handle = await client.enqueue(LoadRequest(source="/nowhere/m.safetensors"))
            proxy.freeze()
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(RedisUnavailable):
                await handle.report(timeout_s=60)
            bound = TIGHT.ride_through_s + TIGHT.socket_timeout_s + TIGHT.connect_timeout_s + 1
            assert loop.time() - started < bound


@pytest.mark.parametrize("pipelined", [False, True])
async def test_a_connection_lost_in_its_handshake_is_ridden_through(
    redis_url: str, pipelined: bool
) -> None:
    """redis-py connects a connection it takes from the pool (HELLO/SELECT/CLIENT SETINFO)
    outside the command's retry: one closed by the peer during that handshake failed the
    command at once (a worker's finish_job then left a finished job to run again)."""
    port = urlsplit(redis_url).port or 6379
    async with FreezingProxy(port) as proxy:
        redis = redis_client(f"redis://127.0.0.1:{proxy.port}/9", TIGHT)
        direct = Redis.from_url(redis_url)
        try:
            pooled = await redis.client_id()  # reached: from now on an error is an outage
            await direct.client_kill_filter(_id=pooled)
            # The pooled connection sees the kill's end before its next checkout, which
            # then connects anew in the pool (not in a command's retry).
            idle = redis.connection_pool._available_connections[0]  # type: ignore[attr-defined]
            await eventually(idle._reader.at_eof, what="the kill reaching the client")
            proxy.drop_next = 2  # its next two connections close before their handshake
            if pipelined:
                async with redis.pipeline(transaction=True) as pipe:
                    assert await pipe.ping().echo("ok").execute() == [True, b"ok"]
            else:
                assert await redis.ping() is True
            assert proxy.accepted == 4 and proxy.drop_next == 0
        finally:
            await redis.aclose()
            await direct.aclose()


async def test_half_open_subscription_is_noticed(redis_url: str) -> None:
    """A cancel subscription whose connection goes silent raises instead of listening for ever."""
    port = urlsplit(redis_url).port or 6379
    async with FreezingProxy(port) as proxy:
        client = redis_client(f"redis://127.0.0.1:{proxy.port}/9", TIGHT)
        subscribed = asyncio.Event()

        async def on_subscribed() -> None:
            subscribed.set()

        async def listen() -> None:
            async for _ in subscribe(client, "lw-test", TIGHT, on_subscribed):
                pass

        task = asyncio.create_task(listen())
        try:
            await asyncio.wait_for(subscribed.wait(), 10)
            proxy.freeze()
            with pytest.raises(RedisConnectionError, match="no answer"):
                await asyncio.wait_for(task, 10)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await client.aclose()


async def test_wait_without_replicas_says_so(redis_url: str) -> None:
    """WAIT 1 against a primary with no replica raises NotReplicated; WAIT 0 is not sent at all."""
    client = redis_client(redis_url)
    try:
        assert await confirm_replicated(client, RedisOptions()) is None
        with pytest.raises(NotReplicated, match="0 of 1 replicas"):
            await confirm_replicated(client, RedisOptions(wait_replicas=1, wait_timeout_s=0.1))
    finally:
        await client.aclose()


async def test_outcome_is_ok_through_plain_factory(
    start_worker: StartWorker, settings: Settings, small_model: Path
) -> None:
    """A worker and a client built by the one factory run a load end to end."""
    assert settings.redis_url
    start_worker(settings.redis_url)
    async with Client(settings=settings) as client:
        report = await (await client.enqueue(LoadRequest(source=str(small_model)))).report(
            timeout_s=30
        )
    assert report.outcome is Outcome.OK


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_preload_command_rides_through_a_restart(
    start_worker: StartWorker, small_model: Path, tmp_path: Path
) -> None:
    """`loadwarden preload` with Redis (AOF) restarted mid-batch exits 0, every entry ok."""
    server = RedisServer(appendonly=True, data_dir=tmp_path / "redis").start()
    try:
        start_worker(server.url, "brief", lease_s=2, lease_renew_s=0.5)
        catalog = tmp_path / "catalog.toml"
        entries = []
        for i in range(12):  # distinct files: duplicates would run once
            copy = tmp_path / f"m{i}.safetensors"
            shutil.copyfile(small_model, copy)
            entries.append(f'[[model]]\nname = "m{i}"\nsource = "{copy}"\n')
        catalog.write_text("\n".join(entries))
        command = [LOADWARDEN, "preload", str(catalog), "--redis", server.url, "--json"]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            probe = blocking_redis_client(server.url)
            call_until(lambda: probe.keys("arq:result:*") or proc.poll() is not None, 60)
            probe.close()
            server.stop()
            server.start()
            out, err = proc.communicate(timeout=90)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 0, err.decode(errors="replace")[-3000:]
        assert json.loads(out)["totals"]["ok"] == 12
    finally:
        server.close()


#: What builds a Redis client or pool by hand: only the factory in producer/connection.py may.
_FACTORY_CALLS = {"Redis", "StrictRedis", "Sentinel", "ConnectionPool", "from_url", "from_pool"}
_FACTORY_CALLS |= {"create_pool", "create_redis_pool"}


def _factory_calls(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in _FACTORY_CALLS:
                found.append(f"{path}:{node.lineno} {name}(")
    return found


def test_redis_is_reached_through_one_factory() -> None:
    """No module of producer/ or worker/ builds a Redis client itself: all go through
    connection.redis_client (or its sync twin), which holds the only such calls."""
    root = Path(__file__).resolve().parent.parent
    factory = root / "producer" / "connection.py"
    assert _factory_calls(factory), "the scan no longer sees the factory's own calls"
    elsewhere = [
        call
        for folder in ("producer", "worker")
        for path in sorted((root / folder).rglob("*.py"))
        if path != factory
        for call in _factory_calls(path)
    ]
    assert elsewhere == []


async def test_client_and_worker_pools_come_from_the_factory(
    settings: Settings, worker_runner: WorkerRunner
) -> None:
    """The client's pool and the worker's bookkeeping connection ride through outages and
    keep cancels the same way: both are the factory's."""
    async with Client(settings=settings) as client:
        for redis in (await client.redis(), worker_runner.redis):
            assert redis is not None
            pool = redis.connection_pool
            assert isinstance(pool.connection_kwargs.get("retry"), RideThrough)
            assert pool.connection_class.__name__.startswith("CancelSafe")


async def test_follow_subscribes_again_after_the_connection_is_lost(redis_url: str) -> None:
    """connection.follow, the one reconnect loop: a subscription gone silent is reported with
    doubling pauses, comes back once Redis answers again, delivers what is published then,
    and a message brings the pause back to the first one."""
    port = urlsplit(redis_url).port or 6379
    publisher = redis_client(redis_url, TIGHT)
    async with FreezingProxy(port) as proxy:
        client = redis_client(f"redis://127.0.0.1:{proxy.port}/9", TIGHT)
        stood = asyncio.Event()
        pauses: list[float] = []
        received: list[bytes] = []

        async def on_subscribed() -> None:
            stood.set()

        async def listen() -> None:
            async for data in follow(
                client,
                "lw-follow",
                TIGHT,
                on_subscribed=on_subscribed,
                on_lost=lambda _exc, pause_s: pauses.append(pause_s),
                first_s=0.05,
                max_s=0.2,
            ):
                received.append(data)

        task = asyncio.create_task(listen())
        try:
            async with asyncio.timeout(10):
                await stood.wait()
            proxy.freeze()
            await eventually(lambda: len(pauses) >= 3, what="three losses while frozen")
            stood.clear()
            proxy.thawed.set()
            async with asyncio.timeout(15):
                await stood.wait()  # subscribed again
            lost = list(pauses)
            assert lost == [min(0.05 * 2**i, 0.2) for i in range(len(lost))]
            await publisher.publish("lw-follow", "after")
            await eventually(lambda: received, what="the message published after the return")
            assert received == [b"after"]
            proxy.freeze()
            await eventually(lambda: len(pauses) > len(lost), what="a loss after the message")
            assert pauses[len(lost)] == 0.05
        finally:
            await cancel_and_wait(task)
            await client.aclose()
            await publisher.aclose()


def test_reconnect_pauses_double_up_to_their_ceiling_and_reset() -> None:
    """The one backoff of the reconnect loops: first, doubled, capped; back to first on reset."""
    pauses = Pauses(0.5, 3.0)
    assert [pauses.advance() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert pauses.next_s == 3.0
    pauses.reset()
    assert pauses.advance() == 0.5


async def test_a_pipeline_cancelled_again_while_it_unwatches_gives_its_connection_back(
    redis_url: str,
) -> None:
    """A watching pipeline cancelled while it waits on Redis, then cancelled again while its
    reset sends the UNWATCH, still returns its connection to the pool: the shielded reset
    runs to its end. (Unshielded, the second cancel ends the reset before its release.)

    redis-py drops the connection on the first cancel, so the reset reconnects to send
    its UNWATCH: through a proxy frozen meanwhile, that reconnection holds the reset in
    flight until the second cancel has landed. A pipeline with nothing to send on reset
    resets without suspending, so no second cancel can land in it: that path has no such
    test."""
    port = urlsplit(redis_url).port or 6379
    db = urlsplit(redis_url).query.rpartition("db=")[2] or "0"
    blocker = redis_client(redis_url)
    async with FreezingProxy(port) as proxy:
        redis = redis_client(f"redis://127.0.0.1:{proxy.port}/{db}")
        try:
            key = "test:cancelled-pipeline"
            entered = asyncio.Event()

            async def held() -> None:
                async with redis.pipeline(transaction=False) as pipe:
                    await pipe.watch(key)  # a watching pipeline runs its commands at once
                    entered.set()
                    await pipe.blpop([key], timeout=30)

            task = asyncio.create_task(held())
            async with asyncio.timeout(5):
                await entered.wait()
                # The BLPOP is blocked in Redis once it shows as a blocked client.
                await eventually(lambda: _blocked_clients(blocker), what="the BLPOP blocked")
                proxy.freeze()
                accepted = proxy.accepted
                task.cancel()
                await eventually(lambda: proxy.accepted > accepted, what="the reset reconnecting")
                assert not task.done()
                task.cancel()  # while the reset's UNWATCH waits on the frozen proxy
                proxy.thaw()
                await asyncio.wait({task})
            assert task.cancelled()
            assert not redis.connection_pool._in_use_connections  # type: ignore[attr-defined]
        finally:
            await redis.aclose()
            await blocker.aclose()


async def _blocked_clients(redis: Redis) -> int:
    return int((await redis.info("clients"))["blocked_clients"])
