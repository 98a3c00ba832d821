"""arq's Worker, adapted so that whatever arq itself fails on still ends in a LoadReport.

arq (0.28) stores a failure of its own, which is no report, when a job's key has
expired, when the retry counter passes ``max_tries``, when the job function raises
(our function does not, but arq's own timeout around it can), and it lets an error
escape ``run_job`` (killing the worker's main loop) when a job's keys in Redis
hold the wrong type (``GET``/``INCR`` answering WRONGTYPE). Each of these ends
here with a report of a classified outcome, stored where the report goes and
dead-lettered. A Redis *connection* error still escapes: the runner reconnects and
the job waits for its lease.

Why a subclass and not a patch of arq: the hooks used (``run_job``,
``finish_job``, ``finish_failed_job``, the job serializer) are arq's own
extension points and the overrides call arq's code unchanged.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from arq.constants import (
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
    retry_key_prefix,
)
from arq.worker import Worker
from redis.exceptions import ResponseError

from loadwarden.producer import wire
from loadwarden.producer.errors import (
    ChildCrashed,
    InvalidModel,
    LoadError,
    LoadTimeout,
    describe,
)
from loadwarden.producer.keys import now_ms
from loadwarden.worker.job import TRANSIENT_REDIS_ERRORS, end_with_report

log = structlog.get_logger("loadwarden.worker")


def _error_for(exc: BaseException) -> LoadError:
    """The outcome of a job arq failed on its own."""
    text = describe(exc)
    if isinstance(exc, TimeoutError):
        return LoadTimeout(f"arq's own timeout around the job fired: {text}", code="job_timeout")
    if "max" in text and "retries exceeded" in text:
        return ChildCrashed(f"arq gave up on the job: {text}", code="attempts_exhausted")
    if "expired" in text:
        return InvalidModel(f"the job's payload is gone from Redis: {text}", code="job_expired")
    if isinstance(exc, ResponseError):
        return InvalidModel(
            f"the job's keys in Redis are not arq's (wrong type or value): {text}",
            code="bad_payload",
        )
    return ChildCrashed(f"arq failed the job: {text}", code="internal_error")


class LoadWorker(Worker):
    """An arq Worker whose every job ends with a LoadReport (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Job id -> (exception, job document) of results arq is about to store as failures.
        self._failures: dict[str, tuple[BaseException, dict[str, Any]]] = {}
        self.job_serializer = self._serialize
        self._next_marker_check = 0.0

    def _serialize(self, document: dict[str, Any]) -> bytes:
        # arq serializes a result just before it stores it: a failure is noted here so that
        # finish_job / finish_failed_job can store a report in its place.
        if document.get("s") is False and isinstance(document.get("r"), BaseException):
            self._failures[str(document.get("id"))] = (document["r"], document)
        return wire.dumps(document)

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        # Never a second run of a job this process runs now. arq's guard is the job's
        # in-progress marker in Redis, which a failover can lose (a replica promoted before
        # the marker reached it): the second run would then share the first's per-job state
        # (arq's job_tasks, our noted failures) and end it with a stray KeyError.
        running = {job_id for job_id, task in self.tasks.items() if not task.done()}
        job_ids = [j for j in job_ids if j.decode() not in running]
        loop = asyncio.get_running_loop()
        if job_ids and loop.time() >= self._next_marker_check:
            self._next_marker_check = loop.time() + self.in_progress_timeout_s / 3
            await self._lease_stray_markers(job_ids)
        await super().start_jobs(job_ids)

    async def _lease_stray_markers(self, job_ids: list[bytes]) -> None:
        """Give an in-progress marker without expiry one lease to live.

        arq writes its marker with PSETEX and our lease rewrites it with SET PX, so a
        marker that never expires was written by someone else, and would hold its job
        out of every worker's reach forever: it now lapses within a lease like any other.
        """
        keys = [in_progress_key_prefix + j.decode() for j in job_ids]
        async with self.pool.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.pttl(key)
            ttls = await pipe.execute()
        stray = [key for key, ttl in zip(keys, ttls, strict=True) if ttl == -1]
        if stray:
            log.warning("stray_in_progress_markers", keys=stray)
            async with self.pool.pipeline(transaction=False) as pipe:
                for key in stray:
                    pipe.pexpire(key, int(self.in_progress_timeout_s * 1000))
                await pipe.execute()

    async def run_job(self, job_id: str, score: int) -> None:
        try:
            await super().run_job(job_id, score)
        except TRANSIENT_REDIS_ERRORS:
            raise
        except Exception as exc:
            log.error("job_failed_in_arq", job_id=job_id, error=describe(exc))
            report = await self._report(job_id, exc, None)
            await self._store(job_id, report)
        finally:
            self._failures.pop(job_id, None)

    async def finish_job(
        self,
        job_id: str,
        finish: bool,
        result_data: bytes | None,
        *args: Any,
    ) -> None:
        noted = self._failures.pop(job_id, None)
        if finish and noted is not None:
            result_data = await self._report(job_id, *noted)
        await super().finish_job(job_id, finish, result_data, *args)

    async def finish_failed_job(self, job_id: str, result_data: bytes | None) -> None:
        noted = self._failures.pop(job_id, None)
        if noted is not None:
            result_data = await self._report(job_id, *noted)
        await super().finish_failed_job(job_id, result_data)

    async def _report(
        self, job_id: str, exc: BaseException, document: dict[str, Any] | None
    ) -> bytes:
        """A stored result holding a report of what arq failed on (dead-lettered too)."""
        kwargs = document.get("k") if document else None
        request = kwargs.get("request") if isinstance(kwargs, dict) else None
        ctx = {**self.ctx, "job_id": job_id}
        report = await end_with_report(ctx, job_id, request, _error_for(exc))
        now = now_ms()
        return wire.dumps(
            {
                "t": 1,
                "f": "load",
                "a": [],
                "k": {},
                "et": 0,
                **(document or {}),
                "s": True,
                "r": report.model_dump(mode="json"),
                "st": now if document is None else document.get("st", now),
                "ft": now,
                "q": self.queue_name,
                "id": job_id,
            }
        )

    async def _store(self, job_id: str, result: bytes) -> None:
        """End a job arq could not: its report stored, its keys removed, out of the queue."""
        async with self.pool.pipeline(transaction=True) as tr:
            tr.delete(
                retry_key_prefix + job_id,
                in_progress_key_prefix + job_id,
                job_key_prefix + job_id,
            )
            tr.set(result_key_prefix + job_id, result, px=int(self.keep_result_s * 1000))
            tr.zrem(self.queue_name, job_id)
            await tr.execute()
