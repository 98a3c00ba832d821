"""``POST /v1/preloads`` (a TOML catalog) and ``GET /v1/preloads/{id}``: a batch run by serve.

The batch is the client's ``preload`` (dedupe, stored reports reused), run as a
task of the serve process that accepted it; its progress is written to Redis
every ``FLUSH_S`` so any replica can answer the GET. If that process dies, the
jobs already queued still run, and the progress says ``stale``.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

import structlog
from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import RedisError

from loadwarden.producer.catalog import parse_catalog
from loadwarden.producer.client import Client
from loadwarden.producer.contract import LoadRequest
from loadwarden.producer.errors import CatalogError
from loadwarden.producer.preload import EntryState, PreloadEntry, PreloadTotals
from loadwarden.producer.sources import is_url
from loadwarden.worker._keys import PRELOAD_KEY_PREFIX
from loadwarden.worker.serve.api import authorized, client_of
from loadwarden.worker.serve.problems import Problem

log = structlog.get_logger("loadwarden.serve")

#: Progress reaches Redis this often: a person polling sees it move; Redis barely notices.
FLUSH_S = 0.5
#: A running preload not written for this long lost the process that ran it.
STALE_S = 30.0
#: Batches one serve process follows at once (each polls its jobs 20 times a second).
MAX_RUNNING = 8

router = APIRouter(prefix="/v1", dependencies=[Depends(authorized)])


class PreloadItem(BaseModel):
    """One catalog entry and where it is (the full report is at /v1/loads/{job_id})."""

    model_config = ConfigDict(frozen=True)

    name: str
    source: str
    job_id: str | None = Field(description="null until the batch reaches the entry")
    state: EntryState
    cached: bool
    duplicate_of: str | None
    outcome: str | None

    @classmethod
    def of(cls, entry: PreloadEntry) -> PreloadItem:
        return cls(
            name=entry.name,
            source=entry.source,
            job_id=entry.job_id,
            state=entry.state,
            cached=entry.cached,
            duplicate_of=entry.duplicate_of,
            outcome=str(entry.outcome) if entry.outcome else None,
        )


class PreloadProgress(BaseModel):
    """A preload's progress: each entry's state, and the totals once it finished."""

    model_config = ConfigDict(frozen=True)

    id: str
    state: Literal["running", "finished", "failed", "stale"]
    done: int = Field(description="entries with a report (or skipped)")
    entries: list[PreloadItem]
    totals: PreloadTotals | None = None
    error: str | None = None
    created_at: datetime
    updated_at: datetime


def _progress(
    preload_id: str,
    entries: list[PreloadEntry],
    created_at: datetime,
    *,
    state: Literal["running", "finished", "failed"] = "running",
    totals: PreloadTotals | None = None,
    error: str | None = None,
) -> PreloadProgress:
    finished = (EntryState.DONE, EntryState.SKIPPED, EntryState.UNFINISHED)
    return PreloadProgress(
        id=preload_id,
        state=state,
        done=sum(e.state in finished for e in entries),
        entries=[PreloadItem.of(e) for e in entries],
        totals=totals,
        error=error,
        created_at=created_at,
        updated_at=datetime.now(UTC),
    )


async def _run(
    client: Client,
    preload_id: str,
    requests: list[tuple[str, LoadRequest]],
    *,
    concurrency: int,
    force: bool,
    fail_fast: bool,
) -> None:
    redis = await client.redis()
    key, ttl = PRELOAD_KEY_PREFIX + preload_id, client.settings.keep_result_s
    created = datetime.now(UTC)
    seen: dict[int, PreloadEntry] = {}

    def on_progress(entry: PreloadEntry) -> None:
        seen[id(entry)] = entry

    async def flush(progress: PreloadProgress) -> None:
        with contextlib.suppress(RedisError, OSError):
            await redis.set(key, progress.model_dump_json(), ex=ttl)

    async def flusher() -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            await flush(_progress(preload_id, list(seen.values()), created))

    writer = asyncio.create_task(flusher())
    try:
        result = await client.preload(
            requests,
            on_progress=on_progress,
            concurrency=concurrency,
            force=force,
            fail_fast=fail_fast,
        )
        final = _progress(
            preload_id, result.entries, created, state="finished", totals=result.totals
        )
    except Exception as exc:  # Redis gone mid-batch: say so rather than stay "running"
        log.warning("preload_failed", preload_id=preload_id, error=str(exc))
        final = _progress(preload_id, list(seen.values()), created, state="failed", error=str(exc))
    finally:
        writer.cancel()
        await asyncio.wait({writer})
    await flush(final)


@router.post(
    "/preloads",
    status_code=202,
    response_model=PreloadProgress,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/toml": {"schema": {"type": "string"}}},
        }
    },
)
async def start_preload(
    request: Request,
    concurrency: Annotated[int, Query(ge=1, le=256, description="jobs kept queued at once")] = 16,
    force: Annotated[bool, Query(description="load again even if reports are stored")] = False,
    fail_fast: Annotated[bool, Query(description="stop at the first failure")] = False,
) -> PreloadProgress:
    """Start a preload of a TOML catalog (the request body, as ``loadwarden preload`` reads it;
    sources must be absolute paths or URLs: the workers resolve them on their side)."""
    client = client_of(request)
    running: set[asyncio.Task[None]] = request.app.state.preloads
    if len(running) >= MAX_RUNNING:
        raise Problem(
            503, "too many preloads running here", kind="busy", headers={"Retry-After": "30"}
        )
    try:
        text = (await request.body()).decode("utf-8")
        catalog = parse_catalog(text, base_dir=Path("/nonexistent"), name="<request body>")
    except UnicodeDecodeError:
        raise Problem(400, "the catalog is not UTF-8 text", kind="bad-catalog") from None
    except CatalogError as exc:
        raise Problem(422, str(exc), kind="bad-catalog", errors=exc.defects) from None
    relative = [
        e.name for e in catalog.models if not is_url(e.source) and not Path(e.source).is_absolute()
    ]
    if relative:
        raise Problem(
            422,
            "sources must be absolute paths or URLs",
            kind="bad-catalog",
            errors=[f"model {name!r}: relative source" for name in relative],
        )
    if not catalog.models:
        raise Problem(422, "the catalog names no model", kind="bad-catalog")
    preload_id = uuid.uuid4().hex
    requests = catalog.requests()
    now = datetime.now(UTC)
    first = PreloadProgress(
        id=preload_id,
        state="running",
        done=0,
        entries=[
            PreloadItem(
                name=name,
                source=req.source,
                job_id=None,
                state=EntryState.PENDING,
                cached=False,
                duplicate_of=None,
                outcome=None,
            )
            for name, req in requests
        ],
        created_at=now,
        updated_at=now,
    )
    redis = await client.redis()
    await redis.set(
        PRELOAD_KEY_PREFIX + preload_id, first.model_dump_json(), ex=client.settings.keep_result_s
    )
    task = asyncio.create_task(
        _run(
            client, preload_id, requests, concurrency=concurrency, force=force, fail_fast=fail_fast
        )
    )
    running.add(task)
    task.add_done_callback(running.discard)
    return first


@router.get("/preloads/{preload_id}", response_model=PreloadProgress)
async def get_preload(
    preload_id: Annotated[str, PathParam(pattern=r"^[0-9a-f]{32}$")],
    request: Request,
) -> PreloadProgress:
    """A preload's progress; ``stale`` when the process running it stopped writing."""
    raw = await (await client_of(request).redis()).get(PRELOAD_KEY_PREFIX + preload_id)
    if raw is None:
        raise Problem(404, f"no preload {preload_id!r}", kind="not-found")
    progress = PreloadProgress.model_validate_json(raw)
    age = (datetime.now(UTC) - progress.updated_at).total_seconds()
    if progress.state == "running" and age > STALE_S:
        return progress.model_copy(update={"state": "stale"})
    return progress
