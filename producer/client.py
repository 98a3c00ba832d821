"""The producer's client: enqueue loads, wait for their reports, look at the queue.

``Client`` is async; ``BlockingClient`` is a small synchronous facade for
backends without an event loop. Both speak only JSON to Redis. What a client
reads lives beside it: reports (``_reports``), the queue's status (``_status``),
dead letters (``_dead_letters``), and the job handles (``_handles``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

from arq.connections import ArqRedis
from arq.jobs import Job
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from loadwarden.producer import _dead_letters, _reports, _status, failures, wire
from loadwarden.producer import preload as _preload
from loadwarden.producer._blocking import blocking
from loadwarden.producer._dead_letters import DeadLetter
from loadwarden.producer._guard import guard
from loadwarden.producer._handles import FROM_ARQ, BlockingJobHandle, JobHandle, JobState
from loadwarden.producer._status import QueueStatus
from loadwarden.producer.connection import confirm_replicated, redis_client
from loadwarden.producer.contract import FailingModel, LoadRequest
from loadwarden.producer.dedupe import enqueue_as, enqueue_once
from loadwarden.producer.errors import JobNotFound, RedisUnavailable
from loadwarden.producer.finished import FinishWatch
from loadwarden.producer.keys import (
    CANCEL_CHANNEL,
    CANCEL_KEY_PREFIX,
    FUNCTION_NAME,
    now_ms,
    wake_workers,
)
from loadwarden.producer.settings import Settings

__all__ = [
    "BlockingClient",
    "BlockingJobHandle",
    "Client",
    "DeadLetter",
    "JobHandle",
    "JobState",
    "QueueStatus",
]

T = TypeVar("T")


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
        await self.stop_watching()
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
            found, _ = await guard(
                enqueue_once(
                    redis,
                    request,
                    function=FUNCTION_NAME,
                    queue_name=self.queue_name,
                    now_ms=now_ms(),
                    dedupe_ttl_s=self.settings.keep_result_s,
                )
            )
            await guard(confirm_replicated(redis, self.settings.redis))
            return JobHandle(self, found)
        # One script (arq's check and write, and the wake push): a second run after a lost
        # answer finds the first's job, and an id already in use returns that job.
        await guard(
            enqueue_as(
                redis,
                request,
                job_id,
                function=FUNCTION_NAME,
                queue_name=self.queue_name,
                now_ms=now_ms(),
            )
        )
        await guard(confirm_replicated(redis, self.settings.redis))
        return JobHandle(self, job_id)

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
            await guard(pipe.execute())
        return state

    # Each of these is written once, in the module of its concept, and is a method here:
    # the first argument of each function is the client.
    dead_letters = _dead_letters.dead_letters
    retry_dead = _dead_letters.retry_dead
    purge_dead = _dead_letters.purge_dead
    stored_report = _reports.stored_report
    report = _reports.report
    status = _status.status
    preload = _preload.preload

    async def failing_models(self) -> list[FailingModel]:
        """Models the failure memory holds (refused ones first), with their failures."""
        return await guard(failures.listing(await self.redis()))

    async def clear_failing(self, identities: Sequence[str] | None = None) -> int:
        """Forget failing models (by identity, as ``failing_models`` names them; None: all),
        so their next load runs; returns how many the memory held."""
        return await guard(failures.forget(await self.redis(), identities))

    def job(self, job_id: str) -> JobHandle:
        return JobHandle(self, job_id)

    async def job_state(self, job_id: str) -> JobState:
        redis = await self.redis()
        job = Job(job_id, redis, _queue_name=self.queue_name, _deserializer=wire.loads)
        return FROM_ARQ[await guard(job.status())]

    async def stop_watching(self) -> None:
        """Close the subscription to finished jobs; the next wait subscribes again."""
        if self._finish_watch is not None:
            await self._finish_watch.close()

    async def finish_watch(self) -> FinishWatch:
        """This client's subscription to finished jobs (made on first use, closed with it)."""
        if self._finish_watch is None:
            self._finish_watch = FinishWatch(await self.redis(), self.settings.redis)
        return self._finish_watch


class BlockingClient:
    """A synchronous facade over ``Client`` for code without an event loop (one loop of its own)."""

    def __init__(self, redis_url: str | None = None, *, settings: Settings | None = None) -> None:
        self._client = Client(redis_url, settings=settings)
        self._loop = asyncio.new_event_loop()

    def _run(self, factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
        try:
            return self._loop.run_until_complete(factory())
        finally:
            # Between two calls this loop does not run and nothing reads the subscription:
            # every job finished in the fleet would pile up in Redis's output buffer for
            # it (up to 16 KiB a push) until Redis dropped the connection. So it is open
            # only during a call; the next wait subscribes again (one round trip, which
            # its first read of the report does not wait for).
            if not self._loop.is_closed():
                self._loop.run_until_complete(self._client.stop_watching())

    @property
    def _async_twin(self) -> Client:
        return self._client

    def enqueue(self, request: LoadRequest, *, job_id: str | None = None) -> BlockingJobHandle:
        """Put a load on the queue and return its handle (see ``Client.enqueue``)."""
        handle = self._run(lambda: self._client.enqueue(request, job_id=job_id))
        return BlockingJobHandle(self, handle.job_id)

    report = blocking(Client.report)
    job_state = blocking(Client.job_state)
    status = blocking(Client.status)
    cancel = blocking(Client.cancel)
    failing_models = blocking(Client.failing_models)
    clear_failing = blocking(Client.clear_failing)

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
