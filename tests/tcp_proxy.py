"""A loopback TCP proxy that can stop forwarding: a half-open connection on demand.

While ``frozen`` it keeps every connection open (and accepts new ones) but moves
no byte in either direction, which is what a client sees when its peer vanished
without a FIN (a dead host, a dropped NAT entry, a partition).
"""

from __future__ import annotations

import asyncio
import contextlib


class FreezingProxy:
    """Forwards 127.0.0.1:<port> to ``target_port`` until ``freeze()``."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.thawed = asyncio.Event()
        self.thawed.set()
        self.port = 0
        #: Connections accepted so far (frozen or not).
        self.accepted = 0
        #: How many of the next connections to close as soon as they are accepted: the
        #: client's TCP connect succeeds, its first command (the handshake) finds it closed.
        self.drop_next = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    def freeze(self) -> None:
        self.thawed.clear()

    def thaw(self) -> None:
        self.thawed.set()

    async def __aenter__(self) -> FreezingProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        self.accepted += 1
        if self.drop_next > 0:
            self.drop_next -= 1
            writer.close()
            return
        await self.thawed.wait()
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers.append(up_writer)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst))
            self._tasks.add(task)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                await self.thawed.wait()  # frozen: hold the bytes, send nothing
                dst.write(data)
                await dst.drain()
            if self.thawed.is_set():  # one side closed: so is the other (frozen: nothing moves)
                dst.close()
