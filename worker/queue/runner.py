"""One worker process's life: the supervisor, the arq worker, the side tasks, and shutdown.

``WorkerRunner`` owns the supervisor (fork server), a Redis connection for
loadwarden's own bookkeeping (history, heartbeat, attempts, cancels, dead
letters), the arq worker (through ``ArqAdapter``, the only code that knows
arq's Worker; made anew, with backoff, when Redis drops), and shutdown: the
first SIGTERM/SIGINT stops pulling jobs and lets running loads finish for
``drain_grace_s`` (by default the deadline ceiling), then kills them and leaves
their jobs queued for another worker; a second signal stops at once.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from loadwarden.producer.connection import Pauses, redis_client, stop_riding_through
from loadwarden.producer.contract import ModelFormat
from loadwarden.worker._tasks import cancel_and_wait
from loadwarden.worker.config import Settings
from loadwarden.worker.load.failures import FailureMemory
from loadwarden.worker.load.history import History
from loadwarden.worker.load.supervisor import Supervisor
from loadwarden.worker.ops.probes import Probes
from loadwarden.worker.ops.queue_gauges import update_queue_gauges
from loadwarden.worker.queue.arq_adapter import ArqAdapter
from loadwarden.worker.queue.heartbeat import beat
from loadwarden.worker.queue.jobs import JobBook

#: First and longest pause before arq's worker is made again once Redis dropped it for
#: longer than the ride-through: soon after a short outage, a few a minute in a long one.
ARQ_RESTART_FIRST_S = 0.5
ARQ_RESTART_MAX_S = 10.0

log = structlog.get_logger("loadwarden.worker")


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
        #: The arq worker of the current connection (a new one after Redis was lost).
        self.arq: ArqAdapter | None = None
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

    def liveness(self) -> tuple[bool, str]:
        """Live unless the fork server has been down longer than ``forkserver_down_max_s``:
        lost, and none started since, or each lost again soon after its start (``_backoff``).

        Such a worker claims nothing, or barely anything, until one stays up; a restart of the
        process (the liveness probe's) gives it a fresh one."""
        limit_s, down_s = self.settings.forkserver_down_max_s, self.supervisor.forkserver.down_s
        if limit_s is not None and down_s > limit_s:
            return False, (
                f"no fork server for {down_s:.1f} s since it was lost (none started, or each "
                f"lost again soon after its start), over "
                f"LOADWARDEN_FORKSERVER_DOWN_MAX_S ({limit_s:g} s)"
            )
        return True, "ok"

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
                    live=self.liveness,
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
        return self.arq.running_ids() if self.arq is not None else []

    async def _run_arq(self, sup: Supervisor, book: JobBook) -> None:
        pauses = Pauses(ARQ_RESTART_FIRST_S, ARQ_RESTART_MAX_S)
        while not self._stop_requested:
            self.arq = arq = ArqAdapter(self.settings, sup, book, burst=self.burst)
            try:
                await arq.run()
                return
            except (RedisError, OSError) as exc:
                log.warning("redis_lost", error=str(exc), retry_in_s=pauses.next_s)
                await pauses.wait()
            finally:
                await arq.close()

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
        for client in (self.redis, self.arq.redis if self.arq else None):
            if client is not None:
                stop_riding_through(client)
        if self.arq is not None:
            self.arq.stop_picking()
        self._draining = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        if self.arq is not None:
            await self.arq.wait_for_jobs(self.settings.drain_grace_s)
        self._stop_now()

    def _stop_now(self) -> None:
        running = self._running_ids()
        if running:
            # Their children are killed and the jobs left queued (not counted as attempts).
            self.requeued = sorted({*self.requeued, *running})
            log.warning("jobs_requeued", job_ids=running, reason="shutdown")
        if self.arq is not None:
            self.arq.stop_now()  # cancels running jobs, then arq's main loop


async def run_worker(
    settings: Settings,
    *,
    burst: bool = False,
    loaders: Mapping[ModelFormat, str] | None = None,
    preload: Sequence[str] = (),
) -> None:
    """Run a worker until SIGTERM/SIGINT (or, in burst mode, until the queue is drained)."""
    await WorkerRunner(settings, burst=burst, loaders=loaders, preload=preload).run()
