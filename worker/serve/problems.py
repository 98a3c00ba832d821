"""Errors as RFC 9457 problem documents: every failure a client sees is one, never a traceback."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from loadwarden.producer.errors import (
    ContractError,
    JobNotFound,
    RedisUnavailable,
)

log = structlog.get_logger("loadwarden.serve")

PROBLEM_JSON = "application/problem+json"
#: Problem types are relative URIs resolved against the server: stable names clients can test.
TYPE_PREFIX = "/problems/"


class Problem(Exception):
    """An HTTP error with a problem type, raised by the routes and rendered by the handlers."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        kind: str | None = None,
        headers: dict[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.kind = kind
        self.headers = headers or {}
        self.extensions = extensions


def problem_body(
    status: int, detail: str, kind: str | None, instance: str, **extensions: Any
) -> dict[str, Any]:
    """The document itself; ``about:blank`` when the status says it all."""
    return {
        "type": TYPE_PREFIX + kind if kind else "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "instance": instance,
        **extensions,
    }


def _respond(request: Request, problem: Problem) -> Response:
    renderer = getattr(request.app.state, "render_problem", None)
    if renderer is not None and not request.url.path.startswith("/v1"):
        rendered: Response | None = renderer(request, problem)
        if rendered is not None:
            return rendered
    return JSONResponse(
        problem_body(
            problem.status, problem.detail, problem.kind, request.url.path, **problem.extensions
        ),
        status_code=problem.status,
        media_type=PROBLEM_JSON,
        headers=problem.headers,
    )


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    """Where and why, without echoing the input back (it may be large or hostile)."""
    return [
        {
            "loc": [str(part) for part in e.get("loc", ())],
            "msg": e.get("msg"),
            "type": e.get("type"),
        }
        for e in exc.errors()
    ]


#: The client's errors as problems: status, type, detail (None: the error's own message), headers.
_CLIENT_ERRORS: dict[type[Exception], tuple[int, str, str | None, dict[str, str]]] = {
    JobNotFound: (404, "not-found", None, {}),
    RedisUnavailable: (
        503,
        "redis-unavailable",
        "the queue's Redis does not answer",
        {"Retry-After": "5"},
    ),
    ContractError: (502, "bad-stored-data", None, {}),
}


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into a problem document."""

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> Response:
        return _respond(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        return _respond(request, Problem(exc.status_code, detail, headers=dict(exc.headers or {})))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return _respond(
            request,
            Problem(
                422,
                "the request does not match the contract",
                kind="invalid-request",
                errors=_validation_errors(exc),
            ),
        )

    async def _client_error(request: Request, exc: Exception) -> Response:
        status, kind, detail, headers = next(
            v for t, v in _CLIENT_ERRORS.items() if isinstance(exc, t)
        )
        return _respond(request, Problem(status, detail or str(exc), kind=kind, headers=headers))

    for error in _CLIENT_ERRORS:
        app.add_exception_handler(error, _client_error)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        # Logged with its traceback for the operator; the client learns only that it failed.
        log.exception("serve_request_failed", path=request.url.path)
        return _respond(request, Problem(500, "the server failed to answer", kind="internal"))
