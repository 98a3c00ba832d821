"""The producer's client: enqueue loads, wait for their reports, look at the queue.

``Client`` is async; ``BlockingClient`` is a small synchronous facade for
backends without an event loop. Both speak only JSON to Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from enum import StrEnum
from types import TracebackType
from typing import Any, Self, TypeVar

from arq.connections import ArqRedis
from arq.constants import result_key_prefix
from arq.jobs import Job, JobStatus
from pydantic import BaseModel, ConfigDict, ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, WatchError
from redis.exceptions import TimeoutError as RedisTimeoutError

from loadwarden.producer import failures, wire
from loadwarden.producer.connection import NotReplicated, confirm_replicated, redis_client
from loadwarden.producer.contract import FailingModel, LoadReport, LoadRequest, WorkerStatus
from loadwarden.producer.counts import live_worker_ids, queue_counts
from loadwarden.producer.dedupe import enqueue_once
from loadwarden.producer.errors import (
    ContractError,
    JobNotFound,
    RedisUnavailable,
    ReportTimeout,
)
from loadwarden.producer.finished import FinishWatch
from loadwarden.producer.keys import (
    CANCEL_CHANNEL,
    CANCEL_KEY_PREFIX,
    DEAD_LETTER_STREAM,
    FUNCTION_NAME,
    WORKER_KEY_PREFIX,
    now_ms,
    wake_workers,
)
from loadwarden.producer.preload import PreloadResult, ProgressCallback, preload
from loadwarden.producer.settings import Settings

T = TypeVar("T")


class JobState(StrEnum):
    """Where a job is."""

    QUEUED = "queued"
    DEFERRED = "deferred"
    RUNNING = "running"
    COMPLETE = "complete"
    NOT_FOUND = "not_found"


_FROM_ARQ = {
    JobStatus.queued: JobState.QUEUED,
    JobStatus.deferred: JobState.DEFERRED,
    JobStatus.in_progress: JobState.RUNNING,
    JobStatus.complete: JobState.COMPLETE,
    JobStatus.not_found: JobState.NOT_FOUND,
}


class DeadLetter(BaseModel):
    """A job that failed for good: its final report and (when it was one) its request."""

    model_config = ConfigDict(frozen=True)

    id: str
    job_id: str
    outcome: str
    at: str
    request: LoadRequest | None
    report: LoadReport

    @classmethod
    def from_entry(cls, entry_id: bytes | str, fields: dict[bytes, bytes]) -> DeadLetter:
        text = {k.decode(): v.decode() for k, v in fields.items()}
        try:
            request: LoadRequest | None = LoadRequest.model_validate_json(text["request"])
        except ValidationError:
            request = None
        return cls(
            id=entry_id.decode() if isinstance(entry_id, bytes) else entry_id,
            job_id=text["job_id"],
            outcome=text["outcome"],
            at=text["at"],
            request=request,
            report=LoadReport.model_validate_json(text["report"]),
        )


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


async def _guard(awaitable: Awaitable[T]) -> T:
    """Await a Redis operation, turning connection failures into RedisUnavailable."""
    try:
        return await awaitable
    except NotReplicated as exc:
        raise RedisUnavailable(f"Redis did not replicate in time: {exc}") from exc
    except (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError) as exc:
        raise RedisUnavailable(f"Redis did not answer: {exc}") from exc


class JobHandle:
    """A reference to one enqueued load."""

    def __init__(self, client: Client, job_id: str) -> None:
        self.client = client
        self.job_id = job_id

    def __repr__(self) -> str:
        return f"<JobHandle {self.job_id}>"

    async def status(self) -> JobState:
        return await self.client.job_state(self.job_id)

    async def report(self, timeout_s: float | None = None) -> LoadReport:
        """Wait for the report: ReportTimeout after ``timeout_s``, JobNotFound if no such job."""
        return await self.client.report(self.job_id, timeout_s=timeout_s)

    async def cancel(self) -> JobState:
        """Cancel this job (see ``Client.cancel``)."""
        return await self.client.cancel(self.job_id)


class BlockingJobHandle:
    """``JobHandle``'s synchronous twin: the same attribute and methods, without ``await``."""

    def __init__(self, client: BlockingClient, job_id: str) -> None:
        self.client = client
        self.job_id = job_id

    def __repr__(self) -> str:
        return f"<BlockingJobHandle {self.job_id}>"

    def status(self) -> JobState:
        return self.client.job_state(self.job_id)

    def report(self, timeout_s: float | None = None) -> LoadReport:
        """Wait for the report: ReportTimeout after ``timeout_s``, JobNotFound if no such job."""
        return self.client.report(self.job_id, timeout_s=timeout_s)

    def cancel(self) -> JobState:
        """Cancel this job (see ``Client.cancel``)."""
        return self.client.cancel(self.job_id)


class Client:
    """Async client for producers."""

    def __init__(self, redis_url: str | None = None, *, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        url = redis_url or self.settings.redis_url
        if not url:
            raise RedisUnavailable("no Redis configured: pass a URL or set LOADWARDEN_REDIS_URL")
        self.redis_url = url
        self._pool: ArqRedis | None = None
        self._finish_watch: FinishWatch | None = None

    @property
    def queue_name(self) -> str:
        return self.settings.queue_name

    async def connect(self) -> Self:
        if self._pool is None:
            try:
                pool = redis_client(self.redis_url, self.settings.redis, redis_class=ArqRedis)
            except ValueError as exc:
                raise RedisUnavailable(f"bad Redis URL {self.redis_url!r}: {exc}") from None
            pool.job_serializer, pool.job_deserializer = wire.dumps, wire.loads
            pool.default_queue_name = self.queue_name
            try:
                await pool.ping()
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                await pool.aclose()
                raise RedisUnavailable(f"cannot reach Redis at {self.redis_url}: {exc}") from exc
            self._pool = pool
        return self

    async def close(self) -> None:
        if self._finish_watch is not None:
            await self._finish_watch.close()
            self._finish_watch = None
        if self._pool is not None:
            await self._pool.aclose()
            self._pool = None

    async def __aenter__(self) -> Self:
        return await self.connect()

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def redis(self) -> ArqRedis:
        """The connection pool (connecting first if needed)."""
        await self.connect()
        assert self._pool is not None
        return self._pool

    async def enqueue(self, request: LoadRequest, *, job_id: str | None = None) -> JobHandle:
        """Put a load on the queue and return its handle.

        Idempotent: the same request enqueued again while the first is queued or
        running returns the first job. A caller's ``job_id`` already in use
        returns that job too.
        """
        redis = await self.redis()
        if job_id is None:
            found, _ = await _guard(
                enqueue_once(
                    redis,
                    request,
                    function=FUNCTION_NAME,
                    queue_name=self.queue_name,
                    now_ms=now_ms(),
                    dedupe_ttl_s=self.settings.keep_result_s,
                )
            )
            await _guard(confirm_replicated(redis, self.settings.redis))
            return JobHandle(self, found)
        # Only the fields the caller set travel: the worker can then tell a request's own
        # retry policy from the defaults (request > worker > default).
        await _guard(
            self._enqueue_job(redis, job_id, request.model_dump(mode="json", exclude_unset=True))
        )
        await _guard(confirm_replicated(redis, self.settings.redis))
        return JobHandle(self, job_id)

    async def _enqueue_job(self, redis: ArqRedis, job_id: str, request: dict[str, Any]) -> None:
        """arq's enqueue, ridden through a dropped connection.

        arq enqueues under WATCH, which redis-py does not retry: a connection lost while
        watching surfaces as a WatchError, which arq may also read as "already enqueued"
        and return None. So until the job is seen in Redis it is enqueued again (a second
        enqueue of the same id is a no-op), for at most the ride-through.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.redis.ride_through_s
        while True:
            with contextlib.suppress(WatchError):
                job = await redis.enqueue_job(
                    FUNCTION_NAME, request=request, _job_id=job_id, _queue_name=self.queue_name
                )
                if job is not None:
                    async with redis.pipeline(transaction=False) as pipe:
                        wake_workers(pipe, self.queue_name)
                        await pipe.execute()
                    return
                if await self.job_state(job_id) is not JobState.NOT_FOUND:
                    return
            if loop.time() >= deadline:
                raise RedisConnectionError(f"job {job_id} could not be enqueued in time")
            await asyncio.sleep(0.1)

    async def cancel(self, job_id: str) -> JobState:
        """Cancel a job: a queued one never loads, a running one has its child killed at once.

        Returns the state the job was in *when the cancel was sent* (``QUEUED``,
        ``DEFERRED`` or ``RUNNING``), not its state afterwards: the job then ends
        with a ``cancelled`` report soon after. ``COMPLETE`` means it had already
        finished and nothing was sent; ``JobNotFound`` is raised if there is no
        such job.
        """
        redis = await self.redis()
        state = await self.job_state(job_id)
        if state is JobState.NOT_FOUND:
            raise JobNotFound(f"no job {job_id!r} is queued, running or finished")
        if state is JobState.COMPLETE:
            return state
        async with redis.pipeline(transaction=True) as pipe:
            pipe.set(CANCEL_KEY_PREFIX + job_id, "1", ex=self.settings.keep_result_s)
            pipe.publish(CANCEL_CHANNEL, job_id)
            if state is JobState.DEFERRED:  # waiting out a backoff: let it end now
                pipe.zadd(self.queue_name, {job_id: now_ms()}, xx=True)
                wake_workers(pipe, self.queue_name)
            await _guard(pipe.execute())
        return state

    async def dead_letters(self, count: int = 100) -> list[DeadLetter]:
        """The most recent jobs that failed for good, newest first."""
        redis = await self.redis()
        entries = await _guard(redis.xrevrange(DEAD_LETTER_STREAM, count=count))
        return [DeadLetter.from_entry(entry_id, fields) for entry_id, fields in entries]

    async def _dead_entries(
        self, redis: ArqRedis, refs: Sequence[str] | None
    ) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """Dead-letter entries named by their ids or by their jobs' ids (None: all of them).

        A job id is the natural thing to paste from ``report`` or ``show``; a dead-letter
        id looks like ``1732958512345-0``. Anything that names neither is JobNotFound.
        """
        everything = await _guard(redis.xrange(DEAD_LETTER_STREAM))
        if refs is None:
            return list(everything)
        found: list[tuple[bytes, dict[bytes, bytes]]] = []
        for ref in refs:
            hits = [
                (entry_id, fields)
                for entry_id, fields in everything
                if ref in (entry_id.decode(), fields.get(b"job_id", b"").decode())
            ]
            if not hits:
                raise JobNotFound(
                    f"no dead letter {ref!r}: give an id from 'dead list' (like "
                    "1732958512345-0) or the job id of a dead-lettered job"
                )
            found += [hit for hit in hits if hit not in found]
        return found

    async def retry_dead(self, ids: Sequence[str] | None = None) -> list[JobHandle]:
        """Enqueue dead-lettered jobs again (all of them when ``ids`` is None) and drop them.

        ``ids`` may name dead-letter ids or the job ids of dead-lettered jobs.
        """
        redis = await self.redis()
        handles = []
        for entry_id, fields in await self._dead_entries(redis, ids):
            letter = DeadLetter.from_entry(entry_id, fields)
            if letter.request is None:
                continue  # not a request at all (a planted payload): nothing to rerun
            handles.append(
                await self.enqueue(
                    letter.request, job_id=f"{letter.job_id}-r{uuid.uuid4().hex[:6]}"
                )
            )
            await _guard(redis.xdel(DEAD_LETTER_STREAM, letter.id))
        return handles

    async def purge_dead(
        self, ids: Sequence[str] | None = None, *, outcome: str | None = None
    ) -> int:
        """Drop dead letters: those named (by id or job id), or with ``outcome``, or all of them.

        Returns how many were dropped.
        """
        redis = await self.redis()
        if ids is None and outcome is None:
            count = await _guard(redis.xlen(DEAD_LETTER_STREAM))
            await _guard(redis.delete(DEAD_LETTER_STREAM))
            return int(count)
        chosen = [
            entry_id
            for entry_id, fields in await self._dead_entries(redis, ids)
            if outcome is None or fields.get(b"outcome", b"").decode() == outcome
        ]
        if chosen:
            await _guard(redis.xdel(DEAD_LETTER_STREAM, *chosen))
        return len(chosen)

    async def failing_models(self) -> list[FailingModel]:
        """Models the failure memory holds (refused ones first), with their failures."""
        return await _guard(failures.listing(await self.redis()))

    async def clear_failing(self, identities: Sequence[str] | None = None) -> int:
        """Forget failing models (by identity, as ``failing_models`` names them; None: all),
        so their next load runs; returns how many the memory held."""
        return await _guard(failures.forget(await self.redis(), identities))

    def job(self, job_id: str) -> JobHandle:
        return JobHandle(self, job_id)

    async def job_state(self, job_id: str) -> JobState:
        redis = await self.redis()
        job = Job(job_id, redis, _queue_name=self.queue_name, _deserializer=wire.loads)
        return _FROM_ARQ[await _guard(job.status())]

    async def stored_report(self, job_id: str) -> LoadReport | None:
        """The job's report if one is stored now (no waiting), else None."""
        redis = await self.redis()
        raw = await _guard(redis.get(result_key_prefix + job_id))
        if raw is None:
            return None
        document = wire.loads(raw)
        result = document.get("r")
        if not document.get("s") or not isinstance(result, dict) or "__error__" in result:
            detail = result.get("__error__") if isinstance(result, dict) else result
            raise ContractError(f"job {job_id} failed before it could be loaded: {detail}")
        try:
            return LoadReport.model_validate(result)
        except ValidationError as exc:
            raise ContractError(f"job {job_id} has a report that is not valid: {exc}") from None

    async def report(self, job_id: str, *, timeout_s: float | None = None) -> LoadReport:
        """The job's report, waiting for it up to ``timeout_s`` (None: wait as long as it takes).

        Woken by the worker's push when the report is stored (``FinishWatch``); reads it
        again every ``poll_s`` whatever happens.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        watch = await self.finish_watch()
        pushed = watch.watch([job_id])
        try:
            if timeout_s != 0:
                # Watched before the first read: a push after it wakes us, and so does the
                # subscription standing (to read again whatever came before it).
                watch.start()
            look = True  # whether the job still exists, checked unless a push woke us
            while True:
                pushed.clear()
                stored = await self.stored_report(job_id)
                if stored is not None:
                    # With wait_replicas, a report is handed out only once replicas hold it:
                    # one a failover could still take back might come again with another
                    # outcome.
                    await _guard(confirm_replicated(await self.redis(), self.settings.redis))
                    return stored
                # Not after a push (the report is there, or soon): it costs 3 round trips.
                gone = (look or not watch.live) and (
                    await self.job_state(job_id) is JobState.NOT_FOUND
                )
                if gone:
                    # The report may have landed between our two reads.
                    stored = await self.stored_report(job_id)
                    if stored is not None:
                        return stored
                    raise JobNotFound(f"no job {job_id!r} is queued, running or finished")
                pause = watch.poll_s
                if deadline is not None:
                    if loop.time() >= deadline:
                        state = await self.job_state(job_id)
                        raise ReportTimeout(
                            f"job {job_id} has no report yet (it is {state}; "
                            f"waited {timeout_s:g} s)"
                        )
                    pause = min(pause, deadline - loop.time())
                try:
                    async with asyncio.timeout(pause):
                        await pushed.wait()
                    look = False
                except TimeoutError:
                    look = True
        finally:
            watch.unwatch([job_id], pushed)

    async def finish_watch(self) -> FinishWatch:
        """This client's subscription to finished jobs (made on first use, closed with it)."""
        if self._finish_watch is None:
            self._finish_watch = FinishWatch(await self.redis(), self.settings.redis)
        return self._finish_watch

    async def preload(
        self,
        requests: Sequence[tuple[str, LoadRequest]] | Sequence[LoadRequest],
        *,
        on_progress: ProgressCallback | None = None,
        concurrency: int = 16,
        timeout_s: float | None = None,
        fail_fast: bool = False,
        force: bool = False,
    ) -> PreloadResult:
        """Run a batch (named requests or bare ones); see ``loadwarden.producer.preload``."""
        return await _guard(
            preload(
                self,
                requests,
                on_progress=on_progress,
                concurrency=concurrency,
                timeout_s=timeout_s,
                fail_fast=fail_fast,
                force=force,
            )
        )

    async def status(self) -> QueueStatus:
        """Ready, deferred and running jobs, dead letters, and the live workers' heartbeats."""
        redis = await self.redis()
        counts = await _guard(queue_counts(redis, self.queue_name))
        ids = await _guard(live_worker_ids(redis))
        workers = []
        for raw in await _guard(redis.mget([WORKER_KEY_PREFIX + i for i in ids])) if ids else []:
            if raw is None:
                continue  # lapsed between the two reads
            with contextlib.suppress(ValidationError):
                status = WorkerStatus.model_validate_json(raw)
                if status.queue == self.queue_name:
                    workers.append(status)
        workers.sort(key=lambda w: w.id)
        return QueueStatus(
            queue=self.queue_name,
            ready=int(counts["ready"]),
            deferred=int(counts["deferred"]),
            running=int(counts["running"]),
            dead_letters=int(counts["dead"]),
            workers=workers,
        )


class BlockingClient:
    """A synchronous facade over ``Client`` for code without an event loop (one loop of its own)."""

    def __init__(self, redis_url: str | None = None, *, settings: Settings | None = None) -> None:
        self._client = Client(redis_url, settings=settings)
        self._loop = asyncio.new_event_loop()

    def _run(self, factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
        return self._loop.run_until_complete(factory())

    def enqueue(self, request: LoadRequest, *, job_id: str | None = None) -> BlockingJobHandle:
        """Put a load on the queue and return its handle (see ``Client.enqueue``)."""
        handle = self._run(lambda: self._client.enqueue(request, job_id=job_id))
        return BlockingJobHandle(self, handle.job_id)

    def report(self, job_id: str, *, timeout_s: float | None = None) -> LoadReport:
        return self._run(lambda: self._client.report(job_id, timeout_s=timeout_s))

    def job_state(self, job_id: str) -> JobState:
        return self._run(lambda: self._client.job_state(job_id))

    def status(self) -> QueueStatus:
        return self._run(self._client.status)

    def cancel(self, job_id: str) -> JobState:
        return self._run(lambda: self._client.cancel(job_id))

    def failing_models(self) -> list[FailingModel]:
        return self._run(self._client.failing_models)

    def clear_failing(self, identities: Sequence[str] | None = None) -> int:
        return self._run(lambda: self._client.clear_failing(identities))

    def close(self) -> None:
        if not self._loop.is_closed():
            self._run(self._client.close)
            self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
