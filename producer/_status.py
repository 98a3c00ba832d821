"""A look at the queue for a client: ready, deferred and running jobs, dead letters, workers."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, ValidationError

from loadwarden.producer._guard import guard
from loadwarden.producer.contract import WorkerStatus
from loadwarden.producer.counts import live_worker_ids, queue_counts
from loadwarden.producer.keys import WORKER_KEY_PREFIX

if TYPE_CHECKING:
    from loadwarden.producer.client import Client


class QueueStatus(BaseModel):
    """A look at the queue: ready and deferred jobs, running jobs, dead letters, live workers."""

    model_config = ConfigDict(frozen=True)

    queue: str
    ready: int
    deferred: int
    running: int
    dead_letters: int
    workers: list[WorkerStatus]

    @property
    def queued(self) -> int:
        return self.ready + self.deferred

    @property
    def workers_alive(self) -> bool:
        return bool(self.workers)

    @property
    def memory_budget_bytes(self) -> int:
        return sum(w.memory_budget_bytes for w in self.workers)

    @property
    def memory_in_use_bytes(self) -> int:
        return sum(w.memory_in_use_bytes for w in self.workers)


async def status(client: Client) -> QueueStatus:
    """Ready, deferred and running jobs, dead letters, and the live workers' heartbeats."""
    redis = await client.redis()
    counts = await guard(queue_counts(redis, client.queue_name))
    ids = await guard(live_worker_ids(redis))
    workers = []
    for raw in await guard(redis.mget([WORKER_KEY_PREFIX + i for i in ids])) if ids else []:
        if raw is None:
            continue  # lapsed between the two reads
        with contextlib.suppress(ValidationError):
            worker = WorkerStatus.model_validate_json(raw)
            if worker.queue == client.queue_name:
                workers.append(worker)
    workers.sort(key=lambda w: w.id)
    return QueueStatus(
        queue=client.queue_name,
        ready=int(counts["ready"]),
        deferred=int(counts["deferred"]),
        running=int(counts["running"]),
        dead_letters=int(counts["dead"]),
        workers=workers,
    )
