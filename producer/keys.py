"""Where loadwarden keeps things in Redis beside arq's own keys: what both sides read.

Keys only the worker reads and writes are in ``loadwarden.worker._keys``.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from loadwarden.producer.contract import LoadRequest

#: The one job function a producer may name; the worker registers it under this name.
FUNCTION_NAME = "load"
#: Set when a producer cancels a job; the job id is also published on CANCEL_CHANNEL.
CANCEL_KEY_PREFIX = "loadwarden:cancel:"
CANCEL_CHANNEL = "loadwarden:cancel"
#: A worker publishes a job's id here once its result is stored (waiting clients subscribe).
FINISHED_CHANNEL = "loadwarden:finished"
#: ... and its stored result here, as stored (``loadwarden.producer.finished``): the client's
#: own channel, which spares it the read after the push.
FINISHED_REPORTS_CHANNEL = "loadwarden:finished:reports"
#: The job id of a request that is queued or running (so enqueueing it again returns it).
DEDUPE_KEY_PREFIX = "loadwarden:dedupe:"
#: A capped stream of the final reports of jobs that failed for good.
DEAD_LETTER_STREAM = "loadwarden:dead"
#: Each worker's heartbeat (a WorkerStatus as JSON), expiring unless renewed.
WORKER_KEY_PREFIX = "loadwarden:worker:"
#: Per-model failures the failure memory counts (a hash: job id -> failure as JSON), expiring
#: a window after the latest; see loadwarden.producer.failures.
FAILURES_KEY_PREFIX = "loadwarden:failures:"
#: Every model identity with remembered failures, scored by when its memory lapses (ms).
FAILING_ZSET = "loadwarden:failing"
#: The identities among them with enough failures to be refused, scored the same way.
REFUSING_ZSET = "loadwarden:refusing"


def now_ms() -> int:
    """The wall clock in ms since the epoch: how arq scores its queue, and how every sorted
    set here is scored (leases, heartbeats) and every per-minute bucket named."""
    return int(time.time() * 1000)


#: Pushed (LPUSH) with each enqueue; idle workers block on it (BLPOP) instead of polling.
WAKE_KEY_SUFFIX = ":wake"
#: Tokens kept at most: enough to wake every idle worker of a large fleet, and a cap on what
#: piles up while all are busy (a stale token costs one empty look at the queue).
WAKE_TOKENS_MAX = 64
#: Tokens older than this are dropped with their key (no idle worker was there to take them).
WAKE_TTL_MS = 60_000


def wake_key(queue_name: str) -> str:
    """The list idle workers of ``queue_name`` block on, one token per enqueue."""
    return queue_name + WAKE_KEY_SUFFIX


def wake_workers(pipe: Any, queue_name: str) -> None:
    """Queue on ``pipe`` (a redis-py pipeline) the push that wakes an idle worker; the atomic
    enqueue (``loadwarden.producer.dedupe``) does the same in its script."""
    key = wake_key(queue_name)
    pipe.lpush(key, "1")
    pipe.ltrim(key, 0, WAKE_TOKENS_MAX - 1)
    pipe.pexpire(key, WAKE_TTL_MS)


def dedupe_key(request: LoadRequest) -> str:
    """The key naming one request's content (labels included: they are part of what was asked)."""
    return hashlib.sha256(request.model_dump_json().encode()).hexdigest()


#: Running jobs, scored by when their lease lapses (a dead worker's jobs drop out by themselves).
RUNNING_ZSET = "loadwarden:running"
#: Live workers, scored by when their heartbeat lapses.
WORKERS_ZSET = "loadwarden:workers"
#: Per-minute service counters (a hash of jobs finished and busy load-seconds), for the
#: autoscaler's service-rate estimate: ``<prefix><unix minute>``.
SERVICE_KEY_PREFIX = "loadwarden:service:"
#: The most recent finished loads (job id, outcome, source, labels), newest last, for the
#: console's list of loads; capped (approximately) at the worker's RECENT_MAXLEN entries.
RECENT_STREAM = "loadwarden:recent"
#: Each service bucket also counts finished jobs per outcome under ``<prefix><outcome>``.
SERVICE_OUTCOME_FIELD_PREFIX = "outcome:"
#: Minutes of service counters the estimate reads (an hour: shorter windows were noisy).
SERVICE_WINDOW_MINUTES = 60
