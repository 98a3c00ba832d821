"""ASGI middleware: a cap on request bodies, security headers, and request metrics.

Written as plain ASGI (not Starlette's BaseHTTPMiddleware) so that streaming
responses (the event streams) pass through untouched and unbuffered.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from loadwarden.worker.serve.problems import PROBLEM_JSON, problem_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Scripts, styles and images from this server only; nothing inline, no frames, no plugins.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    # same-origin, not no-referrer: under no-referrer Chromium sends "Origin: null" on form
    # posts, and the console's CSRF check compares the Origin with the Host.
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
]


class ServeMetrics:
    """serve's own Prometheus series, in a registry of its own (one per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "loadwarden_serve_requests_total",
            "HTTP requests answered, by route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "loadwarden_serve_request_duration_seconds",
            "Time to answer a request (until the response starts for event streams).",
            ["method", "route"],
            registry=self.registry,
        )
        #: Event streams open now (read by the cap on them, and exported).
        self.open_streams = 0
        Gauge(
            "loadwarden_serve_event_streams",
            "Server-sent event streams open now.",
            registry=self.registry,
        ).set_function(lambda: self.open_streams)


async def _problem(send: Send, status: int, detail: str, path: str) -> None:
    body = json.dumps(problem_body(status, detail, "body-too-large", path)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", PROBLEM_JSON.encode()), (b"connection", b"close")],
        }
    )
    await send({"type": "http.response.body", "body": body})


def body_limit(app: ASGIApp, max_bytes: int) -> ASGIApp:
    """Answer 413 to a body over ``max_bytes``; the app sees the body only once it is whole."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await app(scope, receive, send)
            return
        too_large = f"request bodies are limited to {max_bytes} bytes"
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > max_bytes):
                await _problem(send, 413, too_large, scope["path"])
                return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > max_bytes:
                await _problem(send, 413, too_large, scope["path"])
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect

        await app(scope, replay, send)

    return middleware


def observe(app: ASGIApp, metrics: ServeMetrics) -> ASGIApp:
    """Count and time every request by its route template; add the security headers."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
                metrics.latency.labels(scope["method"], _route(scope)).observe(
                    time.perf_counter() - started
                )
            await send(message)

        try:
            await app(scope, receive, send_wrapper)
        finally:
            metrics.requests.labels(scope["method"], _route(scope), str(status)).inc()

    return middleware


def _route(scope: Scope) -> str:
    """The matched route's template (bounded label values), not the raw path."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"
