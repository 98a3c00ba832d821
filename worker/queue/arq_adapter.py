"""The one place that knows arq 0.28's Worker: how it is built, run, drained and stopped.

Everything else in loadwarden talks to arq's worker through ``ArqAdapter``
(``runner.py``) and never reads or writes its attributes: arq's names for its
state (``tasks``, ``main_task``, ``allow_pick_jobs``, ``in_progress_timeout_s``,
``handle_sig``, ``close``...) are not an API, and a new arq release may change
them. Together with the arq subclass it builds (``_arq.LoadWorker``, which
overrides arq's own methods), this module is all there is to review when arq
moves; ``tests/test_arq_boundary.py`` keeps it so.

The stop sequence arq's signal handler would run is split into named stages the
runner calls: ``stop_picking`` (no new jobs), ``wait_for_jobs`` (the drain),
``stop_now`` (cancel what still runs, then arq's main loop), and ``close``, the
tidy-up once that loop ended.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import redis.asyncio as aioredis
import structlog
from arq import func
from arq.connections import ArqRedis
from arq.worker import Worker
from redis.exceptions import RedisError

from loadwarden.producer import wire
from loadwarden.producer.connection import NotReplicated, confirm_replicated, redis_client
from loadwarden.producer.keys import FUNCTION_NAME
from loadwarden.producer.settings import RedisOptions
from loadwarden.worker.config import Settings
from loadwarden.worker.load.supervisor import Supervisor
from loadwarden.worker.queue._arq import LoadWorker
from loadwarden.worker.queue.envelope import job_deserializer
from loadwarden.worker.queue.job import load_job
from loadwarden.worker.queue.jobs import JobBook

#: arq's own timeout around a job must never fire before our deadline does.
ARQ_TIMEOUT_MARGIN_S = 60

#: How long closing waits for cancelled jobs to finish their own Redis bookkeeping.
CLOSE_WAIT_S = 10

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


class ArqAdapter:
    """One arq worker, as the runner sees it: run, stop picking, drain, stop, running ids.

    One adapter per connection: after ``run`` ended (stopped, or Redis lost), the
    runner makes a new one to go on.
    """

    def __init__(
        self, settings: Settings, supervisor: Supervisor, book: JobBook, *, burst: bool = False
    ) -> None:
        self._worker = create_worker(settings, supervisor, book, burst=burst)

    @property
    def redis(self) -> ArqRedis:
        """The client arq pulls jobs and stores results with."""
        return self._worker.pool

    @property
    def alive(self) -> bool:
        """Whether arq's main loop runs now (started and not ended)."""
        main = self._worker.main_task
        return main is not None and not main.done()

    def running_ids(self) -> list[str]:
        """Jobs this worker holds now: picked by arq, whether or not a load has begun."""
        tasks = self._worker.tasks
        return sorted(job_id for job_id, task in tasks.items() if not task.done())

    async def run(self) -> None:
        """Run arq's loop until ``stop_now`` (or, in burst mode, an empty queue).

        A Redis connection error escapes (the runner reconnects with a new adapter);
        a cancel of the calling task is passed on. ``close`` afterwards, in any case.
        """
        try:
            await self._worker.async_run()
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
            # stop_now() cancelled arq's main task: a stop, not an error.

    def stop_picking(self) -> None:
        """Take no new job; the running ones go on."""
        self._worker.allow_pick_jobs = False

    async def wait_for_jobs(self, timeout_s: float) -> None:
        """Wait until the running jobs end, at most ``timeout_s``."""
        tasks = list(self._worker.tasks.values())
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)

    def stop_now(self) -> None:
        """Cancel the running jobs, then arq's main loop (``run`` then returns)."""
        if self._worker.main_task is not None:
            self._worker.handle_sig(signal.SIGTERM)

    async def close(self) -> None:
        """Tidy up once arq's loop ended: arq's ``close`` after the jobs' own last writes.

        Nothing while the loop has not ended yet (the caller was cancelled, and arq's
        main task with it, still unwinding).
        """
        if self.alive:
            return
        worker = self._worker
        # Let cancelled jobs finish their own bookkeeping first: arq's close() cancels
        # whatever still runs a second time, which would cut a job's last Redis writes.
        running = [t for t in worker.tasks.values() if not t.done()]
        if running:
            await asyncio.wait(running, timeout=CLOSE_WAIT_S)
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
