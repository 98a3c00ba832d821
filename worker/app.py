"""The arq worker: its job function is the supervisor's load path; JSON on the wire, no pickle.

``WorkerRunner`` owns one worker process's life: the supervisor (fork server),
a Redis connection for loadwarden's own bookkeeping (history, heartbeat,
attempts, cancels, dead letters), the arq worker (recreated with backoff when
Redis drops), and shutdown: the first SIGTERM/SIGINT stops pulling jobs and
lets running loads finish for ``shutdown_grace_s``, then kills them and leaves
their jobs queued for another worker; a second signal stops at once.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
import structlog
from arq import Retry, func
from arq.connections import RedisSettings
from arq.worker import Worker
from pydantic import ValidationError
from redis.exceptions import RedisError

from loadwarden.producer import wire
from loadwarden.producer.client import FUNCTION_NAME
from loadwarden.producer.contract import Attempt, LoadReport, LoadRequest, ModelFormat, Outcome
from loadwarden.producer.counts import queue_counts
from loadwarden.producer.errors import (
    ChildCrashed,
    ContractError,
    InvalidModel,
    LoadCancelled,
    LoadError,
)
from loadwarden.producer.settings import Settings
from loadwarden.worker._tasks import cancel_and_wait, finish_despite_cancel
from loadwarden.worker.autoscale_inputs import desired_from_counts
from loadwarden.worker.heartbeat import beat
from loadwarden.worker.history import History
from loadwarden.worker.jobs import JobBook
from loadwarden.worker.metrics import Metrics
from loadwarden.worker.probes import Probes
from loadwarden.worker.retry import backoff_s, retry_on, should_retry
from loadwarden.worker.supervisor import Supervisor

#: arq's own timeout around a job must never fire before our deadline does.
ARQ_TIMEOUT_MARGIN_S = 60
#: Reruns after lost workers allowed beyond a request's max_attempts before giving up.
LOST_WORKER_ALLOWANCE = 2
#: The marker a job payload that is not our JSON is rewritten to (it is never executed).
UNDECODABLE = "__undecodable__"

log = structlog.get_logger("loadwarden.worker")


def job_deserializer(data: bytes) -> dict[str, Any]:
    """arq's job deserializer: our strict JSON; anything else becomes a job that is refused.

    A payload that is not our wire format (a planted pickle, say) is never
    decoded by anything but ``wire.loads``: the job function receives a marker
    instead of a request, reports ``invalid`` and dead-letters it.
    """
    try:
        document = wire.loads(data)
        if not {"f", "a", "k", "t", "et"} <= document.keys():
            raise ContractError("not an arq job envelope")
        return document
    except ContractError as exc:
        preview = bytes(data[:64])
        marker = {UNDECODABLE: f"{exc.message}; first bytes: {preview!r}"}
        return {"f": FUNCTION_NAME, "a": [], "k": {"request": marker}, "t": 1, "et": 0}


def _parse(request: Any, extra: dict[str, Any]) -> LoadRequest | LoadError:
    if isinstance(request, dict) and UNDECODABLE in request:
        return InvalidModel(
            f"the job payload is not loadwarden JSON: {request[UNDECODABLE]}", code="bad_payload"
        )
    try:
        if extra:
            raise ValueError(f"unexpected job arguments: {sorted(extra)}")
        return LoadRequest.model_validate(request)
    except (ValidationError, ValueError) as exc:
        return InvalidModel(f"the job is not a valid LoadRequest: {exc}", code="bad_request")


def _now() -> datetime:
    return datetime.now(UTC)


async def load_job(ctx: dict[str, Any], request: Any = None, **extra: Any) -> dict[str, Any]:
    """arq job function: one attempt of a load, with retries, lease, cancel and dead letters."""
    sup: Supervisor = ctx["supervisor"]
    book: JobBook = ctx["book"]
    settings: Settings = ctx["settings"]
    job_id: str = ctx["job_id"]
    # The autoscaler's service time: all of this run (bookkeeping, inspection, waiting for
    # memory, the load), not only the child's wall time.
    started = time.monotonic()
    enqueued_at: datetime | None = ctx.get("enqueue_time")
    previous = await book.attempts(job_id)
    number = len(previous) + 1
    parsed = _parse(request, extra)
    if isinstance(parsed, LoadError):
        source = request.get("source") if isinstance(request, dict) else None
        report = sup.rejected(
            parsed, job_id=job_id, source=str(source or ""), attempt=number, enqueued_at=enqueued_at
        )
        await book.dead_letter_raw(job_id, repr(request), report)
        return report.model_dump(mode="json")
    final = await _refuse_early(sup, book, parsed, job_id, number, enqueued_at)
    if final is None:
        try:
            final = await _attempt(sup, book, settings, parsed, job_id, previous, enqueued_at)
        except Retry:
            await book.add_busy(time.monotonic() - started)
            raise
    final = final.model_copy(update={"attempts": previous + final.attempts})
    await book.finish(job_id, parsed, final, busy_s=time.monotonic() - started)
    return final.model_dump(mode="json")


async def _refuse_early(
    sup: Supervisor,
    book: JobBook,
    request: LoadRequest,
    job_id: str,
    number: int,
    enqueued_at: datetime | None,
) -> LoadReport | None:
    """A final report without loading: cancelled while queued, or out of attempts."""
    error: LoadError | None = None
    if await book.is_cancelled(job_id):
        error = LoadCancelled("cancelled before it started", code="cancelled")
    elif number > request.retry.max_attempts + LOST_WORKER_ALLOWANCE:
        error = ChildCrashed(
            f"{number - 1} attempts used, workers lost on the way", code="attempts_exhausted"
        )
    if error is None:
        return None
    return sup.rejected(
        error, job_id=job_id, source=request.source, attempt=number, enqueued_at=enqueued_at
    )


async def _attempt(
    sup: Supervisor,
    book: JobBook,
    settings: Settings,
    request: LoadRequest,
    job_id: str,
    previous: list[Attempt],
    enqueued_at: datetime | None,
) -> LoadReport:
    """Run one attempt; raise arq's Retry when the policy wants another."""
    number = len(previous) + 1
    now = _now()
    # Stays recorded only if this worker dies mid-load: then the next run counts it lost.
    lost = Attempt(
        number=number,
        outcome=Outcome.CRASHED,
        error_code="worker_lost",
        worker=sup.info.id,
        started_at=now,
        finished_at=now,
    )
    await book.save_attempts(job_id, [*previous, lost])
    try:
        async with book.lease(job_id):
            report = await sup.load(
                request,
                job_id=job_id,
                attempt=number,
                enqueued_at=enqueued_at,
                cancel=book.cancel_event(job_id),
            )
    except asyncio.CancelledError:  # shutdown: this was not an attempt; the job is released
        await finish_despite_cancel(book.save_attempts(job_id, previous))
        raise
    finally:
        book.forget(job_id)
    retryable = retry_on(
        request.retry, "retry_on" in request.retry.model_fields_set, settings.retry_on
    )
    if not should_retry(report.outcome, number, request.retry, retryable):
        return report
    delay = round(backoff_s(number, request.retry), 3)
    attempt = report.attempts[-1].model_copy(update={"delay_s": delay})
    await book.save_attempts(job_id, [*previous, attempt])
    sup.metrics.retries.inc()
    log.info(
        "job_retry_scheduled",
        job_id=job_id,
        attempt=number,
        outcome=str(report.outcome),
        error_code=attempt.error_code,
        delay_s=delay,
    )
    raise Retry(defer=delay)


def redis_settings(url: str, *, conn_timeout_s: int = 5, conn_retries: int = 5) -> RedisSettings:
    settings = RedisSettings.from_dsn(url)
    settings.conn_timeout = conn_timeout_s
    settings.conn_retries = conn_retries
    return settings


def create_worker(
    settings: Settings, supervisor: Supervisor, book: JobBook, *, burst: bool = False
) -> Worker:
    """An arq Worker that runs loads through ``supervisor`` (signals are WorkerRunner's)."""
    if not settings.redis_url:
        raise ValueError("a worker needs a Redis URL (--redis or LOADWARDEN_REDIS_URL)")
    worker = Worker(
        functions=[
            func(
                load_job,
                name=FUNCTION_NAME,
                max_tries=10_000,
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
        job_deserializer=job_deserializer,
        ctx={"supervisor": supervisor, "book": book, "settings": settings},
        handle_signals=False,
        retry_jobs=True,
        log_results=False,
    )
    # arq marks a job in progress for its longest timeout + 10 s (an hour here): a worker
    # dying before our first lease renewal would hold the job that long (arq #402). The
    # marker starts with the lease's length instead; JobBook.lease renews it.
    worker.in_progress_timeout_s = settings.lease_s
    return worker


class WorkerRunner:
    """Runs one worker until stopped: ``run()`` in a task, ``stop()`` from a signal or a test."""

    def __init__(
        self,
        settings: Settings,
        *,
        burst: bool = False,
        handle_signals: bool = True,
        loaders: Mapping[ModelFormat, str] | None = None,
        preload: Sequence[str] = (),
    ) -> None:
        self.settings = settings
        self.burst = burst
        self.handle_signals = handle_signals
        self.supervisor = Supervisor(settings, loaders=loaders, preload=preload)
        self.started = asyncio.Event()
        self.worker: Worker | None = None
        self._stop_requested = False
        #: Jobs a shutdown stopped before they ended: left queued for another worker.
        self.requeued: list[str] = []
        self._draining: asyncio.Task[None] | None = None
        self.probes: Probes | None = None
        self.redis: aioredis.Redis | None = None

    async def readiness(self) -> tuple[bool, str]:
        """Ready: Redis answers, the fork server is alive, and we are not shutting down."""
        if self._stop_requested:
            return False, "shutting down"
        if not self.supervisor.forkserver.alive:
            return False, "fork server not running"
        try:
            assert self.redis is not None
            await asyncio.wait_for(self.redis.ping(), 1.0)
        except (RedisError, OSError, TimeoutError, AssertionError) as exc:
            return False, f"Redis does not answer: {exc}"
        return True, "ready"

    async def run(self) -> None:
        """Run until stopped (or, in burst mode, until the queue is empty)."""
        assert self.settings.redis_url
        redis = aioredis.Redis.from_url(self.settings.redis_url, socket_connect_timeout=5)
        self.redis = redis
        book = JobBook(redis, self.settings, self.supervisor.metrics)
        self.supervisor.history = History(redis, self.settings.limits)
        loop = asyncio.get_running_loop()
        async with self.supervisor as sup:
            side = [
                asyncio.create_task(beat(redis, sup, self.settings)),
                asyncio.create_task(book.watch_cancels()),
                asyncio.create_task(update_queue_gauges(redis, sup.metrics, self.settings)),
            ]
            if self.settings.metrics_port is not None:
                self.probes = Probes(
                    sup.metrics.registry,
                    self.readiness,
                    host=self.settings.metrics_host,
                    port=self.settings.metrics_port,
                )
                await self.probes.start()
            if self.handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(sig, self.stop)
            try:
                log.info("worker_started", **self._started_fields(sup))
                self.started.set()
                await self._run_arq(sup, book)
            finally:
                if self.handle_signals:
                    for sig in (signal.SIGTERM, signal.SIGINT):
                        loop.remove_signal_handler(sig)
                for task in side:
                    await cancel_and_wait(task)
                if self._draining is not None:
                    await cancel_and_wait(self._draining)
                if self.probes is not None:
                    await self.probes.close()
                await redis.aclose()
                log.info("worker_stopped", worker=sup.info.id, requeued=self.requeued)

    def _started_fields(self, sup: Supervisor) -> dict[str, Any]:
        """What an operator needs to know this worker runs with, in its first line."""
        s = self.settings
        roots = s.sources.allow_roots
        return {
            "worker": sup.info.id,
            "queue": s.queue_name,
            "concurrency": s.concurrency,
            "allow_roots": [str(r) for r in roots] if roots else "working directory",
            "allow_hosts": list(s.sources.allow_hosts),
            "metrics_port": s.metrics_port,
            "memory_budget_bytes": sup.admission.budget_bytes,
            "cgroups": sup.cgroups.mechanism if sup.cgroups else sup.cgroups_note,
            "landlock_abi": sup.landlock_abi,
            "address_space_limit": s.use_address_space_limit,
        }

    def _running_ids(self) -> list[str]:
        """Jobs this worker holds now: picked by arq, whether or not a load has begun."""
        tasks = self.worker.tasks if self.worker is not None else {}
        return sorted(job_id for job_id, task in tasks.items() if not task.done())

    async def _run_arq(self, sup: Supervisor, book: JobBook) -> None:
        delay = 0.5
        while not self._stop_requested:
            self.worker = worker = create_worker(self.settings, sup, book, burst=self.burst)
            try:
                await worker.async_run()
                return
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
                return  # stop() cancelled arq's main task
            except (RedisError, OSError) as exc:
                log.warning("redis_lost", error=str(exc), retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
            finally:
                if worker.main_task is None or worker.main_task.done():
                    await self._close(worker)

    @staticmethod
    async def _close(worker: Worker) -> None:
        # Let cancelled jobs finish their own bookkeeping first: arq's close() cancels
        # whatever still runs a second time, which would cut a job's last Redis writes.
        running = [t for t in worker.tasks.values() if not t.done()]
        if running:
            await asyncio.wait(running, timeout=10)
        try:
            await worker.close()
        except (RedisError, OSError) as exc:  # Redis is gone: nothing left to tidy there
            log.warning("worker_close_incomplete", error=str(exc))

    def stop(self) -> None:
        """First call: stop pulling, drain for the grace period, then stop; second call: at once.

        Idempotent beyond that; safe to call from a signal handler (it only schedules work).
        """
        if self._stop_requested:
            self._stop_now()
            return
        self._stop_requested = True
        log.info(
            "worker_stopping", grace_s=self.settings.shutdown_grace_s, running=self._running_ids()
        )
        if self.worker is not None:
            self.worker.allow_pick_jobs = False
        self._draining = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        worker = self.worker
        if worker is not None and worker.tasks:
            await asyncio.wait(list(worker.tasks.values()), timeout=self.settings.shutdown_grace_s)
        self._stop_now()

    def _stop_now(self) -> None:
        running = self._running_ids()
        if running:
            # Their children are killed and the jobs left queued (not counted as attempts).
            self.requeued = sorted({*self.requeued, *running})
            log.warning("jobs_requeued", job_ids=running, reason="shutdown")
        if self.worker is not None and self.worker.main_task is not None:
            self.worker.handle_sig(signal.SIGTERM)  # cancels running jobs, then arq's main task


async def update_queue_gauges(
    redis: aioredis.Redis,
    metrics: Metrics,
    settings: Settings,
    interval_s: float = 5.0,
) -> None:
    """Refresh the queue gauges every ``interval_s`` until cancelled (cheap sorted-set counts)."""
    while True:
        try:
            counts = await queue_counts(redis, settings.queue_name)
        except (RedisError, OSError) as exc:
            log.debug("queue_gauges_failed", error=str(exc))
        else:
            for state in ("ready", "deferred", "running"):
                metrics.queue.labels(state=state).set(counts[state])
            metrics.dead_letter_jobs.set(counts["dead"])
            metrics.workers_alive.set(counts["workers"])
            metrics.desired_workers.set(desired_from_counts(counts, settings))
        await asyncio.sleep(interval_s)


async def run_worker(
    settings: Settings,
    *,
    burst: bool = False,
    loaders: Mapping[ModelFormat, str] | None = None,
    preload: Sequence[str] = (),
) -> None:
    """Run a worker until SIGTERM/SIGINT (or, in burst mode, until the queue is drained)."""
    await WorkerRunner(settings, burst=burst, loaders=loaders, preload=preload).run()
