"""The shared queue's gauges (worker and exporter): read from Redis, dropped while it is down."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping

import redis.asyncio as aioredis
import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.exceptions import RedisError

from loadwarden.producer.counts import oldest_ready_age_s, queue_counts
from loadwarden.producer.failures import refused_count
from loadwarden.worker.config import Settings
from loadwarden.worker.ops.autoscale_inputs import desired_from_counts

log = structlog.get_logger("loadwarden.queue_gauges")

#: Job states of the queue gauge.
QUEUE_STATES = ("ready", "deferred", "running")


class QueueGauges(Collector):
    """The shared queue's gauges, and whether Redis answered the last time they were read.

    While Redis does not answer, only ``loadwarden_redis_up 0`` is exported: stale
    backlog figures would keep an autoscaler scaling on numbers nobody is reading.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._counts: Mapping[str, float] | None = None
        self._desired = 0
        self._oldest_age_s = 0.0
        self._refused_models = 0
        registry.register(self)

    def update(
        self,
        counts: Mapping[str, float],
        desired: int,
        oldest_age_s: float,
        refused_models: int = 0,
    ) -> None:
        """Fresh figures from Redis."""
        self._counts, self._desired, self._oldest_age_s = dict(counts), desired, oldest_age_s
        self._refused_models = refused_models

    def lost(self) -> None:
        """Redis did not answer: drop the figures until it does."""
        self._counts = None

    def collect(self) -> Iterable[Metric]:
        counts = self._counts
        yield GaugeMetricFamily(
            "loadwarden_redis_up",
            "1 if Redis answered the last queue read, else 0 (and no queue gauges).",
            value=int(counts is not None),
        )
        if counts is None:
            return
        jobs = GaugeMetricFamily("loadwarden_queue_jobs", "Jobs by state.", labels=["state"])
        for state in QUEUE_STATES:
            jobs.add_metric([state], counts[state])
        yield jobs
        yield GaugeMetricFamily(
            "loadwarden_dead_letter_jobs", "Jobs in the dead-letter stream.", value=counts["dead"]
        )
        yield GaugeMetricFamily(
            "loadwarden_workers_alive", "Workers with a live heartbeat.", value=counts["workers"]
        )
        yield GaugeMetricFamily(
            "loadwarden_desired_workers",
            "Workers the backlog calls for (see `loadwarden autoscale`).",
            value=self._desired,
        )
        yield GaugeMetricFamily(
            "loadwarden_queue_oldest_job_age_seconds",
            "How long the oldest ready job has been due (0 with none ready).",
            value=self._oldest_age_s,
        )
        yield GaugeMetricFamily(
            "loadwarden_failing_models",
            "Models the failure memory refuses now as repeatedly failing.",
            value=self._refused_models,
        )


async def update_queue_gauges(
    redis: aioredis.Redis,
    gauges: QueueGauges,
    settings: Settings,
    interval_s: float = 5.0,
) -> None:
    """Refresh the queue gauges every ``interval_s`` until cancelled (cheap sorted-set reads).

    When Redis does not answer, the gauges are dropped (``loadwarden_redis_up`` 0) rather
    than left at their last values.
    """
    while True:
        try:
            counts = await queue_counts(redis, settings.queue_name)
            oldest_s = 0.0
            if counts["ready"]:
                oldest_s = await oldest_ready_age_s(redis, settings.queue_name)
            refused = await refused_count(redis)
        except (RedisError, OSError) as exc:
            log.debug("queue_gauges_failed", error=str(exc))
            gauges.lost()
        else:
            gauges.update(counts, desired_from_counts(counts, settings), oldest_s, refused)
        await asyncio.sleep(interval_s)
