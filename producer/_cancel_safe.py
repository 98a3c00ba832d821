"""redis-py's asyncio client made safe to cancel: writes and pipeline resets keep a cancel."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from loadwarden.producer._lean_io import LeanIO


class _CancelSafeWrites(AbstractConnection):
    """A connection whose writes keep a cancellation (redis-py 5 writes through wait_for).

    Python 3.11's ``asyncio.wait_for`` swallows a cancel that arrives as the write
    finishes (CPython gh-86296, fixed in 3.12), which is likely for a write that
    completes at once: measured, 3 in 200 cancelled pipelines kept running, and a
    lease-renewal task that ignores its cancel holds a job for ever. The same write
    under ``asyncio.timeout`` (which counts cancels correctly) instead, when there is a
    wait at all: a write the kernel took whole needs no timer (``LeanIO``'s reasons).
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
            writer.writelines(chunks)
            transport = writer.transport
            if transport.get_write_buffer_size() or transport.is_closing():
                async with asyncio.timeout(self.socket_timeout):
                    await writer.drain()
            else:  # all of it went to the kernel at once: drain() returns without waiting,
                await writer.drain()  # so no timer to arm (and no cancel can come in it)
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


def cancel_safe_connection(cls: type[AbstractConnection]) -> type[AbstractConnection]:
    """``cls`` whose writes keep a cancellation (one class made per connection class), and
    with ``LeanIO``'s packing and reads below ``cls``'s own (a Sentinel connection's
    read_response still sees every reply)."""
    if cls not in _SAFE:
        _SAFE[cls] = type(f"CancelSafe{cls.__name__}", (_CancelSafeWrites, cls, LeanIO), {})
    return _SAFE[cls]


class _ShieldedResetPipeline(Pipeline):
    """A pipeline whose reset (UNWATCH, release of its connection) a cancel cannot cut short.

    Cut short, the connection stays checked out and the pipeline is collected holding it
    ("Unclosed client session"): likely when a worker stops jobs mid-WATCH (arq's start).
    """

    async def reset(self) -> None:
        if not self.watching and getattr(self.connection, "_re_auth_token", None) is None:
            # Nothing to send (no UNWATCH, no re-authentication: redis-py 5's only awaits
            # in a reset that do I/O), so the reset runs to its end without suspending and
            # no cancel can reach it: no shielded task, whose cost was about a third of a
            # small pipeline's CPU (several pipelines per job).
            await super().reset()  # type: ignore[no-untyped-call]
            return
        task = asyncio.ensure_future(super().reset())  # type: ignore[no-untyped-call]
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            await asyncio.wait({task})
            raise


class _SafePipelines(Redis):
    """A client whose pipelines reset under a shield."""

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        return _ShieldedResetPipeline(
            self.connection_pool, self.response_callbacks, transaction, shard_hint
        )


_SAFE_CLIENTS: dict[type[Redis], type[Redis]] = {}


def cancel_safe_client(cls: type[Redis]) -> type[Redis]:
    """``cls`` whose pipelines a cancel cannot leave holding a connection (same name)."""
    if cls not in _SAFE_CLIENTS:
        _SAFE_CLIENTS[cls] = type(cls.__name__, (_SafePipelines, cls), {})
    return _SAFE_CLIENTS[cls]
