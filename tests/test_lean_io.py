"""The Redis connection's lean paths (``_lean_io``) say and do what redis-py's own would."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from redis.asyncio.connection import AbstractConnection, Connection
from redis.asyncio.sentinel import SentinelManagedConnection
from redis.exceptions import DataError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from loadwarden.producer._cancel_safe import cancel_safe_connection
from loadwarden.producer._lean_io import LeanIO
from loadwarden.producer.connection import redis_client
from loadwarden.producer.settings import RedisOptions
from tests.conftest import eventually
from tests.tcp_proxy import FreezingProxy

#: A stalled read or write gives up in a fraction of a second; no ride-through hides it.
QUICK = RedisOptions(
    connect_timeout_s=0.5, socket_timeout_s=0.3, ride_through_s=0.0, wait_timeout_s=0.1
)


def _ours() -> AbstractConnection:
    connection = cancel_safe_connection(Connection)()
    assert isinstance(connection, LeanIO)
    return connection


@pytest.mark.parametrize(
    "command",
    [
        ("SET", "k", "v"),
        ("SET", b"k", 1, "PX", 60_000),
        ("HINCRBYFLOAT", "h", "f", 0.1),
        ("X", 1.5e300, -0.0, float("inf"), 1 / 3, 12_345_678_901_234_567_890),
        ("X", "é☃", memoryview(b"view"), b"\x00\r\n"),
        ("CONFIG GET", "maxmemory"),
        (b"CLIENT SETINFO", b"LIB-NAME", "x"),
        ("SET", "big", b"x" * 200_000),
    ],
)
def test_commands_are_packed_as_redis_py_packs_them(command: tuple[Any, ...]) -> None:
    """hiredis packs every argument type redis-py takes into the same bytes, alone or piped."""
    theirs, ours = Connection(), _ours()
    assert b"".join(ours.pack_command(*command)) == b"".join(theirs.pack_command(*command))
    both = [command, ("PING",)]
    assert b"".join(ours.pack_commands(both)) == b"".join(theirs.pack_commands(both))


def test_another_encoding_is_packed_by_redis_pys_own_packer() -> None:
    """A client set to encode strings otherwise than hiredis does is packed as redis-py packs."""
    theirs = Connection(encoding="latin-1")
    ours = cancel_safe_connection(Connection)(encoding="latin-1")
    command = ("SET", "clé", "é")
    assert b"".join(ours.pack_command(*command)) == b"".join(theirs.pack_command(*command))
    assert "é".encode("latin-1") in b"".join(ours.pack_command(*command))


@pytest.mark.parametrize("value", [True, None, bytearray(b"b"), object()])
def test_unpackable_arguments_raise_redis_pys_data_error(value: object) -> None:
    """An argument hiredis refuses raises redis-py's own DataError, with its message."""
    with pytest.raises(DataError) as theirs:
        Connection().pack_command("SET", "k", value)
    with pytest.raises(DataError) as ours:
        _ours().pack_command("SET", "k", value)
    assert str(ours.value) == str(theirs.value)


def test_a_sentinel_connection_still_sees_every_reply() -> None:
    """The lean reads sit below a Sentinel connection's read_response (READONLY -> reconnect)."""
    cls = cancel_safe_connection(SentinelManagedConnection)
    assert cls.read_response is SentinelManagedConnection.read_response
    assert cls.__mro__.index(SentinelManagedConnection) < cls.__mro__.index(LeanIO)


async def test_a_transaction_reads_every_reply_and_error(redis_url: str) -> None:
    """Replies buffered together come back in order, decoded, with an error where one failed."""
    client = redis_client(redis_url)
    try:
        async with client.pipeline(transaction=True) as tr:
            tr.set("s", "é")
            tr.lpush("s", "x")  # WRONGTYPE
            tr.hincrbyfloat("h", "f", 0.5)
            tr.get("s")
            tr.rpush("l", 1, 2.5, b"\x00")
            tr.lrange("l", 0, -1)
            replies = await tr.execute(raise_on_error=False)
        assert replies[0] is True
        assert isinstance(replies[1], ResponseError)
        assert replies[2:] == [0.5, "é".encode(), 3, [b"1", b"2.5", b"\x00"]]
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await client.lpush("s", "x")
        assert await client.get("s") == "é".encode()  # the connection is still in step
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def _frozen_connection(redis_url: str) -> AsyncIterator[AbstractConnection]:
    """A connection of ours (QUICK) to Redis through a proxy that then moves no byte."""
    async with FreezingProxy(urlsplit(redis_url).port or 6379) as proxy:
        client = redis_client(f"redis://127.0.0.1:{proxy.port}/9", QUICK)
        connection = await client.connection_pool.get_connection()
        try:
            proxy.freeze()
            yield connection
        finally:
            await client.connection_pool.release(connection)
            await client.aclose()


async def test_a_reply_not_come_yet_is_still_waited_for_under_the_timeout(redis_url: str) -> None:
    """A reply that has not arrived is waited for at most socket_timeout, then TimeoutError."""
    async with _frozen_connection(redis_url) as connection:
        await connection.send_command("PING")
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(RedisTimeoutError):
            await connection.read_response()
        assert loop.time() - started < QUICK.socket_timeout_s + 1


async def test_a_write_the_kernel_cannot_take_still_times_out(redis_url: str) -> None:
    """A write that fills the socket's buffers waits for it at most socket_timeout."""
    async with _frozen_connection(redis_url) as connection:
        with pytest.raises(RedisTimeoutError, match="writing"):
            await connection.send_command("SET", "big", b"x" * (64 << 20))


async def test_a_stray_reply_is_seen_and_its_connection_replaced(redis_url: str) -> None:
    """A reply nobody read is found on the connection (as redis-py finds it), and the pool
    replaces that connection rather than hand the stray reply to the next command."""
    client = redis_client(redis_url, QUICK)
    pool = client.connection_pool
    try:
        connection = await pool.get_connection()
        assert not await connection.can_read_destructive()  # nothing sent, nothing to read
        await connection.send_command("ECHO", "stray")
        await eventually(connection.can_read_destructive, what="the stray reply")
        await pool.release(connection)
        assert await client.echo("fresh") == b"fresh"
    finally:
        await client.aclose()


async def test_a_connection_the_server_closed_is_replaced_at_checkout(redis_url: str) -> None:
    """A pooled connection the server closed is noticed before a command is sent on it:
    the command succeeds on a new connection, with no ride-through to retry it."""
    client = redis_client(redis_url, QUICK)
    try:
        first = await client.client_id()
        other = redis_client(redis_url)
        try:
            assert await other.client_kill_filter(_id=first) == 1
        finally:
            await other.aclose()
        assert await client.client_id() != first
    finally:
        await client.aclose()
