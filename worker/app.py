"""The arq worker: its job function is the supervisor's load path; JSON on the wire, no pickle."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import structlog
from arq import func
from arq.connections import RedisSettings
from arq.worker import Worker
from pydantic import ValidationError

from loadwarden.producer import wire
from loadwarden.producer.client import FUNCTION_NAME
from loadwarden.producer.contract import LoadRequest, ModelFormat
from loadwarden.producer.errors import InvalidModel
from loadwarden.producer.settings import Settings
from loadwarden.worker._tasks import cancel_and_wait
from loadwarden.worker.heartbeat import beat
from loadwarden.worker.history import History
from loadwarden.worker.supervisor import Supervisor

#: arq's own timeout around a job must never fire before our deadline does.
ARQ_TIMEOUT_MARGIN_S = 60

log = structlog.get_logger("loadwarden.worker")


async def load_job(ctx: dict[str, Any], request: Any = None, **extra: Any) -> dict[str, Any]:
    """arq job function: validate the request, run the load, return the report as JSON data."""
    supervisor: Supervisor = ctx["supervisor"]
    job_id: str = ctx["job_id"]
    attempt: int = ctx.get("job_try", 1)
    enqueued_at: datetime | None = ctx.get("enqueue_time")
    try:
        if extra:
            raise ValueError(f"unexpected job arguments: {sorted(extra)}")
        parsed = LoadRequest.model_validate(request)
    except (ValidationError, ValueError) as exc:
        source = request.get("source") if isinstance(request, dict) else None
        error = InvalidModel(f"the job is not a valid LoadRequest: {exc}", code="bad_request")
        report = supervisor.rejected(
            error, job_id=job_id, source=str(source or ""), attempt=attempt, enqueued_at=enqueued_at
        )
    else:
        report = await supervisor.load(
            parsed, job_id=job_id, attempt=attempt, enqueued_at=enqueued_at
        )
    return report.model_dump(mode="json")


def redis_settings(url: str, *, conn_timeout_s: int = 5, conn_retries: int = 5) -> RedisSettings:
    settings = RedisSettings.from_dsn(url)
    settings.conn_timeout = conn_timeout_s
    settings.conn_retries = conn_retries
    return settings


def create_worker(
    settings: Settings,
    supervisor: Supervisor,
    *,
    burst: bool = False,
    handle_signals: bool = True,
) -> Worker:
    """An arq Worker that runs loads through ``supervisor``.

    On SIGTERM/SIGINT arq stops pulling jobs and waits ``shutdown_grace_s`` for
    running loads; then it cancels them, our ``finally`` kills their children,
    and arq leaves their jobs in the queue to be run again.
    """
    if not settings.redis_url:
        raise ValueError("a worker needs a Redis URL (--redis or LOADWARDEN_REDIS_URL)")

    async def startup(ctx: dict[str, Any]) -> None:
        ctx["supervisor"] = supervisor
        if supervisor.history is None:
            supervisor.history = History(ctx["redis"], settings.limits)
        ctx["heartbeat"] = asyncio.create_task(beat(ctx["redis"], supervisor, settings))
        log.info(
            "worker_started",
            worker=supervisor.info.id,
            queue=settings.queue_name,
            concurrency=settings.concurrency,
        )

    async def shutdown(ctx: dict[str, Any]) -> None:
        if "heartbeat" in ctx:
            await cancel_and_wait(ctx["heartbeat"])

    return Worker(
        functions=[
            func(
                load_job,
                name=FUNCTION_NAME,
                timeout=settings.limits.timeout_ceiling_s + ARQ_TIMEOUT_MARGIN_S,
            )
        ],
        queue_name=settings.queue_name,
        redis_settings=redis_settings(settings.redis_url),
        burst=burst,
        max_jobs=settings.concurrency,
        poll_delay=settings.poll_delay_s,
        keep_result=settings.keep_result_s,
        job_serializer=wire.dumps,
        job_deserializer=wire.loads,
        on_startup=startup,
        on_shutdown=shutdown,
        handle_signals=handle_signals,
        job_completion_wait=settings.shutdown_grace_s,
        retry_jobs=True,
        log_results=False,
        # "workers alive" in status() means a heartbeat within this many seconds.
        health_check_interval=10,
    )


async def run_worker(
    settings: Settings,
    *,
    burst: bool = False,
    loaders: Mapping[ModelFormat, str] | None = None,
    preload: Sequence[str] = (),
) -> None:
    """Start the fork server, run an arq worker until it is stopped (or, in burst mode, drained)."""
    async with Supervisor(settings, loaders=loaders, preload=preload) as supervisor:
        worker = create_worker(settings, supervisor, burst=burst)
        try:
            await worker.async_run()
        except asyncio.CancelledError:
            # arq's signal handler cancels its own main task; only a cancellation
            # of *this* task is ours to propagate.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
        finally:
            await worker.close()
            log.info(
                "worker_stopped",
                worker=supervisor.info.id,
                jobs_complete=worker.jobs_complete,
                jobs_retried=worker.jobs_retried,
                jobs_failed=worker.jobs_failed,
            )
