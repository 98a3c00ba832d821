"""arq's Worker, waiting for work instead of polling (``LoadWorker``'s base).

arq's loop sleeps ``poll_delay`` between two looks at the queue; ours looks again as
soon as an enqueue pushes a token on the queue's wake list (BLPOP), or a running job
ends while all slots are full, and ``poll_delay`` becomes the longest wait (a fallback
for jobs enqueued without a token). The look after a BLPOP costs no round trip of its
own: the queue's first page is read behind the BLPOP, in its round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from arq.worker import Worker

from loadwarden.producer.keys import now_ms, wake_key
from loadwarden.worker.sandbox.children import SandboxError
from loadwarden.worker.sandbox.forkserver import ForkServer

#: The shortest wait worth a BLPOP (Redis counts its timeout in milliseconds).
BLPOP_MIN_S = 0.001


class WaitingWorker(Worker):
    """An arq Worker that waits for work (see the module docstring), and claims none while
    its fork server is being started again (``_restarting``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        supervisor = self.ctx.get("supervisor")
        self._forkserver: ForkServer | None = supervisor.forkserver if supervisor else None
        # arq sleeps poll_delay_s between two looks at the queue; we wait in _poll_iteration
        # instead, woken by an enqueue or a freed slot, and look at most this long apart.
        self.fallback_poll_s = self.poll_delay_s
        self.poll_delay_s = 0.0
        self._wake_key = wake_key(self.queue_name)
        self._slot_freed = asyncio.Event()
        #: Whether the last look filled a page of ids and started one of them: then more
        #: may wait behind it, and the next look comes at once (set by ``start_jobs``).
        self._more = False
        #: The queue's first page, read with the last wait's BLPOP, for the next look.
        self._fetched: list[bytes] | None = None

    def _release_sem_dec_counter_on_complete(self) -> None:
        super()._release_sem_dec_counter_on_complete()
        self._slot_freed.set()

    async def _poll_iteration(self) -> None:
        self._slot_freed.clear()  # before the look: a job ending during it ends the wait too
        self._more = False
        fetched, self._fetched = self._fetched, None
        if fetched is None:
            await super()._poll_iteration()
        else:
            await self._poll_fetched(fetched)
        await self._wait_for_work()

    async def _poll_fetched(self, job_ids: list[bytes]) -> None:
        """arq's ``_poll_iteration`` (0.28, not in burst) line for line, with the queue's
        page read in the wait's round trip (``_wait_for_work``) instead of one of its own."""
        if self.allow_pick_jobs and self.job_counter < self.max_jobs:
            await self.start_jobs(job_ids)
        if self.allow_abort_jobs:
            await self._cancel_aborted_jobs()
        for job_id, t in list(self.tasks.items()):
            if t.done():
                del self.tasks[job_id]
                t.result()  # required to make sure errors in run_job get propagated
        await self.heart_beat()

    async def _wait_for_work(self) -> None:
        """Wait until the queue may hold a job for us, at most ``fallback_poll_s``.

        Full: until a running job ends. A full page of ids fetched, one of them started
        here: not at all (more may be ready). Else on the queue's wake list (BLPOP: an
        enqueue, or a job's re-queue for a retry, pushes one token, which wakes one idle
        worker), no longer than until the next deferred job (a retry's backoff) is due. The
        fallback picks up jobs enqueued without a token (arq's own ``enqueue_job``, a
        producer in another language).
        """
        fallback = self.fallback_poll_s
        if self.burst or not self.allow_pick_jobs:
            await asyncio.sleep(fallback)
            return
        if (forkserver := self._restarting()) is not None:  # no claim until it runs again
            with contextlib.suppress(TimeoutError, SandboxError):  # (a failed start: again)
                async with asyncio.timeout(fallback):
                    await forkserver.running()
            return
        if self.job_counter >= self.max_jobs:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(fallback):
                    await self._slot_freed.wait()
            return
        if self._more:
            return
        now = now_ms()
        due = await self.pool.zrangebyscore(
            self.queue_name, min=f"({now}", max="+inf", start=0, num=1, withscores=True
        )
        wait_s = min(fallback, (due[0][1] - now) / 1000) if due else fallback
        if wait_s >= BLPOP_MIN_S:  # BLPOP's 0 would block for ever
            # The queue's first page is read in the same round trip: Redis runs the command
            # queued behind BLPOP as soon as BLPOP returns. The next look takes the ids due
            # by then (arq's own look reads up to now): it needs no round trip of its own.
            async with self.pool.pipeline(transaction=False) as pipe:
                # Fractional seconds (Redis >= 6), which redis-py's typed blpop() does not take.
                pipe.execute_command("BLPOP", self._wake_key, f"{wait_s:.3f}")
                pipe.zrangebyscore(
                    self.queue_name,
                    min="-inf",
                    max="+inf",
                    start=self._queue_read_offset,
                    num=self.queue_read_limit,
                    withscores=True,
                )
                _, page = await pipe.execute()
            now = now_ms()
            self._fetched = [job_id for job_id, score in page if score <= now]

    def _restarting(self) -> ForkServer | None:
        """The fork server, while a lost one is being started again: a job claimed then would
        only wait for it (``ChildHost.sandbox_back``), when another worker may run it now."""
        forkserver = self._forkserver
        down = forkserver is not None and forkserver.restarting and not forkserver.alive
        return forkserver if down else None
