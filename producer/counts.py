"""Cheap counts of the queue's state, shared by `status`, the metrics and the autoscaler."""

from __future__ import annotations

from typing import TYPE_CHECKING

from loadwarden.producer.keys import (
    DEAD_LETTER_STREAM,
    RUNNING_ZSET,
    SERVICE_KEY_PREFIX,
    SERVICE_WINDOW_MINUTES,
    WORKERS_ZSET,
    now_ms,
)

#: Hosts' clocks differ by this much at most (NTP keeps them far closer): a job scored
#: less than this in the future is ready, not deferred.
CLOCK_SKEW_MS = 1000

if TYPE_CHECKING:
    from redis.asyncio import Redis


async def queue_counts(redis: Redis, queue: str) -> dict[str, float]:
    """ready / deferred / running / dead / workers, and the last hour's finished jobs and
    their busy seconds, in one round trip: each O(log n) or O(1), cheap every few seconds.
    """
    now = now_ms()
    due_by = now + CLOCK_SKEW_MS
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zcount(queue, "-inf", due_by)
        pipe.zcount(queue, f"({due_by}", "+inf")
        pipe.zcount(RUNNING_ZSET, now, "+inf")
        pipe.xlen(DEAD_LETTER_STREAM)
        pipe.zcount(WORKERS_ZSET, now, "+inf")
        minute = now // 60_000
        for m in range(minute - SERVICE_WINDOW_MINUTES + 1, minute + 1):
            pipe.hmget(SERVICE_KEY_PREFIX + str(m), ["jobs", "seconds"])
        due, deferred, running, dead, workers, *buckets = await pipe.execute()
    # arq keeps running jobs in the queue's sorted set too, scored in the past.
    return {
        "ready": max(0, due - running),
        "deferred": deferred,
        "running": running,
        "dead": dead,
        "workers": workers,
        "served_jobs": sum(int(b[0] or 0) for b in buckets),
        "served_seconds": sum(float(b[1] or 0) for b in buckets),
    }


async def live_worker_ids(redis: Redis) -> list[str]:
    """Workers whose heartbeat has not lapsed."""
    now = now_ms()
    return [m.decode() for m in await redis.zrangebyscore(WORKERS_ZSET, now, "+inf")]


async def oldest_ready_age_s(redis: Redis, queue: str) -> float:
    """How long the oldest job that is due and held by no worker has been due (0 if none).

    Running jobs stay in the queue's sorted set, scored in the past: of the first
    ``running + 1`` due entries at least one is not running, if any such job exists.
    """
    now = now_ms()
    running = set(await redis.zrangebyscore(RUNNING_ZSET, now, "+inf"))
    due = await redis.zrangebyscore(
        queue, "-inf", now + CLOCK_SKEW_MS, start=0, num=len(running) + 1, withscores=True
    )
    for member, score in due:
        if member not in running:
            return max(0.0, (now - float(score)) / 1000)
    return 0.0
