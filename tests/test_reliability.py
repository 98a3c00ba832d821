"""When things break: dead workers, a restarted Redis, cancels, retries, dead letters, repeats."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from loadwarden.producer.client import Client, JobState
from loadwarden.producer.contract import LimitOverrides, LoadRequest, Outcome, RetryPolicy
from loadwarden.worker._keys import ATTEMPTS_KEY_PREFIX
from loadwarden.worker.config import Settings
from loadwarden.worker.queue._redis_server import RedisServer
from loadwarden.worker.queue.runner import WorkerRunner
from tests.conftest import (
    StartWorker,
    call_until,
    eventually,
    running_worker,
    sandbox_processes,
)

#: Workers of these tests renew a 2 s lease twice a second, so reruns come fast.
FAST_LEASE = {"concurrency": 4, "lease_s": 2, "lease_renew_s": 0.5}


async def _reports(client: Client, job_ids: list[str], timeout_s: float) -> dict[str, object]:
    reports = await asyncio.gather(*(client.report(j, timeout_s=timeout_s) for j in job_ids))
    return dict(zip(job_ids, reports, strict=True))


async def test_sigkill_mid_batch_loses_nothing(
    start_worker: StartWorker, redis_url: str, small_model: Path
) -> None:
    """kill -9 of a worker mid-batch: every job gets one report, reruns come within lease + 5 s."""
    doomed = start_worker(redis_url, "slow", **FAST_LEASE)
    start_worker(redis_url, "slow", **FAST_LEASE)
    async with Client(redis_url) as client:
        handles = [
            await client.enqueue(LoadRequest(source=str(small_model), labels={"n": str(i)}))
            for i in range(50)
        ]
        job_ids = [h.job_id for h in handles]

        redis = await client.redis()

        async def doomed_is_busy() -> list[str]:
            """Jobs whose current attempt belongs to the doomed worker (its attempt placeholder)."""
            status = await client.status()
            ids = {w.id for w in status.workers if w.pid == doomed.pid}
            raws = await redis.mget([ATTEMPTS_KEY_PREFIX + j for j in job_ids])
            return [
                j
                for j, raw in zip(job_ids, raws, strict=True)
                if raw
                and json.loads(raw)[-1]["worker"] in ids
                and json.loads(raw)[-1]["error_code"] == "worker_lost"
            ]

        orphaned = await eventually(doomed_is_busy, 30, "the doomed worker took a job")
        doomed.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        doomed.wait(10)
        # Its fork server and children die with it (PR_SET_PDEATHSIG), not left loading.
        call_until(lambda: not sandbox_processes(doomed.pid), 5)

        async def rerun_started(job_id: str) -> bool:
            """A second attempt has begun (another worker's placeholder) or the job ended."""
            raw = await redis.get(ATTEMPTS_KEY_PREFIX + job_id)
            return raw is None or len(json.loads(raw)) >= 2

        async def all_rerun() -> bool:
            return all([await rerun_started(j) for j in orphaned])

        await eventually(all_rerun, FAST_LEASE["lease_s"] + 5, "orphans rerun within lease + 5 s")
        rerun_within = time.monotonic() - killed_at
        orphan_reports = await _reports(client, orphaned, timeout_s=30)
        reports = await _reports(client, job_ids, timeout_s=60)
    assert rerun_within < FAST_LEASE["lease_s"] + 5
    assert all(r.outcome is Outcome.OK for r in reports.values())  # type: ignore[attr-defined]
    for job_id in orphaned:
        attempts = orphan_reports[job_id].attempts  # type: ignore[attr-defined]
        assert [a.error_code for a in attempts[:-1]] == ["worker_lost"]
        assert sum(a.outcome is Outcome.OK for a in attempts) == 1


async def test_redis_restart_mid_batch(
    start_worker: StartWorker, small_model: Path, tmp_path: Path
) -> None:
    """Redis (AOF on) stopped and started during a batch: every job still ends with a report
    (a job whose bookkeeping meets the dead connection is retried, never stored as a failure)."""
    server = RedisServer(appendonly=True, data_dir=tmp_path / "redis").start()
    try:
        start_worker(server.url, "slow", **FAST_LEASE)
        async with Client(server.url) as client:
            job_ids = [
                (
                    await client.enqueue(LoadRequest(source=str(small_model), labels={"n": str(i)}))
                ).job_id
                for i in range(20)
            ]
            await client.report(job_ids[0], timeout_s=30)  # the batch is under way

            async def loads_running() -> bool:
                return (await client.status()).running >= 2

            # Loads in flight when Redis goes: they finish on connections that are gone.
            await eventually(loads_running, 30, "loads running at the restart")
        server.stop()
        server.start()
        async with Client(server.url) as client:
            reports = await _reports(client, job_ids, timeout_s=90)
        assert all(r.outcome is Outcome.OK for r in reports.values())  # type: ignore[attr-defined]
    finally:
        server.close()


@pytest.fixture
async def hanging_worker(settings: Settings) -> AsyncIterator[WorkerRunner]:
    async with running_worker(settings, loaders={"safetensors": "hang"}) as runner:
        yield runner


async def test_cancel_a_queued_job(settings: Settings, small_model: Path) -> None:
    """A job cancelled while queued never loads: no child starts, its report says cancelled."""
    async with Client(settings=settings) as client:
        handle = await client.enqueue(LoadRequest(source=str(small_model)))
        assert await handle.cancel() is JobState.QUEUED
        runner = WorkerRunner(settings, handle_signals=False)
        task = asyncio.create_task(runner.run())
        try:
            report = await handle.report(timeout_s=30)
        finally:
            runner.stop()
            runner.stop()
            await asyncio.wait_for(task, 30)
    assert report.outcome is Outcome.CANCELLED
    assert runner.supervisor.forkserver.spawned == 0
    assert await _no_dead_letters(settings)


async def _no_dead_letters(settings: Settings) -> bool:
    async with Client(settings=settings) as client:
        return await client.dead_letters() == []


async def test_cancel_a_running_job(
    hanging_worker: WorkerRunner, settings: Settings, small_model: Path
) -> None:
    """A running job's child is killed at once and the job ends cancelled (not timeout)."""
    async with Client(settings=settings) as client:
        handle = await client.enqueue(LoadRequest(source=str(small_model)))
        await eventually(lambda: hanging_worker.supervisor.forkserver.spawned, 30, "child loading")
        assert await handle.cancel() is JobState.RUNNING
        loop = asyncio.get_running_loop()
        started = loop.time()
        report = await handle.report(timeout_s=10)
    assert report.outcome is Outcome.CANCELLED
    assert report.error is not None and report.error.type == "LoadCancelled"
    assert loop.time() - started < 2
    assert report.resources is not None  # a child ran, and was stopped


async def test_retries_then_dead_letter(
    hanging_worker: WorkerRunner, settings: Settings, small_model: Path
) -> None:
    """A timeout is retried with backoff up to max_attempts; then the job is dead-lettered."""
    request = LoadRequest(
        source=str(small_model),
        limits=LimitOverrides(timeout_seconds=0.3),
        retry=RetryPolicy(max_attempts=3, base_s=0.05, max_s=0.1),
    )
    async with Client(settings=settings) as client:
        report = await (await client.enqueue(request)).report(timeout_s=30)
        dead = await client.dead_letters()
        assert [d.job_id for d in dead] == [report.job_id]
        retried = await client.retry_dead([dead[0].id])
        assert len(retried) == 1 and await client.dead_letters() == []
        assert await client.purge_dead() == 0
    assert report.outcome is Outcome.TIMEOUT
    assert [a.number for a in report.attempts] == [1, 2, 3]
    assert all(a.outcome is Outcome.TIMEOUT for a in report.attempts)
    assert [a.delay_s is not None for a in report.attempts] == [True, True, False]
    assert all(0 <= (a.delay_s or 0) <= 0.1 for a in report.attempts)


async def test_same_request_twice_is_one_job(settings: Settings, small_model: Path) -> None:
    """Enqueueing a request that is already queued returns its job; a caller may name the id."""
    async with Client(settings=settings) as client:
        request = LoadRequest(source=str(small_model))
        first = await client.enqueue(request)
        second = await client.enqueue(request)
        other = await client.enqueue(request.model_copy(update={"labels": {"x": "y"}}))
        named = await client.enqueue(request, job_id="my-own-id")
        status = await client.status()
    assert first.job_id == second.job_id != other.job_id
    assert named.job_id == "my-own-id"
    assert (status.ready, status.deferred, status.running, status.dead_letters) == (3, 0, 0, 0)


def test_status_lists_live_workers(start_worker: StartWorker, redis_url: str) -> None:
    """`loadwarden status --json` shows each live worker's heartbeat with its budget."""
    worker = start_worker(redis_url, concurrency=4)
    out = subprocess.run(
        [str(Path(sys.executable).parent / "loadwarden"), "status", "--json", "--redis", redis_url],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    status = json.loads(out.stdout)
    [me] = [w for w in status["workers"] if w["pid"] == worker.pid]
    assert me["memory_budget_bytes"] > 0 and me["concurrency"] == 4
    assert os.getpid() != me["pid"]


async def test_in_progress_marker_lasts_one_lease(
    hanging_worker: WorkerRunner, settings: Settings, small_model: Path
) -> None:
    """A running job's marker expires within one lease (not arq's hour), so a dead worker's
    job runs again soon even if it died before its first renewal."""
    from arq.constants import in_progress_key_prefix

    async with Client(settings=settings) as client:
        handle = await client.enqueue(LoadRequest(source=str(small_model)))
        await eventually(lambda: hanging_worker.supervisor.forkserver.spawned, 30, "child loading")
        redis = await client.redis()
        ttl_ms = await redis.pttl(in_progress_key_prefix + handle.job_id)
        await handle.cancel()
    assert 0 < ttl_ms <= settings.lease_s * 1000


async def test_a_lost_in_progress_marker_does_not_start_a_job_twice(
    redis_url: str, small_model: Path, tmp_path: Path
) -> None:
    """A running job whose in-progress marker vanished (a failover that lost it) is not
    started a second time by the worker that runs it (it once ended in a stray KeyError),
    and its lease writes the marker back."""
    from arq.constants import in_progress_key_prefix

    # Renewals 2 s apart: the worker polls (every 20 ms) long before the lease writes back.
    settings = Settings(redis_url=redis_url, concurrency=3, lease_s=6, lease_renew_s=2)
    other = tmp_path / "other.safetensors"
    shutil.copyfile(small_model, other)
    async with (
        running_worker(settings, loaders={"safetensors": "hang"}) as worker,
        Client(settings=settings) as client,
    ):
        first = await client.enqueue(LoadRequest(source=str(small_model)))
        await eventually(lambda: worker.supervisor.forkserver.spawned == 1, 30, "first loading")
        redis = await client.redis()
        assert await redis.delete(in_progress_key_prefix + first.job_id) == 1
        # The worker has polled the queue since the marker went once the second job runs
        # (both are read in one poll; the first is read before the second).
        second = await client.enqueue(LoadRequest(source=str(other)))
        await eventually(lambda: worker.supervisor.forkserver.spawned == 2, 30, "second loading")
        assert sorted(worker.supervisor.in_flight) == sorted([first.job_id, second.job_id])
        # The lease writes the marker back, so other workers leave the job alone too.
        marker = in_progress_key_prefix + first.job_id
        await eventually(lambda: redis.exists(marker), 10, "the marker written back")
        await first.cancel()
        await second.cancel()
        first_report = await first.report(30)
        assert (await second.report(30)).outcome is Outcome.CANCELLED
        spawned = worker.supervisor.forkserver.spawned
    # A second run of the first job would have ended it crashed, or as a second attempt.
    assert first_report.outcome is Outcome.CANCELLED, first_report.error
    assert len(first_report.attempts) == 1
    assert spawned == 2, "the first job was started twice"
