"""Server-sent events for one load: ``queued``, ``started``, ``samples``, ``finished``.

The stream polls the job's state (the worker publishes no per-load events), a few
times a second, and stops at once when the client leaves: it checks for the
disconnect before every poll, so a departed client costs at most one poll.
Samples are the report's series (what the monitor kept), sent just before
``finished``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from starlette.responses import StreamingResponse

from loadwarden.producer.client import Client, JobState
from loadwarden.producer.contract import LoadReport
from loadwarden.producer.errors import ContractError, RedisUnavailable
from loadwarden.worker.serve.config import ServeConfig
from loadwarden.worker.serve.middleware import ServeMetrics
from loadwarden.worker.serve.problems import Problem


def _event(name: str, data: dict[str, Any]) -> bytes:
    # json.dumps never emits a raw newline, so one data: line carries the whole document.
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _report_events(report: LoadReport, sent: set[str]) -> list[bytes]:
    out = []
    if "started" not in sent:
        out.append(
            _event("started", {"job_id": report.job_id, "at": report.started_at.isoformat()})
        )
    if report.resources is not None and report.resources.series:
        out.append(
            _event(
                "samples",
                {
                    "job_id": report.job_id,
                    "samples": [s.model_dump(mode="json") for s in report.resources.series],
                    "limits": report.limits.model_dump(mode="json") if report.limits else None,
                },
            )
        )
    out.append(_event("finished", report.model_dump(mode="json")))
    return out


async def _events(
    request: Request, client: Client, job_id: str, config: ServeConfig
) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    sent: set[str] = set()
    quiet_since = loop.time()
    yield f"retry: {int(config.events_poll_s * 4000)}\n\n".encode()
    while not await request.is_disconnected():
        try:
            report = await client.stored_report(job_id)
            state = JobState.COMPLETE if report else await client.job_state(job_id)
        except ContractError as exc:
            yield _event("finished", {"job_id": job_id, "failure": str(exc)})
            return
        except RedisUnavailable:
            report, state = None, None  # say nothing; the keepalive shows we are here
        chunks: list[bytes] = []
        if report is not None:
            for chunk in _report_events(report, sent):
                yield chunk
            return
        if state in (JobState.QUEUED, JobState.DEFERRED) and "queued" not in sent:
            sent.add("queued")
            chunks.append(_event("queued", {"job_id": job_id, "state": str(state)}))
        elif state is JobState.RUNNING and "started" not in sent:
            sent.add("started")
            chunks.append(_event("started", {"job_id": job_id}))
        elif state is JobState.NOT_FOUND:
            yield _event("gone", {"job_id": job_id, "detail": "the job is no longer known"})
            return
        if not chunks and loop.time() - quiet_since >= config.events_keepalive_s:
            chunks.append(b": keepalive\n\n")
        for chunk in chunks:
            quiet_since = loop.time()
            yield chunk
        await asyncio.sleep(config.events_poll_s)


async def event_stream(request: Request, client: Client, job_id: str) -> StreamingResponse:
    """The response for ``GET /v1/loads/{id}/events`` (404 first if there is no such job)."""
    config: ServeConfig = request.app.state.config
    metrics: ServeMetrics = request.app.state.metrics
    if await client.job_state(job_id) is JobState.NOT_FOUND:
        raise Problem(404, f"no job {job_id!r} is queued, running or finished", kind="not-found")
    if metrics.open_streams >= config.max_event_streams:
        raise Problem(
            503,
            "too many event streams are open; poll GET /v1/loads/{id}?wait=S instead",
            kind="too-many-streams",
            headers={"Retry-After": "5"},
        )

    async def counted() -> AsyncIterator[bytes]:
        metrics.open_streams += 1
        try:
            async for chunk in _events(request, client, job_id, config):
                yield chunk
        finally:
            metrics.open_streams -= 1

    return StreamingResponse(
        counted(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
