"""``loadwarden serve``: the HTTP API (/v1) and the operators' web console, one ASGI app."""

from __future__ import annotations

from loadwarden.worker.serve.app import create_app
from loadwarden.worker.serve.config import ServeConfig, load_token, refuse_open_bind

__all__ = ["ServeConfig", "create_app", "load_token", "refuse_open_bind"]
