"""Each worker's heartbeat in Redis: identity, concurrency, memory budget, jobs in flight.

Written every INTERVAL_S, and at once whenever a job starts, changes phase
(inspecting, waiting for memory or a fork server, loading) or ends, so ``loadwarden status``
shows what runs now, short loads included.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from loadwarden.producer.contract import WorkerStatus
from loadwarden.producer.keys import WORKER_KEY_PREFIX, WORKERS_ZSET, now_ms
from loadwarden.worker._tasks import finish_despite_cancel
from loadwarden.worker.config import Settings
from loadwarden.worker.load.supervisor import Supervisor

#: ``<prefix><worker id>`` holds a WorkerStatus as JSON; it expires unless renewed.
KEY_PREFIX = WORKER_KEY_PREFIX
#: Renewed this often; a worker missing for TTL_S is not alive.
INTERVAL_S = 5.0
#: After a change is published, further changes wait this long: a burst of tiny jobs
#: costs one write per 50 ms at most, and status is still current to a human eye.
MIN_GAP_S = 0.05
TTL_S = 15

log = structlog.get_logger("loadwarden.heartbeat")


def worker_status(supervisor: Supervisor, settings: Settings, started_at: datetime) -> WorkerStatus:
    admission = supervisor.admission
    return WorkerStatus(
        id=supervisor.info.id,
        hostname=supervisor.info.hostname,
        pid=supervisor.info.pid,
        version=supervisor.info.version,
        queue=settings.queue_name,
        concurrency=settings.concurrency,
        memory_budget_bytes=admission.budget_bytes,
        memory_in_use_bytes=admission.in_use_bytes,
        running=admission.running,
        waiting=admission.waiting,
        in_flight=sorted(supervisor.in_flight),
        jobs=sorted(supervisor.in_flight.values(), key=lambda j: j.since),
        cgroups=supervisor.cgroups.mechanism if supervisor.cgroups else "none",
        landlock_abi=supervisor.landlock_abi,
        started_at=started_at,
        seen_at=datetime.now(UTC),
    )


async def beat(redis: Redis, supervisor: Supervisor, settings: Settings) -> None:
    """Write the heartbeat every INTERVAL_S until cancelled; then remove it."""
    started_at = datetime.now(UTC)
    key = KEY_PREFIX + supervisor.info.id
    try:
        while True:
            status = worker_status(supervisor, settings, started_at)
            try:
                # Finished even when cancelled mid-write (a change and a shutdown often come
                # together): a pipeline cut off there would be left holding its connection.
                await finish_despite_cancel(_write(redis, supervisor.info.id, status))
            except (RedisError, OSError) as exc:
                log.warning("heartbeat_failed", error=str(exc))
            await asyncio.sleep(MIN_GAP_S)
            # asyncio.timeout, not wait_for: Python 3.11's wait_for returns the event's
            # result and drops a cancel that comes as the event is set (a job ending as
            # the worker stops), and this loop would then beat on forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(INTERVAL_S - MIN_GAP_S):
                    await supervisor.changed.wait()
            supervisor.changed.clear()
    finally:
        with contextlib.suppress(RedisError, OSError):  # else it expires on its own
            await finish_despite_cancel(redis.delete(key))
            await finish_despite_cancel(redis.zrem(WORKERS_ZSET, supervisor.info.id))


async def _write(redis: Redis, worker_id: str, status: WorkerStatus) -> None:
    async with redis.pipeline(transaction=False) as pipe:
        pipe.set(KEY_PREFIX + worker_id, status.model_dump_json(), ex=TTL_S)
        pipe.zadd(WORKERS_ZSET, {worker_id: now_ms() + TTL_S * 1000})
        await pipe.execute()
