"""SIGTERM on a worker: stop pulling, let loads finish within the grace, else kill and requeue."""

from __future__ import annotations

import signal
from pathlib import Path

from loadwarden.producer.client import BlockingClient, JobState
from loadwarden.producer.contract import LoadRequest, Outcome
from tests.conftest import StartWorker, call_until, sandbox_processes


def _running(client: BlockingClient, job_id: str) -> bool:
    return client.job_state(job_id) is JobState.RUNNING


def test_sigterm_lets_a_running_load_finish(
    start_worker: StartWorker, redis_url: str, small_model: Path
) -> None:
    """A load that ends within the grace finishes ok after SIGTERM; the worker then exits 0."""
    worker = start_worker(redis_url, "slow", shutdown_grace_s=20)
    with BlockingClient(redis_url) as client:
        job_id = client.enqueue(LoadRequest(source=str(small_model)))
        call_until(lambda: _running(client, job_id), 30)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
        assert client.report(job_id, timeout_s=1).outcome is Outcome.OK
    assert sandbox_processes(worker.pid) == []


def test_sigterm_past_the_grace_kills_and_requeues(
    start_worker: StartWorker, redis_url: str, small_model: Path
) -> None:
    """A load still running after the grace is killed, its job requeued and rerun elsewhere."""
    worker = start_worker(redis_url, "hang", shutdown_grace_s=1)
    with BlockingClient(redis_url) as client:
        job_id = client.enqueue(LoadRequest(source=str(small_model)))
        call_until(lambda: _running(client, job_id), 30)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
        call_until(lambda: not sandbox_processes(worker.pid), 10)
        assert client.job_state(job_id) is JobState.QUEUED
        start_worker(redis_url)  # another worker picks the job up at once
        report = client.report(job_id, timeout_s=30)
    assert report.outcome is Outcome.OK
    assert report.worker.pid != worker.pid
    # A load released at shutdown was not an attempt: it does not count against retries.
    assert [a.number for a in report.attempts] == [1]
