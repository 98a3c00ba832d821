"""arq's Worker, adapted so that whatever arq itself fails on still ends in a LoadReport.

arq (0.28) stores a failure of its own, which is no report, when a job's key has
expired, when the retry counter passes ``max_tries``, when the job function raises
(our function does not, but arq's own timeout around it can), and it lets an error
escape ``run_job`` (killing the worker's main loop) when a job's keys in Redis
hold the wrong type (``GET``/``INCR`` answering WRONGTYPE). Each of these ends
here with a report of a classified outcome, stored where the report goes and
dead-lettered. A Redis *connection* error still escapes: the runner reconnects and
the job waits for its lease.

It waits for work instead of polling (``_waiting.WaitingWorker``, its base).

Why a subclass and not a patch of arq: the hooks used (``run_job``, ``finish_job``,
``finish_failed_job``, the job serializer, ``start_jobs``, ``pool``, and in the base
``_poll_iteration`` and the slot release) are arq's methods, and the overrides call arq's
code unchanged, except copies made to save round trips (``start_jobs``' claim, now one
script that also makes the run's first reads, ``_claim``; ``finish_job``, with the
finished push in its transaction, and a job left queued for a retry pushing a wake token
there, as an enqueue does; the base's look at the queue, read with its wait),
which keep arq's logic line for line (arq 0.28 is pinned).
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from arq.connections import ArqRedis
from arq.constants import (
    abort_jobs_ss,
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
    retry_key_prefix,
)
from arq.utils import to_ms
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError, ResponseError

from loadwarden.producer import wire
from loadwarden.producer.errors import LoadError, describe
from loadwarden.producer.finished import push_message
from loadwarden.producer.keys import (
    FINISHED_CHANNEL,
    FINISHED_REPORTS_CHANNEL,
    now_ms,
    wake_workers,
)
from loadwarden.worker.load._outcome import Early, failure
from loadwarden.worker.queue._claim import answered, claim
from loadwarden.worker.queue._waiting import WaitingWorker
from loadwarden.worker.queue.job import (
    FINISH_WITH_RESULT,
    TRANSIENT_REDIS_ERRORS,
    end_with_report,
)
from loadwarden.worker.queue.jobs import Finish, JobBook

log = structlog.get_logger("loadwarden.worker")


def _error_for(exc: BaseException) -> LoadError:
    """The outcome of a job arq failed on its own."""
    text = describe(exc)
    if isinstance(exc, TimeoutError):
        return failure(Early.JOB_TIMEOUT, f"arq's own timeout around the job fired: {text}")
    if "max" in text and "retries exceeded" in text:
        return failure(Early.ATTEMPTS_EXHAUSTED, f"arq gave up on the job: {text}")
    if "expired" in text:
        return failure(Early.JOB_EXPIRED, f"the job's payload is gone from Redis: {text}")
    if isinstance(exc, ResponseError):
        return failure(
            Early.BAD_PAYLOAD,
            f"the job's keys in Redis are not arq's (wrong type or value): {text}",
        )
    return failure(Early.INTERNAL_ERROR, f"arq failed the job: {text}")


class LoadWorker(WaitingWorker):
    """An arq Worker whose every job ends with a LoadReport (see the module docstring).

    Built and driven only by ``arq_adapter``: nothing else knows arq's Worker.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Job id -> (exception, job document) of results arq is about to store as failures.
        self._failures: dict[str, tuple[BaseException, dict[str, Any]]] = {}
        # The job function leaves a finished job's bookkeeping to finish_job's transaction.
        self._book: JobBook | None = self.ctx.get("book")
        if self._book is not None:
            self.ctx[FINISH_WITH_RESULT] = True
        self.job_serializer = self._serialize
        self._next_marker_check = 0.0

    def _serialize(self, document: dict[str, Any]) -> bytes:
        # arq serializes a result just before it stores it: a failure is noted here so that
        # finish_job / finish_failed_job can store a report in its place.
        if document.get("s") is False and isinstance(document.get("r"), BaseException):
            self._failures[str(document.get("id"))] = (document["r"], document)
        return wire.dumps(document)

    @property
    def pool(self) -> ArqRedis:  # in a run's task, its first read is answered by its claim
        return answered(super().pool)  # type: ignore[no-any-return]

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        if self._restarting() is not None:  # left queued (``_restarting``)
            return
        # Never a second run of a job this process runs now. arq's guard is the job's
        # in-progress marker in Redis, which a failover can lose (a replica promoted before
        # the marker reached it): the second run would then share the first's per-job state
        # (arq's job_tasks, our noted failures) and end it with a stray KeyError.
        fetched = len(job_ids)
        running = {job_id for job_id, task in self.tasks.items() if not task.done()}
        job_ids = [j for j in job_ids if j.decode() not in running]
        loop = asyncio.get_running_loop()
        if job_ids and loop.time() >= self._next_marker_check:
            self._next_marker_check = loop.time() + self.in_progress_timeout_s / 3
            await self._lease_stray_markers(job_ids)
        before = set(self.tasks)
        await self._claim_and_start(job_ids)
        self._more = fetched >= self.queue_read_limit and bool(set(self.tasks) - before)

    async def _claim_and_start(self, job_ids: list[bytes]) -> None:
        """arq's ``start_jobs`` with its claim in one round trip instead of four (``claim``).

        The slot accounting (semaphore, counter, task, release on completion) is arq's,
        line for line, and so is its handling of a claim Redis answers with an error: the
        slot back, on to the next job (it stays queued; nothing of the claim was written).
        """
        marker_ms = int(self.in_progress_timeout_s * 1000)
        for job_id_b in job_ids:
            await self.sem.acquire()
            if self.job_counter >= self.max_jobs:
                self.sem.release()
                return
            self.job_counter += 1
            job_id = job_id_b.decode()
            # Follow the job's cancels before its flag is read with the claim: a cancel
            # published after that read still reaches the run (JobBook.begin).
            if self._book is not None:
                self._book.cancel_event(job_id)
            try:
                claimed = await claim(self.pool, self.queue_name, job_id, marker_ms)
            except ResponseError as exc:
                log.warning("job_claim_failed", job_id=job_id, error=describe(exc))
                claimed = None
            except BaseException:  # a lost connection, a cancel: no run, so no listener
                if self._book is not None:
                    self._book.forget(job_id)
                raise
            if claimed is None:  # running elsewhere, finished, deferred again, or refused
                if self._book is not None:
                    self._book.forget(job_id)
                self.job_counter -= 1
                self.sem.release()
                continue
            if self._book is not None and claimed.first_look is not None:
                self._book.begun(job_id, *claimed.first_look)
            task = claimed.start(self.run_job(job_id, claimed.score))  # its first read
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job_id] = task

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
            if self._book is not None:  # a bookkeeping that never reached finish_job
                self._book.take_finish(job_id)
                self._book.forget(job_id)  # a run that ended before its load

    async def finish_job(
        self,
        job_id: str,
        finish: bool,
        result_data: bytes | None,
        result_timeout_s: float | None,
        keep_result_forever: bool,
        incr_score: int | None,
        keep_in_progress: float | None,
    ) -> None:
        noted = self._failures.pop(job_id, None)
        if finish and noted is not None:
            result_data = await self._report(job_id, *noted)
        left = self._book.take_finish(job_id) if self._book is not None else None
        # arq's finish_job (0.28) line for line, with the pushes to waiting clients and the
        # job's own bookkeeping (JobBook.finish) in the same transaction (the pushes delivered
        # once it commits: after the result is stored), not round trips of their own.
        async with self.pool.pipeline(transaction=True) as tr:
            delete_keys = []
            in_progress_key = in_progress_key_prefix + job_id
            if keep_in_progress is None:
                delete_keys += [in_progress_key]
            else:
                tr.pexpire(in_progress_key, to_ms(keep_in_progress))
            if finish:
                if result_data:
                    expire = None if keep_result_forever else result_timeout_s
                    tr.set(result_key_prefix + job_id, result_data, px=to_ms(expire))
                delete_keys += [retry_key_prefix + job_id, job_key_prefix + job_id]
                tr.zrem(abort_jobs_ss, job_id)
                tr.zrem(self.queue_name, job_id)
                self._push(tr, job_id, result_data)
            elif incr_score:
                tr.zincrby(self.queue_name, incr_score, job_id)
            if delete_keys:
                tr.delete(*delete_keys)
            arqs = len(tr.command_stack)
            self._queue_ours(tr, job_id, finish, left)
            results = await tr.execute(raise_on_error=False)
        # A transaction is not rolled back: a command that failed (a key of ours holding the
        # wrong type) failed alone. arq's own raise as they would have; ours are logged (the
        # report is stored), as JobBook.finish's own failures were.
        for result in results[:arqs]:
            if isinstance(result, Exception):
                raise result
        for result in results[arqs:]:
            if isinstance(result, Exception):
                log.error("job_bookkeeping_failed", job_id=job_id, error=describe(result))
                break

    def _queue_ours(self, tr: Pipeline, job_id: str, finish: bool, left: Finish | None) -> None:
        """Queue our commands after arq's in ``tr``. A job left queued for another run (a
        retry, maybe deferred): a wake token, so that an idle worker, blocked for a wait
        computed before, looks again and waits until it is due. A finished one: its own
        bookkeeping; if building it fails (in Python, before anything is sent), drop what it
        queued and log it: ours must never cost the stored report."""
        if not finish:
            wake_workers(tr, self.queue_name)
            return
        if self._book is None or left is None:
            return
        arqs = len(tr.command_stack)
        request, report, busy_s = left
        try:
            self._book.finish_on(tr, job_id, request, report, busy_s=busy_s)
        except Exception as exc:
            del tr.command_stack[arqs:]
            log.error("job_bookkeeping_failed", job_id=job_id, error=describe(exc))

    async def finish_failed_job(self, job_id: str, result_data: bytes | None) -> None:
        noted = self._failures.pop(job_id, None)
        if noted is not None:
            result_data = await self._report(job_id, *noted)
        await super().finish_failed_job(job_id, result_data)
        await self._announce(job_id, result_data)

    @staticmethod
    def _push(pipe: Any, job_id: str, result: bytes | None) -> None:
        """Queue on ``pipe`` the pushes of a stored result: its id for anyone, the result
        itself for our clients (``loadwarden.producer.finished``)."""
        pipe.publish(FINISHED_CHANNEL, job_id)
        pipe.publish(FINISHED_REPORTS_CHANNEL, push_message(job_id, result))

    async def _announce(self, job_id: str, result: bytes | None) -> None:
        """Tell waiting clients the job's result is stored (loadwarden.producer.finished).

        After the store, never before: a client woken by this reads the result at once.
        Best effort: a push that does not go out costs a waiter latency (it polls), and
        failing here would leave arq's bookkeeping of a finished job half done.
        """
        try:
            async with self.pool.pipeline(transaction=False) as pipe:
                self._push(pipe, job_id, result)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("finish_announce_failed", job_id=job_id, error=describe(exc))

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
            self._push(tr, job_id, result)
            await tr.execute()
