"""redis-py's asyncio connection without the costs it pays per command and per reply.

A worker sends a few pipelines per job; redis-py 5's asyncio connection spends more CPU
around their bytes than on them (bench/tiny.py, profiled with py-spy):

- it packs commands in Python, where its synchronous client packs them with hiredis
  (always installed here: arq requires ``redis[hiredis]``);
- it reads every reply under an ``asyncio.timeout``, also a reply hiredis holds complete
  already (a transaction's QUEUED answers and EXEC's arrive in one packet): a timer armed
  and cancelled per reply, where no wait can happen;
- it checks a connection taken from the pool for stray data by reading under a zero
  timeout: one more pass of the event loop and a cancelled read per checkout, which can
  only find what this process holds already (the timer fires before the loop reads the
  socket again).

``LeanIO`` keeps what each does and drops the cost: redis-py's hiredis packer packs (what
it cannot pack, and strings of an encoding other than UTF-8, go to the asyncio packer); a
reply already buffered is returned without a timer (one that is not waits under the
timeout, as before); and the checkout's check looks at what this process holds (hiredis'
buffer, the stream's), reading as before only when there is something to read, an end or
an error.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis._parsers.hiredis import NOT_ENOUGH_DATA, _AsyncHiredisParser
from redis.asyncio.connection import AbstractConnection
from redis.connection import HiredisRespSerializer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, ResponseError
from redis.utils import HIREDIS_AVAILABLE

#: redis-py's own hiredis packer (its synchronous client's), when hiredis is installed.
_PACKER = HiredisRespSerializer() if HIREDIS_AVAILABLE else None


class LeanIO(AbstractConnection):
    """redis-py's connection with hiredis packing, timers only for reads that may wait, and
    the pool's stray-data check without a pass of the event loop (see the module docstring)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if _PACKER is None or not self._utf8():
            return super().pack_command(*args)
        try:
            packed: list[bytes] = _PACKER.pack(*args)
        except DataError:  # a bool, None, a bytearray...: the asyncio packer's own DataError
            return super().pack_command(*args)
        return packed

    def pack_commands(self, commands: Any) -> list[bytes]:
        if _PACKER is None or not self._utf8():
            return super().pack_commands(commands)
        return [b"".join(chunk for command in commands for chunk in self.pack_command(*command))]

    def _utf8(self) -> bool:
        """Whether strings are encoded as hiredis encodes them (UTF-8, strict)."""
        encoder = self.encoder
        return encoder.encoding in ("utf-8", "utf8") and encoder.encoding_errors == "strict"

    async def read_response(  # the signature is redis-py's
        self,
        disable_decoding: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109
        *,
        disconnect_on_error: bool = True,
        push_request: bool | None = False,
    ) -> Any:
        try:
            reply = self._buffered_reply(disable_decoding)
        except BaseException:
            if disconnect_on_error:
                await self.disconnect(nowait=True)
            raise
        if reply is None:  # not all here yet: read (and wait) under the timeout
            return await super().read_response(
                disable_decoding,
                timeout,
                disconnect_on_error=disconnect_on_error,
                push_request=push_request,
            )
        (response,) = reply
        # What redis-py's read_response does with a reply once read.
        if self.health_check_interval:
            self.next_health_check = asyncio.get_running_loop().time() + self.health_check_interval
        if isinstance(response, ResponseError):
            raise response from None
        return response

    def _buffered_reply(self, disable_decoding: bool) -> tuple[Any] | None:
        """The next reply, in a 1-tuple, if hiredis holds all of it already; None if not (or
        if this is not a hiredis parser). Raises as the parser would for a reply that says
        the connection is broken."""
        reader = self._hiredis_reader()
        if reader is None:  # (not connected: the parser's own read raises for it)
            return None
        response = reader.gets(False) if disable_decoding else reader.gets()
        if response is NOT_ENOUGH_DATA:
            return None
        # As _AsyncHiredisParser.read_response.
        if isinstance(response, RedisConnectionError):
            raise response
        first = response[0] if isinstance(response, list) and response else None
        if isinstance(first, RedisConnectionError):
            raise first
        return (response,)

    def _hiredis_reader(self) -> Any:
        """hiredis' reader, when replies come through a connected hiredis parser (the ground
        of the fast paths); else None."""
        parser: Any = self._parser
        if isinstance(parser, _AsyncHiredisParser) and parser._connected:
            return parser._reader
        return None

    async def can_read_destructive(self) -> bool:
        reader = self._hiredis_reader()
        if reader is not None:
            if reader.gets() is not NOT_ENOUGH_DATA:
                return True  # a reply nobody read: as the parser's own check (which drops it)
            if self._stream_empty():
                return False
        return bool(await super().can_read_destructive())  # type: ignore[no-untyped-call]

    def _stream_empty(self) -> bool:
        """Whether the stream holds no bytes, no end and no error. Then redis-py's check finds
        nothing either: it reads under a zero timeout, whose timer fires before the loop next
        reads the socket, so only what this process holds already can answer it. When unsure
        (a stream not as expected), False: redis-py's check runs."""
        stream = self._reader
        if stream is None or stream.at_eof() or stream.exception() is not None:
            return False
        return not getattr(stream, "_buffer", b"?")
