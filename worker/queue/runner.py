"""The arq worker: its job function is the supervisor's load path; JSON on the wire, no pickle.

``WorkerRunner`` owns one worker process's life: the supervisor (fork server),
a Redis connection for loadwarden's own bookkeeping (history, heartbeat,
attempts, cancels, dead letters), the arq worker (recreated with backoff when
Redis drops), and shutdown: the first SIGTERM/SIGINT stops pulling jobs and
lets running loads finish for ``drain_grace_s`` (by default the deadline
ceiling), then kills them and leaves their jobs queued for another worker; a
second signal stops at once.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
import structlog
from arq import func
from arq.connections import ArqRedis
from arq.worker import Worker
from redis.exceptions import RedisError

from loadwarden.producer import wire
from loadwarden.producer.client import FUNCTION_NAME
from loadwarden.producer.connection import (
    NotReplicated,
    confirm_replicated,
    redis_client,
    stop_riding_through,
)
from loadwarden.producer.contract import ModelFormat
from loadwarden.producer.settings import RedisOptions, Settings
from loadwarden.worker._tasks import cancel_and_wait
from loadwarden.worker.load.failures import FailureMemory
from loadwarden.worker.load.history import History
from loadwarden.worker.load.supervisor import Supervisor
from loadwarden.worker.ops.probes import Probes
from loadwarden.worker.ops.queue_gauges import update_queue_gauges
from loadwarden.worker.queue._arq import LoadWorker
from loadwarden.worker.queue.envelope import job_deserializer
from loadwarden.worker.queue.heartbeat import beat
from loadwarden.worker.queue.job import load_job
from loadwarden.worker.queue.jobs import JobBook

#: arq's own timeout around a job must never fire before our deadline does.
ARQ_TIMEOUT_MARGIN_S = 60

log = structlog.get_logger("loadwarden.worker")


class _Worker(LoadWorker):
    """LoadWorker, confirming each stored result with WAIT when ``redis.wait_replicas`` asks.

    One WAIT after the result covers the job's earlier writes too (its dead letter,
    its bookkeeping): replicas apply writes in the primary's order.
    """

    def __init__(self, *args: Any, options: Settings, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._options = options.redis

    async def finish_job(self, job_id: str, finish: bool, *args: Any) -> None:
        await super().finish_job(job_id, finish, *args)
        if finish:
            await confirm_write(self.pool, self._options, job_id)


async def confirm_write(redis: aioredis.Redis, options: RedisOptions, job_id: str) -> None:
    """WAIT for replicas when configured; a shortfall is logged, never fatal.

    The result is already on the primary and the job is over: failing here would
    only stop the worker from going on. A write the replicas missed can be lost in
    a failover, and then the job, still queued on the new primary, runs again.
    """
    try:
        await confirm_replicated(redis, options)
    except NotReplicated as exc:
        log.warning("write_unreplicated", job_id=job_id, error=str(exc))


def create_worker(
    settings: Settings, supervisor: Supervisor, book: JobBook, *, burst: bool = False
) -> Worker:
    """An arq Worker that runs loads through ``supervisor`` (signals are WorkerRunner's)."""
    if not settings.redis_url:
        raise ValueError("a worker needs a Redis URL (--redis or LOADWARDEN_REDIS_URL)")
    pool = redis_client(settings.redis_url, settings.redis, redis_class=ArqRedis)
    pool.job_serializer, pool.job_deserializer = wire.dumps, job_deserializer
    pool.default_queue_name = settings.queue_name
    worker = _Worker(
        options=settings,
        functions=[
            func(
                load_job,
                name=FUNCTION_NAME,
                max_tries=10_000,
                timeout=settings.limits.timeout_ceiling_s + ARQ_TIMEOUT_MARGIN_S,
            )
        ],
        queue_name=settings.queue_name,
        redis_pool=pool,
        burst=burst,
        max_jobs=settings.concurrency,
        poll_delay=settings.poll_delay_s,
        keep_result=settings.keep_result_s,
        job_serializer=wire.dumps,  # results: LoadWorker wraps it to catch arq's failures
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
            async with asyncio.timeout(1.0):
                await self.redis.ping()
        except (RedisError, OSError, TimeoutError, AssertionError) as exc:
            return False, f"Redis does not answer: {exc}"
        return True, "ready"

    async def run(self) -> None:
        """Run until stopped (or, in burst mode, until the queue is empty)."""
        assert self.settings.redis_url
        redis = redis_client(self.settings.redis_url, self.settings.redis)
        self.redis = redis
        book = JobBook(redis, self.settings, self.supervisor.metrics)
        self.supervisor.history = History(redis, self.settings.limits)
        memory = self.settings.failure_memory
        self.supervisor.failures = FailureMemory(redis, memory) if memory.enabled else None
        loop = asyncio.get_running_loop()
        async with self.supervisor as sup:
            side = [
                asyncio.create_task(beat(redis, sup, self.settings)),
                asyncio.create_task(book.watch_cancels()),
                asyncio.create_task(update_queue_gauges(redis, sup.metrics.queue, self.settings)),
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
                if sup.history is not None:  # the last loads' samples, before the connection goes
                    await sup.history.close()
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
        # arq's close() gathers its job tasks and would raise the CancelledError of one
        # stopped while it was still starting (in its first Redis round trip), skipping
        # the rest of the tidy-up: finished ones are collected here instead.
        for job_id, task in list(worker.tasks.items()):
            if task.done():
                del worker.tasks[job_id]
                if not task.cancelled() and task.exception() is not None:
                    log.warning("job_task_failed", job_id=job_id, error=str(task.exception()))
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
            "worker_stopping", grace_s=self.settings.drain_grace_s, running=self._running_ids()
        )
        # Shutting down: a Redis outage now ends the wait instead of being ridden through.
        for client in (self.redis, self.worker.pool if self.worker else None):
            if client is not None:
                stop_riding_through(client)
        if self.worker is not None:
            self.worker.allow_pick_jobs = False
        self._draining = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        worker = self.worker
        if worker is not None and worker.tasks:
            await asyncio.wait(list(worker.tasks.values()), timeout=self.settings.drain_grace_s)
        self._stop_now()

    def _stop_now(self) -> None:
        running = self._running_ids()
        if running:
            # Their children are killed and the jobs left queued (not counted as attempts).
            self.requeued = sorted({*self.requeued, *running})
            log.warning("jobs_requeued", job_ids=running, reason="shutdown")
        if self.worker is not None and self.worker.main_task is not None:
            self.worker.handle_sig(signal.SIGTERM)  # cancels running jobs, then arq's main task


async def run_worker(
    settings: Settings,
    *,
    burst: bool = False,
    loaders: Mapping[ModelFormat, str] | None = None,
    preload: Sequence[str] = (),
) -> None:
    """Run a worker until SIGTERM/SIGINT (or, in burst mode, until the queue is drained)."""
    await WorkerRunner(settings, burst=burst, loaders=loaders, preload=preload).run()
