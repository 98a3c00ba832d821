"""The HTTP API, ``/v1``: the Python client's operations, with the same meaning, as JSON."""

from __future__ import annotations

import hashlib
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from loadwarden.producer.client import Client, DeadLetter, JobState
from loadwarden.producer.contract import FailingModel, LoadReport, LoadRequest, WorkerStatus
from loadwarden.producer.errors import ContractError, ReportTimeout
from loadwarden.producer.keys import dedupe_key
from loadwarden.producer.recent import RecentLoad, outcomes_last_hour, recent_loads
from loadwarden.worker.serve.config import MAX_WAIT_S
from loadwarden.worker.serve.events import event_stream
from loadwarden.worker.serve.problems import Problem

#: Maps an Idempotency-Key to the request it first came with (a different body is a 409).
IDEMPOTENCY_KEY_PREFIX = "loadwarden:idempotency:"
#: Job ids as the client and arq make them (uuid hex, retries' ``-r`` suffix, callers' own).
JOB_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,200}$"

#: A dead letter's id: its Redis stream entry id (anything else is not one, and Redis would
#: answer an error rather than nothing).
DEAD_LETTER_ID_PATTERN = r"^[0-9]{1,20}-[0-9]{1,20}$"

#: A model identity as the failure memory names it (worker/load/history.py: model_identity).
IDENTITY_PATTERN = r"^(sha256|file):[0-9a-f]{64}$"

JobId = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="the job id from POST /v1/loads")]


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


class LoadAccepted(_Out):
    """A load was queued (or was already queued: enqueueing is idempotent)."""

    job_id: str
    state: JobState
    links: dict[str, str]


class LoadStatus(_Out):
    """Where a load is and, once it finished, its report."""

    job_id: str
    state: JobState
    report: LoadReport | None = None
    failure: str | None = Field(
        default=None, description="set when the job ended without a report (not a LoadRequest)"
    )


class QueueView(_Out):
    """Queue depth, workers' memory, and the last hour's loads per outcome."""

    queue: str
    ready: int
    deferred: int
    running: int
    dead_letters: int
    workers: int
    memory_budget_bytes: int
    memory_in_use_bytes: int
    outcomes_last_hour: dict[str, int]


class RetryRequest(_Out):
    """Which dead letters to enqueue again: the listed ids, or all of them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ids: Annotated[
        list[Annotated[str, Field(pattern=DEAD_LETTER_ID_PATTERN)]], Field(max_length=1000)
    ] = []
    all: bool = False


class Retried(_Out):
    job_ids: list[str]


class Purged(_Out):
    purged: int


class Cleared(_Out):
    """How many failing models the failure memory forgot."""

    cleared: int


def client_of(request: Request) -> Client:
    client: Client = request.app.state.client
    return client


def authorized(request: Request) -> None:
    request.app.state.auth.require_bearer(request)


ClientDep = Annotated[Client, Depends(client_of)]
router = APIRouter(prefix="/v1", dependencies=[Depends(authorized)])


async def _job_id_for_key(client: Client, key: str, load: LoadRequest) -> str:
    """The job id an Idempotency-Key names; the same key with another request is a conflict."""
    if not (0 < len(key) <= 255) or not key.isprintable():
        raise Problem(400, "Idempotency-Key must be 1-255 printable characters", kind="bad-key")
    digest = hashlib.sha256(key.encode()).hexdigest()
    redis = await client.redis()
    content = dedupe_key(load)
    name = IDEMPOTENCY_KEY_PREFIX + digest
    if not await redis.set(name, content, nx=True, ex=client.settings.keep_result_s):
        stored = await redis.get(name)
        if stored is not None and stored.decode() != content:
            raise Problem(
                409, "this Idempotency-Key was used with a different request", kind="key-reused"
            )
    return f"idem-{digest[:40]}"


@router.post("/loads", status_code=202, response_model=LoadAccepted)
async def enqueue_load(
    load: LoadRequest,
    client: ClientDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> LoadAccepted:
    """Enqueue one load. The same request again while it is queued or running returns the
    same job; with an ``Idempotency-Key`` the same key always names the same job."""
    job_id = (
        None if idempotency_key is None else await _job_id_for_key(client, idempotency_key, load)
    )
    handle = await client.enqueue(load, job_id=job_id)
    response.headers["Location"] = f"/v1/loads/{handle.job_id}"
    return LoadAccepted(
        job_id=handle.job_id,
        state=await client.job_state(handle.job_id),
        links={
            "self": f"/v1/loads/{handle.job_id}",
            "events": f"/v1/loads/{handle.job_id}/events",
        },
    )


@router.get("/loads", response_model=list[RecentLoad])
async def list_loads(
    client: ClientDep,
    outcome: Annotated[str | None, Query(max_length=32)] = None,
    label: Annotated[str | None, Query(max_length=300, description="key or key=value")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[RecentLoad]:
    """Recently finished loads, newest first, filtered by outcome and label."""
    return matching(await recent_loads(await client.redis()), outcome, label)[:limit]


def matching(loads: list[RecentLoad], outcome: str | None, label: str | None) -> list[RecentLoad]:
    """Loads with this outcome and carrying this label (``key`` or ``key=value``)."""
    if outcome:
        loads = [load for load in loads if load.outcome == outcome]
    if label:
        key, has_value, value = label.partition("=")
        loads = [
            load
            for load in loads
            if key in load.labels and (not has_value or load.labels[key] == value)
        ]
    return loads


@router.get("/loads/{job_id}", response_model=LoadStatus)
async def get_load(
    job_id: JobId,
    client: ClientDep,
    wait: Annotated[
        float, Query(ge=0, le=MAX_WAIT_S, description="wait up to this many seconds")
    ] = 0,
) -> LoadStatus:
    """A load's state and, once it finished, its report (``wait`` holds the answer until then)."""
    if wait > 0:
        try:
            await client.report(job_id, timeout_s=wait)
        except ReportTimeout:
            pass
        except ContractError:
            pass  # told below, as the failure
    return await load_status(client, job_id)


async def load_status(client: Client, job_id: str) -> LoadStatus:
    """The state and report as stored now; 404 when Redis knows no such job."""
    for _read in range(2):
        try:
            report = await client.stored_report(job_id)
        except ContractError as exc:
            return LoadStatus(job_id=job_id, state=JobState.COMPLETE, failure=str(exc))
        if report is not None:
            return LoadStatus(job_id=job_id, state=JobState.COMPLETE, report=report)
        state = await client.job_state(job_id)
        # Complete with no report read: it finished between the two reads, and its report
        # (stored in the same transaction) is there now: read it once more, or a page would
        # show "complete" without an outcome and stop refreshing.
        if state is not JobState.COMPLETE:
            break
    if state is JobState.NOT_FOUND:
        raise Problem(404, f"no job {job_id!r} is queued, running or finished", kind="not-found")
    return LoadStatus(job_id=job_id, state=state)


@router.delete("/loads/{job_id}", status_code=202, response_model=LoadStatus)
async def cancel_load(job_id: JobId, client: ClientDep) -> LoadStatus:
    """Cancel a load: a queued one never runs, a running one is killed; it ends ``cancelled``."""
    state = await client.cancel(job_id)
    if state is JobState.COMPLETE:
        raise Problem(409, f"job {job_id!r} has already finished", kind="already-finished")
    return LoadStatus(job_id=job_id, state=state)


@router.get(
    "/loads/{job_id}/events",
    response_class=Response,
    responses={200: {"content": {"text/event-stream": {}}, "description": "an event stream"}},
)
async def load_events(job_id: JobId, request: Request, client: ClientDep) -> Response:
    """Server-sent events: ``queued``, ``started``, ``samples``, ``finished`` (then it closes)."""
    return await event_stream(request, client, job_id)


@router.get("/queue", response_model=QueueView)
async def queue(client: ClientDep) -> QueueView:
    """Ready, deferred and running jobs, dead letters, workers, and the last hour's outcomes."""
    status = await client.status()
    return QueueView(
        queue=status.queue,
        ready=status.ready,
        deferred=status.deferred,
        running=status.running,
        dead_letters=status.dead_letters,
        workers=len(status.workers),
        memory_budget_bytes=status.memory_budget_bytes,
        memory_in_use_bytes=status.memory_in_use_bytes,
        outcomes_last_hour=await outcomes_last_hour(await client.redis()),
    )


@router.get("/workers", response_model=list[WorkerStatus])
async def workers(client: ClientDep) -> list[WorkerStatus]:
    """The live workers' heartbeats."""
    return (await client.status()).workers


@router.get("/dead-letters", response_model=list[DeadLetter])
async def dead_letters(
    client: ClientDep, count: Annotated[int, Query(ge=1, le=1000)] = 100
) -> list[DeadLetter]:
    """Jobs that failed for good, newest first."""
    return await client.dead_letters(count)


@router.post("/dead-letters/retry", status_code=202, response_model=Retried)
async def retry_dead_letters(body: RetryRequest, client: ClientDep) -> Retried:
    """Enqueue dead letters again (by id, or all) and drop them from the list."""
    if body.all == bool(body.ids):
        raise Problem(400, "give either ids or all=true", kind="bad-selection")
    handles = await client.retry_dead(None if body.all else body.ids)
    return Retried(job_ids=[h.job_id for h in handles])


@router.delete("/dead-letters", response_model=Purged)
async def purge_dead_letters(client: ClientDep) -> Purged:
    """Drop every dead letter."""
    return Purged(purged=await client.purge_dead())


@router.get("/failing-models", response_model=list[FailingModel])
async def failing_models(client: ClientDep) -> list[FailingModel]:
    """Models the failure memory holds (refused ones first), with their failures."""
    return await client.failing_models()


@router.delete("/failing-models", response_model=Cleared)
async def clear_failing_models(client: ClientDep) -> Cleared:
    """Forget every failing model: their next loads run."""
    return Cleared(cleared=await client.clear_failing())


@router.delete("/failing-models/{identity}", response_model=Cleared)
async def clear_failing_model(
    identity: Annotated[
        str, Path(pattern=IDENTITY_PATTERN, description="as GET /v1/failing-models names it")
    ],
    client: ClientDep,
) -> Cleared:
    """Forget one failing model (0 when the memory did not hold it)."""
    return Cleared(cleared=await client.clear_failing([identity]))
