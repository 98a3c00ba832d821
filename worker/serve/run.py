"""Run ``serve`` under uvicorn: check the bind rule, then serve until a signal."""

from __future__ import annotations

import structlog
import uvicorn

from loadwarden.worker.config import Settings
from loadwarden.worker.serve.app import create_app
from loadwarden.worker.serve.config import ServeConfig, refuse_open_bind

log = structlog.get_logger("loadwarden.serve")


def run_server(
    settings: Settings,
    *,
    host: str,
    port: int,
    token: str | None,
    log_level: str = "info",
) -> None:
    """Serve the API and the console (``ServeConfigError``, a ValueError, before binding)."""
    refuse_open_bind(host, token)
    app = create_app(settings, ServeConfig(token=token))
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        # Our own middleware logs nothing per request; uvicorn's access log does, without
        # headers (so never the token).
        access_log=True,
        # No proxy headers: behind a proxy, the client address is the proxy's (safe default).
        proxy_headers=False,
        server_header=False,
        # A client gets this long between requests on a kept-alive connection.
        timeout_keep_alive=5,
    )
    server = uvicorn.Server(config)
    log.info("serve_starting", host=host, port=port, auth="token" if token else "loopback-only")
    server.run()
