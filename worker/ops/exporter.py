"""`loadwarden exporter`: the queue's gauges for Prometheus, running even when no worker does.

Workers export their own load metrics; autoscalers need the backlog when the
pool is scaled to zero, so this small process exports the queue gauges
(ready / deferred / running jobs, oldest ready job, dead letters, live and
desired workers, Redis up) and nothing else: no worker-only series that would
read as a worker with no loads.
"""

from __future__ import annotations

import asyncio
import signal

import structlog
from prometheus_client import CollectorRegistry
from redis.exceptions import RedisError

from loadwarden.producer.connection import redis_client
from loadwarden.worker._tasks import cancel_and_wait
from loadwarden.worker.config import Settings
from loadwarden.worker.ops.probes import Probes
from loadwarden.worker.ops.queue_gauges import QueueGauges, update_queue_gauges

log = structlog.get_logger("loadwarden.exporter")


async def run_exporter(
    settings: Settings,
    port: int,
    *,
    host: str = "0.0.0.0",
    stop: asyncio.Event | None = None,
    interval_s: float = 5.0,
) -> None:
    """Serve the queue gauges on ``host:port`` until SIGTERM/SIGINT (or ``stop`` is set)."""
    assert settings.redis_url
    redis = redis_client(settings.redis_url, settings.redis)
    registry = CollectorRegistry()
    gauges = QueueGauges(registry)
    stopping = stop or asyncio.Event()

    async def ready() -> tuple[bool, str]:
        try:
            async with asyncio.timeout(1.0):
                await redis.ping()
        except (RedisError, OSError, TimeoutError) as exc:
            return False, f"Redis does not answer: {exc}"
        return True, "ready"

    probes = Probes(registry, ready, host=host, port=port)
    loop = asyncio.get_running_loop()
    if stop is None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
    bound = await probes.start()
    updater = asyncio.create_task(update_queue_gauges(redis, gauges, settings, interval_s))
    log.info("exporter_started", port=bound, queue=settings.queue_name)
    try:
        await stopping.wait()
    finally:
        await cancel_and_wait(updater)
        await probes.close()
        await redis.aclose()
        if stop is None:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
