"""The arq job function: one attempt of a load, with retries, lease, cancel and dead letters.

Every way a job can end leaves a LoadReport (the stored result) and, unless it is
``ok`` or ``cancelled``, a dead letter:

- a payload that is not our envelope or not a LoadRequest ends ``invalid``
  (``bad_payload`` / ``bad_request``);
- the load itself classifies its own failures (``Supervisor.load`` never raises);
- a Redis connection error in our bookkeeping is not the job's fault: the job is
  handed back to arq as a ``Retry`` (if Redis is still gone, arq cannot requeue it
  either and the job waits for its crash lease), never stored as a failure;
- anything else that escapes (a bug of ours, a key of ours holding the wrong type)
  ends ``crashed`` / ``internal_error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime
from typing import Any

import structlog
from arq import Retry
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from loadwarden.producer.contract import Attempt, LoadReport, LoadRequest
from loadwarden.producer.errors import LoadError, describe
from loadwarden.worker._tasks import finish_despite_cancel
from loadwarden.worker.config import Settings
from loadwarden.worker.load._lookup import FirstWritesFailed
from loadwarden.worker.load._outcome import EARLY_OUTCOMES, Early, failure
from loadwarden.worker.load.supervisor import Supervisor
from loadwarden.worker.queue.envelope import UNDECODABLE
from loadwarden.worker.queue.jobs import JobBook
from loadwarden.worker.queue.retry import backoff_s, retry_on, should_retry

#: Reruns after lost workers allowed beyond a request's max_attempts before giving up.
LOST_WORKER_ALLOWANCE = 2
#: Redis errors that say "not now" rather than "never": the job is retried, not failed.
#: (BusyLoadingError, a server still reading its AOF, is a ConnectionError; ReadOnlyError
#: is a replica that was primary a moment ago.)
TRANSIENT_REDIS_ERRORS: tuple[type[Exception], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ReadOnlyError,
    OSError,
)
#: How long a job whose bookkeeping lost Redis waits before arq runs it again: about the
#: time a restarted Redis with a small AOF takes to answer again.
REDIS_RETRY_DEFER_S = 1.0
#: arq tries of one job after which a "transient" error is taken for a lasting one (an
#: OSError that is not Redis's at all would otherwise retry forever): 200 x 1 s outlasts
#: any failover we measured (2-6 s) by far.
MAX_JOB_TRIES = 200
#: Set in the job context by a worker that writes a job's final bookkeeping in the
#: transaction that stores its result (``LoadWorker.finish_job``), not in a round trip of its own.
FINISH_WITH_RESULT = "loadwarden_finish_with_result"

log = structlog.get_logger("loadwarden.worker")


def _parse(request: Any, extra: dict[str, Any]) -> LoadRequest | LoadError:
    """The request, or the error that refuses it; never raises (the parse stage)."""
    try:
        if isinstance(request, dict) and UNDECODABLE in request:
            return failure(
                Early.BAD_PAYLOAD, f"the job payload is not loadwarden JSON: {request[UNDECODABLE]}"
            )
        if extra:
            raise ValueError(f"unexpected job arguments: {sorted(extra)}")
        return LoadRequest.model_validate(request)
    except (ValidationError, ValueError) as exc:
        return failure(Early.BAD_REQUEST, f"the job is not a valid LoadRequest: {describe(exc)}")
    except Exception as exc:  # the request came from a producer: nothing in it may escape
        return failure(Early.BAD_REQUEST, f"the job could not be parsed: {describe(exc)}")


def _source_of(request: Any) -> str:
    source = request.get("source") if isinstance(request, dict) else None
    return source if isinstance(source, str) else ""


def _now() -> datetime:
    return datetime.now(UTC)


async def load_job(ctx: dict[str, Any], request: Any = None, **extra: Any) -> dict[str, Any]:
    """arq job function: one attempt of a load; returns the final report or raises Retry."""
    job_id: str = ctx["job_id"]
    try:
        report = await _job(ctx, request, extra)
    except (Retry, asyncio.CancelledError):
        raise
    except Exception as exc:
        if isinstance(exc, TRANSIENT_REDIS_ERRORS) and ctx.get("job_try", 1) < MAX_JOB_TRIES:
            log.warning("job_redis_lost", job_id=job_id, error=describe(exc))
            raise Retry(defer=REDIS_RETRY_DEFER_S) from exc
        log.exception("job_internal_error", job_id=job_id)
        error = failure(Early.INTERNAL_ERROR, f"the job failed inside loadwarden: {describe(exc)}")
        parsed = _parse(request, extra)
        report = await end_with_report(
            ctx, job_id, parsed if isinstance(parsed, LoadRequest) else request, error
        )
    return report.model_dump(mode="json")


async def end_with_report(
    ctx: dict[str, Any], job_id: str, request: Any, error: LoadError
) -> LoadReport:
    """A final report for a job that could not run its load, dead-lettered (best effort)."""
    sup: Supervisor = ctx["supervisor"]
    book: JobBook = ctx["book"]
    parsed = request if isinstance(request, LoadRequest) else None
    source = parsed.source if parsed else _source_of(request)
    enqueued_at = ctx.get("enqueue_time") if parsed else None
    report = sup.rejected(error, job_id=job_id, source=source, enqueued_at=enqueued_at)
    try:
        if parsed is not None:
            await book.finish(job_id, parsed, report)
        else:
            await book.dead_letter_raw(job_id, _preview(request), report)
    except TRANSIENT_REDIS_ERRORS:
        raise
    except Exception as exc:  # the report still goes back; only the dead letter is missing
        log.error("dead_letter_failed", job_id=job_id, error=describe(exc))
    return report


def _preview(request: Any) -> str:
    try:
        return repr(request)[:4096]
    except Exception as exc:  # repr() of a huge integer raises past sys.int_info's limit
        return f"(no preview: {describe(exc)})"


async def _job(ctx: dict[str, Any], request: Any, extra: dict[str, Any]) -> LoadReport:
    sup: Supervisor = ctx["supervisor"]
    book: JobBook = ctx["book"]
    settings: Settings = ctx["settings"]
    job_id: str = ctx["job_id"]
    # The autoscaler's service time: all of this run (bookkeeping, inspection, waiting for
    # memory, the load), not only the child's wall time.
    started = time.monotonic()
    enqueued_at: datetime | None = ctx.get("enqueue_time")
    parsed = _parse(request, extra)
    if isinstance(parsed, LoadError):
        return await end_with_report(ctx, job_id, request, parsed)
    previous, cancelled = await book.begin(job_id)
    number = len(previous) + 1
    final = _refuse_early(sup, parsed, job_id, number, enqueued_at, cancelled=cancelled)
    if final is None:
        try:
            final = await _attempt(sup, book, settings, parsed, job_id, previous, enqueued_at)
        except Retry:
            await book.add_busy(job_id, time.monotonic() - started)
            raise
    final = final.model_copy(update={"attempts": previous + final.attempts})
    if ctx.get(FINISH_WITH_RESULT):
        book.finish_later(job_id, parsed, final, time.monotonic() - started)
        return final
    try:
        await book.finish(job_id, parsed, final, busy_s=time.monotonic() - started)
    except TRANSIENT_REDIS_ERRORS:
        raise
    except Exception as exc:  # the report is what matters: it still goes back through arq
        log.error("job_bookkeeping_failed", job_id=job_id, error=describe(exc))
    return final


def _refuse_early(
    sup: Supervisor,
    request: LoadRequest,
    job_id: str,
    number: int,
    enqueued_at: datetime | None,
    *,
    cancelled: bool,
) -> LoadReport | None:
    """A final report without loading: cancelled while queued, or out of attempts."""
    error: LoadError | None = None
    if cancelled:
        error = failure(Early.CANCELLED, "cancelled before it started")
    elif number > request.retry.max_attempts + LOST_WORKER_ALLOWANCE:
        error = failure(
            Early.ATTEMPTS_EXHAUSTED, f"{number - 1} attempts used, workers lost on the way"
        )
    if error is None:
        return None
    return sup.rejected(
        error, job_id=job_id, source=request.source, attempt=number, enqueued_at=enqueued_at
    )


async def _attempt(
    sup: Supervisor,
    book: JobBook,
    settings: Settings,
    request: LoadRequest,
    job_id: str,
    previous: list[Attempt],
    enqueued_at: datetime | None,
) -> LoadReport:
    """Run one attempt; raise arq's Retry when the policy wants another."""
    number = len(previous) + 1
    now = _now()
    # Stays recorded only if this worker dies mid-load: then the next run counts it lost.
    lost = Attempt(
        number=number,
        outcome=EARLY_OUTCOMES[Early.WORKER_LOST],
        error_code=Early.WORKER_LOST,
        worker=sup.info.id,
        started_at=now,
        finished_at=now,
    )
    try:
        # The lease's first write rides in the supervisor's look-up: one round trip less.
        async with book.lease(job_id, [*previous, lost], hand_over=True) as first:
            try:
                report = await sup.load(
                    request,
                    job_id=job_id,
                    attempt=number,
                    enqueued_at=enqueued_at,
                    cancel=book.cancel_event(job_id),
                    first=first,
                )
            except FirstWritesFailed as exc:  # as a failed lease before the load: not the job's
                raise exc.error from None
    except asyncio.CancelledError:  # shutdown: this was not an attempt; the job is released
        with contextlib.suppress(RedisError, OSError):
            await finish_despite_cancel(book.save_attempts(job_id, previous))
        raise
    finally:
        book.forget(job_id)
    retryable = retry_on(
        request.retry, "retry_on" in request.retry.model_fields_set, settings.retry_on
    )
    if not should_retry(report.outcome, number, request.retry, retryable):
        return report
    delay = round(backoff_s(number, request.retry), 3)
    attempt = report.attempts[-1].model_copy(update={"delay_s": delay})
    await book.save_attempts(job_id, [*previous, attempt])
    sup.metrics.retries.inc()
    log.info(
        "job_retry_scheduled",
        job_id=job_id,
        attempt=number,
        outcome=str(report.outcome),
        error_code=attempt.error_code,
        delay_s=delay,
    )
    raise Retry(defer=delay)
