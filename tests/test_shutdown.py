"""SIGTERM on a worker: stop pulling, let loads finish within the grace, else kill and requeue."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from loadwarden.producer.client import BlockingClient, JobState
from loadwarden.producer.contract import LoadRequest, Outcome
from tests.conftest import TEST_LOADERS, call_until

WORKER = """
import asyncio, sys
from loadwarden.producer.contract import ModelFormat
from loadwarden.producer.settings import Settings
from loadwarden.worker.app import run_worker
from loadwarden.worker.logs import configure_logging
configure_logging("info", json=True)
asyncio.run(run_worker(Settings(redis_url=sys.argv[1], shutdown_grace_s=int(sys.argv[3])),
                       loaders={ModelFormat.SAFETENSORS: sys.argv[2]}, preload=[sys.argv[4]]))
"""


def _sandbox_processes(supervisor_pid: int) -> list[psutil.Process]:
    """The fork server and load children that belong to one supervisor, wherever they are now."""
    out = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "loadwarden.worker.sandbox._forkserver" in cmd and str(supervisor_pid) in cmd:
            out.append(proc)
    return out


@pytest.fixture
def start_worker(
    redis_url: str, tmp_path: Path
) -> Iterator[Callable[[str, int], subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(loader: str, grace_s: int) -> subprocess.Popen[bytes]:
        log = tmp_path / f"worker-{len(procs)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-c", WORKER, redis_url, loader, str(grace_s), TEST_LOADERS],
                stdout=out,
                stderr=out,
                stdin=subprocess.DEVNULL,
                cwd=Path(__file__).parent.parent,
            )
        procs.append(proc)
        call_until(lambda: b"worker_started" in log.read_bytes() or proc.poll() is not None, 30)
        assert proc.poll() is None, log.read_text()
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def _running(client: BlockingClient, job_id: str) -> bool:
    return client.job_state(job_id) is JobState.RUNNING


def test_sigterm_lets_a_running_load_finish(
    start_worker: Callable[[str, int], subprocess.Popen[bytes]], redis_url: str, small_model: Path
) -> None:
    """A load that ends within the grace finishes ok after SIGTERM; the worker then exits 0."""
    worker = start_worker("slow", 20)
    with BlockingClient(redis_url) as client:
        job_id = client.enqueue(LoadRequest(source=str(small_model)))
        call_until(lambda: _running(client, job_id), 30)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
        assert client.report(job_id, timeout_s=1).outcome is Outcome.OK
    assert _sandbox_processes(worker.pid) == []


def test_sigterm_past_the_grace_kills_and_requeues(
    start_worker: Callable[[str, int], subprocess.Popen[bytes]], redis_url: str, small_model: Path
) -> None:
    """A load still running after the grace is killed, its job requeued and rerun elsewhere."""
    worker = start_worker("hang", 1)
    with BlockingClient(redis_url) as client:
        job_id = client.enqueue(LoadRequest(source=str(small_model)))
        call_until(lambda: _running(client, job_id), 30)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
        call_until(lambda: not _sandbox_processes(worker.pid), 10)
        assert client.job_state(job_id) is JobState.QUEUED
        start_worker("safetensors", 5)  # another worker picks the job up at once
        report = client.report(job_id, timeout_s=30)
    assert report.outcome is Outcome.OK
    assert report.worker.pid != worker.pid
    # A load released at shutdown was not an attempt: it does not count against retries.
    assert [a.number for a in report.attempts] == [1]
