"""A tiny HTTP server on the event loop: /metrics (Prometheus), /livez and /readyz (Kubernetes).

Served from the worker's own event loop on purpose: if the loop is blocked,
/livez does not answer, which is what a liveness probe must see. A process may also say
it is not live although its loop answers (a worker whose fork server stays down): /livez
then answers 503 with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

#: A request line and headers larger than this are refused (nothing here needs more).
MAX_REQUEST_BYTES = 8192
#: A client that does not finish its request in this long is dropped.
READ_TIMEOUT_S = 5.0

Readiness = Callable[[], Awaitable[tuple[bool, str]]]
#: Synchronous on purpose: /livez must not wait on anything but the event loop itself.
Liveness = Callable[[], tuple[bool, str]]


def _always_live() -> tuple[bool, str]:
    return True, "ok"


class Probes:
    """Serves one registry and the two probes on ``host:port``."""

    def __init__(
        self,
        registry: CollectorRegistry,
        ready: Readiness,
        *,
        live: Liveness = _always_live,
        host: str = "0.0.0.0",
        port: int = 9400,
    ) -> None:
        self.registry = registry
        self.ready = ready
        self.live = live
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        """Start listening; return the bound port (useful with port 0)."""
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
            if len(head) > MAX_REQUEST_BYTES:
                raise ValueError("request too large")
            method, path = head.split(b" ", 2)[:2]
            status, ctype, body = await self._route(
                method.decode("latin-1"), path.decode("latin-1").split("?", 1)[0]
            )
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
            status, ctype, body = "400 Bad Request", "text/plain", b"bad request\n"
        with contextlib.suppress(ConnectionError):
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}"
                f"\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    async def _route(self, method: str, path: str) -> tuple[str, str, bytes]:
        if method != "GET":
            return "405 Method Not Allowed", "text/plain", b"GET only\n"
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path in ("/livez", "/readyz"):
            ok, why = self.live() if path == "/livez" else await self.ready()
            return (
                ("200 OK" if ok else "503 Service Unavailable"),
                "text/plain",
                why.encode() + b"\n",
            )
        return "404 Not Found", "text/plain", b"not found\n"
