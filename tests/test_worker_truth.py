"""A worker says what happens now: status with phases, start-up and shutdown logs, busy time."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
from pathlib import Path

import redis.asyncio as aioredis

from loadwarden.producer.client import BlockingClient, Client, JobState
from loadwarden.producer.contract import JobPhase, LoadRequest
from loadwarden.producer.counts import queue_counts
from loadwarden.worker.config import Settings
from loadwarden.worker.load.supervisor import Supervisor
from loadwarden.worker.queue.heartbeat import INTERVAL_S, KEY_PREFIX, beat
from tests.conftest import StartWorker, call_until, eventually, running_worker

MiB = 1024 * 1024
#: Well inside one heartbeat interval: what status shows comes from the change, not the timer.
SOONER_THAN_A_BEAT_S = INTERVAL_S / 2


async def _phases(client: Client) -> dict[str, JobPhase]:
    status = await client.status()
    return {job.job_id: job.phase for w in status.workers for job in w.jobs}


async def test_status_shows_jobs_now_with_their_phase(
    redis_url: str, small_model: Path, tmp_path: Path
) -> None:
    """status lists a job loading and one waiting for memory at once, and drops them at once."""
    # Room for one 128 MiB (floor) load in the budget: the second waits for memory.
    settings = Settings(redis_url=redis_url, memory_budget_bytes=200 * MiB)
    other = tmp_path / "other.safetensors"
    shutil.copyfile(small_model, other)
    async with (
        running_worker(settings, loaders={"safetensors": "hang"}),
        Client(settings=settings) as client,
    ):
        first = await client.enqueue(LoadRequest(source=str(small_model)))
        await eventually(
            lambda: _is(client, first.job_id, JobPhase.LOADING), 30, "first job loading"
        )
        second = await client.enqueue(LoadRequest(source=str(other)))
        await eventually(
            lambda: _is(client, second.job_id, JobPhase.WAITING),
            SOONER_THAN_A_BEAT_S,
            "second job waiting, shown before the next periodic heartbeat",
        )
        await first.cancel()
        await second.cancel()
        assert str((await first.report(30)).outcome) == "cancelled"
        assert str((await second.report(30)).outcome) == "cancelled"

        async def gone() -> bool:
            return await _phases(client) == {}

        await eventually(gone, SOONER_THAN_A_BEAT_S, "no jobs shown once both ended")


async def _is(client: Client, job_id: str, phase: JobPhase) -> bool:
    return (await _phases(client)).get(job_id) is phase


def test_start_and_shutdown_logs_name_what_matters(
    start_worker: StartWorker, redis_url: str, small_model: Path
) -> None:
    """worker_started logs roots, budget, confinement, metrics port; shutdown names the jobs."""
    worker = start_worker(redis_url, "hang", shutdown_grace_s=600)
    log = worker.log_path  # type: ignore[attr-defined]
    with BlockingClient(redis_url) as client:
        job_id = client.enqueue(LoadRequest(source=str(small_model))).job_id
        call_until(lambda: client.job_state(job_id) is JobState.RUNNING, 30)
        worker.send_signal(signal.SIGTERM)
        call_until(lambda: b"worker_stopping" in log.read_bytes(), 10)
        worker.send_signal(signal.SIGTERM)  # the second signal: stop now, requeue the job
        worker.wait(30)  # its exit status is test_shutdown's business
    events = {}
    for line in log.read_text().splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            events.setdefault(event.get("event"), event)
    started = events["worker_started"]
    assert {"allow_roots", "metrics_port", "memory_budget_bytes", "cgroups", "landlock_abi"} <= (
        started.keys()
    )
    assert events["worker_stopping"]["running"] == [job_id]
    assert events["jobs_requeued"]["job_ids"] == [job_id]
    assert events["worker_stopped"]["requeued"] == [job_id]


async def test_service_time_counts_the_whole_job(
    settings: Settings, redis_url: str, small_model: Path
) -> None:
    """The autoscaler's busy seconds cover a job's whole run, not only its child's wall time."""
    async with running_worker(settings), Client(settings=settings) as client:
        report = await (await client.enqueue(LoadRequest(source=str(small_model)))).report(30)
    redis = aioredis.from_url(redis_url)
    try:
        counts = await queue_counts(redis, settings.queue_name)
    finally:
        await redis.aclose()
    assert report.resources is not None
    attempt = report.attempts[-1]
    whole_attempt = (attempt.finished_at - attempt.started_at).total_seconds()
    assert counts["served_jobs"] == 1
    assert counts["served_seconds"] >= whole_attempt > report.resources.wall_seconds


async def test_reports_cap_their_tensor_list(tmp_path: Path) -> None:
    """A report lists at most report_max_tensors tensors and says it was cut; totals stay whole."""
    import numpy as np

    from loadwarden.worker.load.supervisor import Supervisor
    from tests.safetensors_files import valid_model

    path = valid_model(
        tmp_path / "many.safetensors", {f"t{i}": np.zeros(2, np.float32) for i in range(30)}
    )
    async with Supervisor(Settings(report_max_tensors=10)) as sup:
        report = await sup.load(LoadRequest(source=str(path)))
    assert report.ok and report.model is not None
    assert len(report.model.tensors) == 10 and report.model.tensors_truncated
    assert report.model.tensor_count == 30 and report.model.parameters == 60


async def test_cancel_returns_the_state_when_it_was_sent(
    settings: Settings, small_model: Path
) -> None:
    """cancel() returns the state the job was in when the cancel was sent; it ends cancelled."""
    async with Client(settings=settings) as client:
        handle = await client.enqueue(LoadRequest(source=str(small_model)))
        assert str(await handle.cancel()) == "queued"
        async with running_worker(settings):
            report = await handle.report(30)
        assert str(report.outcome) == "cancelled"
        assert str(await handle.cancel()) == "complete"  # nothing left to cancel


async def test_an_override_above_the_ceiling_is_said_to_be_clamped(
    small_model: Path, captured_events: list[dict[str, object]]
) -> None:
    """An override past the ceiling runs at the ceiling, says so in the report and warns."""
    from loadwarden.producer.contract import Derivation, LimitOverrides
    from loadwarden.worker.load.supervisor import Supervisor

    request = LoadRequest(source=str(small_model), limits=LimitOverrides(cpu_seconds=10**9))
    async with Supervisor(Settings()) as sup:
        report = await sup.load(request)
    assert report.ok and report.limits is not None
    assert report.limits.cpu_seconds == Settings().limits.cpu_ceiling_s
    assert report.limits.derivation.cpu_seconds is Derivation.OVERRIDE_CLAMPED
    (warning,) = [e for e in captured_events if e["event"] == "limit_override_clamped"]
    assert warning["limit"] == "cpu_seconds" and warning["requested"] == 10**9


async def test_heartbeat_stops_when_stopped_as_a_job_ends(
    settings: Settings, redis_url: str
) -> None:
    """A heartbeat cancelled in the moment a change is signalled (a job ending as the worker
    stops) still ends: Python 3.11's wait_for would drop that cancel and beat on forever,
    and a burst worker would never exit."""
    supervisor = Supervisor(settings)
    redis = aioredis.from_url(redis_url)
    task = asyncio.create_task(beat(redis, supervisor, settings))
    try:
        # Waiting on the change event: asyncio.Event keeps its waiters in _waiters.
        await eventually(lambda: len(supervisor.changed._waiters) == 1, 10, "heartbeat waiting")
        supervisor.changed.set()  # the same step of the loop: the race, every time
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=10)
        assert done == {task}, "the heartbeat ignored its cancel"
        assert task.cancelled()
        assert not await redis.exists(KEY_PREFIX + supervisor.info.id)  # it cleaned up
    finally:
        task.cancel()
        await redis.aclose()
