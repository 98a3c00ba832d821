"""A job's bookkeeping in Redis beyond arq's own: attempts, lease, cancel flag, dead letters.

Keys (all JSON, never pickle):
  loadwarden:attempts:<job>   the attempts so far (a list of Attempt), until the job ends
  loadwarden:cancel:<job>     set by a producer's cancel; also published on CANCEL_CHANNEL
  loadwarden:dedupe:<hash>    the job id of a queued or running request (idempotent enqueue)
  loadwarden:dead             a capped stream of final reports of jobs that failed for good
  arq:in-progress:<job>       arq's own marker, whose expiry we keep short: the crash lease
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog
from arq.constants import in_progress_key_prefix
from pydantic import TypeAdapter, ValidationError
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError

from loadwarden.producer.connection import follow
from loadwarden.producer.contract import Attempt, LoadReport, LoadRequest, Outcome
from loadwarden.producer.keys import (
    CANCEL_CHANNEL,
    CANCEL_KEY_PREFIX,
    DEAD_LETTER_STREAM,
    DEDUPE_KEY_PREFIX,
    RECENT_STREAM,
    RUNNING_ZSET,
    SERVICE_KEY_PREFIX,
    SERVICE_OUTCOME_FIELD_PREFIX,
    SERVICE_WINDOW_MINUTES,
    dedupe_key,
    now_ms,
)
from loadwarden.worker._keys import ATTEMPTS_KEY_PREFIX, RECENT_MAXLEN
from loadwarden.worker._tasks import finish_despite_cancel
from loadwarden.worker.config import Settings
from loadwarden.worker.load._deadline import CancelFlag
from loadwarden.worker.ops.metrics import Metrics

log = structlog.get_logger("loadwarden.jobs")

_attempts = TypeAdapter(list[Attempt])
#: ``finish``'s arguments (request, final report, busy seconds), left for a later transaction.
Finish = tuple[LoadRequest | None, LoadReport, float]


def _parse_attempts(raw: bytes | None) -> list[Attempt]:
    try:
        return _attempts.validate_json(raw) if raw else []
    except ValidationError:
        return []


#: How long a job's attempts and cancel flag outlive it (a producer may come back late).
BOOK_TTL_S = 7 * 86_400
#: First and longest pause before following the cancel channel again once Redis dropped it:
#: a cancel in between is not lost (its flag key is read on return), only later.
CANCEL_RESUBSCRIBE_FIRST_S = 0.5
CANCEL_RESUBSCRIBE_MAX_S = 10.0


def _recent_entry(job_id: str, report: LoadReport) -> dict[str, str]:
    """The console's line for one finished load (the source cut short: the report has it all)."""
    return {
        "job_id": job_id,
        "outcome": str(report.outcome),
        "source": report.source[:512],
        "labels": json.dumps(report.labels),
    }


@dataclass(frozen=True, slots=True)
class LeaseStart:
    """A lease's writes: the marker anew, the running entry, and (the first time) the
    attempts so far; ``queue``d on a pipeline (``look_up``'s transaction), or ``send``."""

    redis: Redis
    job_id: str
    attempts: list[Attempt] | None
    lease_ms: int

    def queue(self, pipe: Pipeline) -> int:
        if self.attempts is not None:
            pipe.set(
                ATTEMPTS_KEY_PREFIX + self.job_id,
                _attempts.dump_json(self.attempts),
                ex=BOOK_TTL_S,
            )
        pipe.set(in_progress_key_prefix + self.job_id, b"1", px=self.lease_ms)
        pipe.zadd(RUNNING_ZSET, {self.job_id: now_ms() + self.lease_ms})
        return 2 if self.attempts is None else 3

    async def send(self) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            self.queue(pipe)
            await pipe.execute()


class JobBook:
    """Per-job bookkeeping for one worker, on its own Redis connection."""

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        metrics: Metrics | None = None,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.metrics = metrics
        self._cancel_events: dict[str, CancelFlag] = {}
        #: Job id -> ``finish``'s arguments, for the transaction that stores the result.
        self._finishing: dict[str, Finish] = {}
        #: Job id -> ``begin``'s answer read with the job's claim (raw attempts, cancelled).
        self._begun: dict[str, tuple[bytes | None, bool]] = {}

    async def attempts(self, job_id: str) -> list[Attempt]:
        """Attempts recorded so far (a placeholder still marked ``worker_lost`` was lost)."""
        return _parse_attempts(await self.redis.get(ATTEMPTS_KEY_PREFIX + job_id))

    def begun(self, job_id: str, raw_attempts: bytes | None, cancelled: bool) -> None:
        """``begin``'s answer, read with the job's claim (``LoadWorker``): no round trip of
        its own. Taken once, by ``begin``; ``forget`` drops it."""
        self._begun[job_id] = (raw_attempts, cancelled)

    async def begin(self, job_id: str) -> tuple[list[Attempt], bool]:
        """A run's first look: the attempts so far, and whether a producer cancelled the job
        (read with its claim when there was one, else in one round trip). A cancel that
        comes later reaches ``cancel_event``, followed since before that read."""
        self.cancel_event(job_id)
        if (claimed := self._begun.pop(job_id, None)) is not None:
            raw, cancelled = claimed
            return _parse_attempts(raw), cancelled or self._cancel_events[job_id].is_set()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(ATTEMPTS_KEY_PREFIX + job_id)
            pipe.exists(CANCEL_KEY_PREFIX + job_id)
            raw, cancelled = await pipe.execute()
        return _parse_attempts(raw), bool(cancelled) or self.cancel_event(job_id).is_set()

    async def save_attempts(self, job_id: str, attempts: list[Attempt]) -> None:
        await self.redis.set(
            ATTEMPTS_KEY_PREFIX + job_id, _attempts.dump_json(attempts), ex=BOOK_TTL_S
        )

    async def is_cancelled(self, job_id: str) -> bool:
        return bool(await self.redis.exists(CANCEL_KEY_PREFIX + job_id))

    def cancel_event(self, job_id: str) -> CancelFlag:
        """An event set when a producer cancels this job (while it runs here)."""
        if (flag := self._cancel_events.get(job_id)) is None:
            flag = self._cancel_events[job_id] = CancelFlag()
        return flag

    def forget(self, job_id: str) -> None:
        self._cancel_events.pop(job_id, None)
        self._begun.pop(job_id, None)

    async def watch_cancels(self) -> None:
        """Follow the cancel channel until cancelled; reconnect with backoff when Redis drops."""
        async for data in follow(
            self.redis,
            CANCEL_CHANNEL,
            self.settings.redis,
            on_subscribed=self._catch_up_cancels,
            on_lost=lambda exc, delay_s: log.warning(
                "cancel_watch_lost", error=str(exc), retry_in_s=delay_s
            ),
            first_s=CANCEL_RESUBSCRIBE_FIRST_S,
            max_s=CANCEL_RESUBSCRIBE_MAX_S,
        ):
            job_id = data.decode(errors="replace")
            if job_id in self._cancel_events:
                self._cancel_events[job_id].set()
            # A cancel may arrive before the load starts: the flag key covers that.

    async def _catch_up_cancels(self) -> None:
        """Cancels published while the channel was down: their flags are still in Redis."""
        for job_id, event in list(self._cancel_events.items()):
            if not event.is_set() and await self.is_cancelled(job_id):
                event.set()

    @contextlib.asynccontextmanager
    async def lease(
        self, job_id: str, attempts: list[Attempt], *, hand_over: bool = False
    ) -> AsyncIterator[LeaseStart | None]:
        """Keep arq's in-progress marker alive only while we live: if this worker dies, the
        marker lapses after ``lease_s`` and another worker runs the job. Each renewal
        writes the marker anew (not only its expiry), so a marker a failover lost is back
        within ``lease_renew_s`` and other workers leave the job alone.

        ``attempts`` are saved with the first renewal, in its round trip (a failure to
        save them raises, as ``save_attempts`` would); later renewals only log failures.
        With ``hand_over`` that first renewal is not sent but handed to the caller (yielded),
        for the supervisor to send before it inspects or loads anything (``look_up``): the
        marker the claim wrote holds the job meanwhile.
        """
        lease_ms = int(self.settings.lease_s * 1000)

        async def renew() -> None:
            while True:
                await asyncio.sleep(self.settings.lease_renew_s)
                try:
                    await LeaseStart(self.redis, job_id, None, lease_ms).send()
                except (RedisError, OSError) as exc:
                    log.warning("lease_renewal_failed", job_id=job_id, error=str(exc))

        start = LeaseStart(self.redis, job_id, attempts, lease_ms)
        if not hand_over:
            await start.send()

        task = asyncio.create_task(renew(), name=f"loadwarden-lease-{job_id}")
        try:
            yield start if hand_over else None
        except BaseException:
            task.cancel()
            await asyncio.wait({task})
            with contextlib.suppress(RedisError, OSError):  # else it lapses by itself
                await finish_despite_cancel(self.redis.zrem(RUNNING_ZSET, job_id))
            raise
        # An attempt that ended goes on to ``finish`` or ``add_busy``, whose round trip
        # drops the running entry too.
        task.cancel()
        await asyncio.wait({task})

    async def add_busy(self, job_id: str, seconds: float) -> None:
        """Count a run that ended in a retry toward the service time (its job is not done)."""
        bucket = SERVICE_KEY_PREFIX + str(now_ms() // 60_000)
        with contextlib.suppress(RedisError, OSError):  # a lost figure only skews the rate
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.zrem(RUNNING_ZSET, job_id)  # the run is over (the lease left it)
                pipe.hincrbyfloat(bucket, "seconds", seconds)
                pipe.expire(bucket, (SERVICE_WINDOW_MINUTES + 5) * 60)
                await pipe.execute()

    async def finish(
        self,
        job_id: str,
        request: LoadRequest | None,
        report: LoadReport,
        *,
        busy_s: float | None = None,
    ) -> None:
        """The job ended for good: drop its bookkeeping; dead-letter it unless ok or cancelled.

        ``busy_s`` is how long the worker held this last run (None: the report's own
        attempt spans); it counts toward the autoscaler's service time.
        """
        async with self.redis.pipeline(transaction=True) as pipe:
            self.finish_on(pipe, job_id, request, report, busy_s=busy_s)
            await pipe.execute()

    def finish_later(
        self, job_id: str, request: LoadRequest | None, report: LoadReport, busy_s: float
    ) -> None:
        """Leave ``finish`` to the transaction that stores the job's result (``take_finish``):
        one round trip less per job."""
        self._finishing[job_id] = (request, report, busy_s)

    def take_finish(self, job_id: str) -> Finish | None:
        """The ``finish`` left for the result's transaction, once (None: none was left)."""
        return self._finishing.pop(job_id, None)

    def finish_on(
        self,
        pipe: Pipeline,
        job_id: str,
        request: LoadRequest | None,
        report: LoadReport,
        *,
        busy_s: float | None = None,
    ) -> None:
        """Queue ``finish``'s writes on ``pipe`` (a redis-py transaction), not sent yet."""
        now = now_ms()
        if busy_s is None:
            busy_s = sum((a.finished_at - a.started_at).total_seconds() for a in report.attempts)
        pipe.delete(ATTEMPTS_KEY_PREFIX + job_id, CANCEL_KEY_PREFIX + job_id)
        pipe.zrem(RUNNING_ZSET, job_id)  # the lease leaves it to this round trip
        bucket = SERVICE_KEY_PREFIX + str(now // 60_000)
        pipe.hincrby(bucket, "jobs", 1)
        pipe.hincrbyfloat(bucket, "seconds", busy_s)
        pipe.hincrby(bucket, SERVICE_OUTCOME_FIELD_PREFIX + str(report.outcome), 1)
        pipe.expire(bucket, (SERVICE_WINDOW_MINUTES + 5) * 60)
        pipe.xadd(
            RECENT_STREAM,
            _recent_entry(job_id, report),  # type: ignore[arg-type]
            maxlen=RECENT_MAXLEN,
            approximate=True,
        )
        if request is not None:
            pipe.delete(DEDUPE_KEY_PREFIX + dedupe_key(request))
        if report.outcome not in (Outcome.OK, Outcome.CANCELLED):
            if self.metrics is not None:
                self.metrics.dead_letters.inc()
            fields = {
                "job_id": job_id,
                "outcome": str(report.outcome),
                "request": request.model_dump_json() if request else "null",
                "report": report.model_dump_json(),
                "at": datetime.now(UTC).isoformat(),
            }
            pipe.xadd(
                DEAD_LETTER_STREAM,
                fields,  # type: ignore[arg-type]
                maxlen=self.settings.dead_letter_maxlen,
                approximate=True,
            )

    async def dead_letter_raw(self, job_id: str, payload: str, report: LoadReport) -> None:
        """Dead-letter a job whose payload was not a request at all (kept as text, truncated)."""
        fields = {
            "job_id": job_id,
            "outcome": str(report.outcome),
            "request": json.dumps(payload[:4096]),
            "report": report.model_dump_json(),
            "at": datetime.now(UTC).isoformat(),
        }
        if self.metrics is not None:
            self.metrics.dead_letters.inc()
        await self.redis.xadd(
            DEAD_LETTER_STREAM,
            fields,  # type: ignore[arg-type]
            maxlen=self.settings.dead_letter_maxlen,
            approximate=True,
        )
