"""SIGTERM on a worker: stop pulling, let loads finish within the grace, else kill and requeue."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from loadwarden.producer.client import BlockingClient, JobState
from loadwarden.producer.contract import LoadRequest, Outcome
from loadwarden.worker.config import LimitPolicy, Settings
from tests.conftest import StartWorker, call_until, sandbox_processes


def _signal_while_running(
    worker: subprocess.Popen[bytes], client: BlockingClient, source: Path, signals: int = 1
) -> str:
    """Enqueue a load, wait until it runs, send SIGTERM ``signals`` times; return the job id.

    Each further signal waits until the worker has acted on the one before: two identical
    signals sent at once reach a process as one.
    """
    job_id = client.enqueue(LoadRequest(source=str(source))).job_id
    call_until(lambda: client.job_state(job_id) is JobState.RUNNING, 30)
    log = worker.log_path  # type: ignore[attr-defined]
    for n in range(signals):
        if n:
            call_until(lambda: b"worker_stopping" in log.read_bytes(), 10)
        worker.send_signal(signal.SIGTERM)
    return job_id


def test_sigterm_lets_a_running_load_finish(
    start_worker: StartWorker, redis_url: str, small_model: Path
) -> None:
    """A load that ends within the grace finishes ok after SIGTERM; the worker then exits 0."""
    worker = start_worker(redis_url, "slow", shutdown_grace_s=20)
    with BlockingClient(redis_url) as client:
        job_id = _signal_while_running(worker, client, small_model)
        assert worker.wait(30) == 0
        assert client.report(job_id, timeout_s=1).outcome is Outcome.OK
    assert sandbox_processes(worker.pid) == []


def test_sigterm_past_the_grace_kills_and_requeues(
    start_worker: StartWorker, redis_url: str, small_model: Path
) -> None:
    """A load still running after the grace is killed, its job requeued and rerun elsewhere."""
    worker = start_worker(redis_url, "hang", shutdown_grace_s=1)
    with BlockingClient(redis_url) as client:
        job_id = _signal_while_running(worker, client, small_model)
        assert worker.wait(30) == 0
        call_until(lambda: not sandbox_processes(worker.pid), 10)
        assert client.job_state(job_id) is JobState.QUEUED
        start_worker(redis_url)  # another worker picks the job up at once
        report = client.report(job_id, timeout_s=30)
    assert report.outcome is Outcome.OK
    assert report.worker.pid != worker.pid
    # A load released at shutdown was not an attempt: it does not count against retries.
    assert [a.number for a in report.attempts] == [1]


def test_second_sigterm_stops_at_once(
    start_worker: StartWorker, redis_url: str, small_model: Path
) -> None:
    """A second SIGTERM ends the grace period at once: the worker exits, the job stays queued."""
    worker = start_worker(redis_url, "hang", shutdown_grace_s=600)
    with BlockingClient(redis_url) as client:
        job_id = _signal_while_running(worker, client, small_model, signals=2)
        assert worker.wait(30) == 0  # far sooner than the 600 s grace
        call_until(lambda: not sandbox_processes(worker.pid), 10)
        assert client.job_state(job_id) is JobState.QUEUED


def test_allow_root_from_the_environment(redis_url: str, small_model: Path, tmp_path: Path) -> None:
    """`loadwarden worker` reads its allowed roots from LOADWARDEN_ALLOW_ROOTS (':'-separated)."""
    import os
    import sys

    log = tmp_path / "w.log"
    env = {**os.environ, "LOADWARDEN_ALLOW_ROOTS": f"/nonexistent-root:{small_model.parent}"}
    env.pop("LOADWARDEN_SOURCES__ALLOW_ROOTS", None)
    exe = str(Path(sys.executable).parent / "loadwarden")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [exe, "worker", "--redis", redis_url],
            env=env,
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
            cwd="/",
        )
    try:
        call_until(lambda: b"worker_started" in log.read_bytes(), 30)
        with BlockingClient(redis_url) as client:
            ok = client.enqueue(LoadRequest(source=str(small_model))).report(timeout_s=30)
            outside = client.enqueue(LoadRequest(source="/etc/hostname")).report(timeout_s=30)
    finally:
        proc.terminate()
        proc.wait(30)
    assert ok.outcome is Outcome.OK
    assert outside.outcome is Outcome.REFUSED


def test_drain_grace_defaults_to_the_deadline_ceiling() -> None:
    """Without SHUTDOWN_GRACE_S the drain waits as long as the longest deadline a load may get."""
    assert Settings().drain_grace_s == Settings().limits.timeout_ceiling_s
    ceiling = Settings(limits=LimitPolicy(timeout_ceiling_s=540, timeout_floor_s=10))
    assert ceiling.drain_grace_s == 540
    assert Settings(shutdown_grace_s=30).drain_grace_s == 30


@pytest.mark.parametrize(("grace", "finishes"), [(None, True), (1, False)], ids=["ceiling", "1s"])
def test_drain_outlasts_a_load_longer_than_a_short_grace(
    start_worker: StartWorker,
    redis_url: str,
    small_model: Path,
    grace: int | None,
    finishes: bool,
) -> None:
    """A 3 s load under a 6 s deadline ceiling finishes after SIGTERM; a 1 s grace would kill it."""
    limits = {"timeout_ceiling_s": 6, "timeout_floor_s": 1}
    overrides: dict[str, object] = {"limits": limits}
    if grace is not None:
        overrides["shutdown_grace_s"] = grace
    worker = start_worker(redis_url, "slow_3s", **overrides)
    with BlockingClient(redis_url) as client:
        job_id = _signal_while_running(worker, client, small_model)
        assert worker.wait(30) == 0
        stopping = next(
            json.loads(line)
            for line in worker.log_path.read_bytes().splitlines()  # type: ignore[attr-defined]
            if b"worker_stopping" in line
        )
        assert stopping["grace_s"] == (6 if grace is None else grace)
        if finishes:
            assert client.report(job_id, timeout_s=1).outcome is Outcome.OK
        else:
            call_until(lambda: not sandbox_processes(worker.pid), 10)
            assert client.job_state(job_id) is JobState.QUEUED
