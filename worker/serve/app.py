"""The ASGI application: the /v1 API, the console, probes and metrics, behind the middleware."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError
from starlette.responses import JSONResponse, Response

from loadwarden.producer.client import Client
from loadwarden.producer.errors import RedisUnavailable
from loadwarden.worker.config import Settings
from loadwarden.worker.serve import api, console, preloads, problems
from loadwarden.worker.serve.auth import Auth
from loadwarden.worker.serve.config import ServeConfig
from loadwarden.worker.serve.middleware import ServeMetrics, body_limit, observe

STATIC = Path(__file__).parent / "static"


def build_app(settings: Settings, config: ServeConfig) -> FastAPI:
    """The FastAPI app itself (no middleware): what the OpenAPI document is generated from."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = Client(settings=settings)
        app.state.client = client
        app.state.preloads = set()
        try:
            yield
        finally:
            for task in list(app.state.preloads):  # their jobs stay queued and still run
                task.cancel()
            if app.state.preloads:
                await asyncio.wait(app.state.preloads)
            await client.close()

    app = FastAPI(
        title="loadwarden",
        version=version("loadwarden"),
        summary="Enqueue sandboxed model loads, wait for their reports, look at the queue.",
        description="Every /v1 call needs `Authorization: Bearer <token>` (LOADWARDEN_API_TOKEN) "
        "when a token is configured. Errors are RFC 9457 problem documents.",
        lifespan=lifespan,
        # Swagger UI and ReDoc load scripts from a CDN: the document is at /openapi.json.
        docs_url=None,
        redoc_url=None,
    )
    app.state.config = config
    app.state.auth = Auth(config.token, config.session_s)
    app.state.metrics = ServeMetrics()
    # Errors outside /v1 are for people: the console renders them as pages.
    app.state.render_problem = console.render_problem
    problems.install(app)
    app.include_router(api.router)
    app.include_router(preloads.router)
    app.include_router(console.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/livez", include_in_schema=False)
    async def livez() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz(request: Request) -> Response:
        client: Client = request.app.state.client
        try:
            await (await client.redis()).ping()
        except (RedisUnavailable, RedisError, OSError) as exc:
            return JSONResponse({"status": "redis unavailable", "detail": str(exc)}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        registry = request.app.state.metrics.registry
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def create_app(settings: Settings, config: ServeConfig | None = None) -> Any:
    """The app wrapped in its middleware (body cap innermost, metrics and headers outside)."""
    config = config or ServeConfig()
    app = build_app(settings, config)
    return observe(body_limit(app, config.max_body_bytes), app.state.metrics)
