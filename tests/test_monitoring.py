"""Monitoring: metrics and probes of a worker, the exporter, thresholds, anomalies, show."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
import structlog
from prometheus_client import CollectorRegistry

from loadwarden.producer.client import Client
from loadwarden.producer.connection import blocking_redis_client, redis_client
from loadwarden.producer.contract import LimitOverrides, LoadRequest, Outcome
from loadwarden.worker._files import open_model_file
from loadwarden.worker.cli import _render
from loadwarden.worker.config import Settings
from loadwarden.worker.load.history import History, model_identity
from loadwarden.worker.load.limits import derive_limits, expected_memory_bytes, near_thresholds
from loadwarden.worker.load.supervisor import Supervisor
from loadwarden.worker.ops.exporter import run_exporter
from loadwarden.worker.ops.queue_gauges import QueueGauges
from loadwarden.worker.queue.runner import WorkerRunner
from tests.conftest import eventually, running_worker

Events = list[structlog.typing.EventDict]


def _metric(text: str, name: str) -> float:
    """The value of one sample line (``name`` includes its labels) in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in the scrape")


@pytest.fixture
async def observed_worker(redis_url: str) -> AsyncIterator[WorkerRunner]:
    settings = Settings(redis_url=redis_url, metrics_port=0, metrics_host="127.0.0.1")
    async with running_worker(settings) as runner:
        yield runner


async def test_worker_serves_metrics_and_probes(
    observed_worker: WorkerRunner, redis_url: str, small_model: Path
) -> None:
    """A worker with a metrics port serves its load metrics, /livez and /readyz."""
    assert observed_worker.probes is not None
    base = f"http://127.0.0.1:{observed_worker.probes.port}"
    async with Client(redis_url) as client:
        report = await (await client.enqueue(LoadRequest(source=str(small_model)))).report(
            timeout_s=30
        )
    assert report.ok
    async with httpx.AsyncClient(base_url=base, timeout=5) as http:
        metrics = (await http.get("/metrics")).text
        live, ready = await http.get("/livez"), await http.get("/readyz")
        observed_worker.stop()  # draining now: no longer ready
        draining = await http.get("/readyz")
        missing = await http.get("/nope")
    assert _metric(metrics, 'loadwarden_loads_total{outcome="ok"}') == 1
    assert _metric(metrics, "loadwarden_load_duration_seconds_count") == 1
    assert _metric(metrics, "loadwarden_load_peak_rss_bytes_count") == 1
    assert _metric(metrics, "loadwarden_memory_budget_bytes") > 0
    assert _metric(metrics, "loadwarden_loads_in_flight") == 0
    assert "loadwarden_worker_info{" in metrics
    assert "loadwarden_confinement_info{" in metrics
    assert _metric(metrics, "loadwarden_queue_wait_seconds_count") == 1
    # Pre-initialised: a first timeout will be an increase from 0, not a new series.
    assert _metric(metrics, 'loadwarden_loads_total{outcome="timeout"}') == 0
    assert _metric(metrics, 'loadwarden_threshold_crossings_total{limit="deadline"}') == 0
    assert _metric(metrics, "loadwarden_over_budget_refusals_total") == 0
    assert (live.status_code, ready.status_code, draining.status_code) == (200, 200, 503)
    assert missing.status_code == 404


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def _exporter(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A running exporter on a free loopback port, and an HTTP client for it; stopped after."""
    port, stop = _free_port(), asyncio.Event()
    task = asyncio.create_task(
        run_exporter(settings, port, host="127.0.0.1", stop=stop, interval_s=0.05)
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            yield http
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_exporter_reports_a_prepared_backlog(redis_url: str, small_model: Path) -> None:
    """The exporter serves the queue gauges (with no worker running) for a prepared backlog."""
    settings = Settings(redis_url=redis_url)
    async with Client(settings=settings) as client:
        for i in range(3):
            await client.enqueue(LoadRequest(source=str(small_model), labels={"n": str(i)}))
    async with _exporter(settings) as http:

        async def scrape() -> str | None:
            try:
                text = (await http.get("/metrics")).text
                return text if _metric(text, 'loadwarden_queue_jobs{state="ready"}') == 3 else None
            except (httpx.TransportError, AssertionError):
                return None

        text = await eventually(scrape, 10, "the exporter shows the backlog")
        ready = await http.get("/readyz")
    assert _metric(text, "loadwarden_workers_alive") == 0
    assert _metric(text, "loadwarden_desired_workers") >= 1
    assert _metric(text, "loadwarden_redis_up") == 1
    assert _metric(text, "loadwarden_queue_oldest_job_age_seconds") >= 0
    assert ready.status_code == 200
    # Queue series only, as README lists them: nothing that would read as a worker with no loads.
    assert set(re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE)) == {
        "loadwarden_redis_up",
        "loadwarden_queue_jobs",
        "loadwarden_queue_oldest_job_age_seconds",
        "loadwarden_dead_letter_jobs",
        "loadwarden_workers_alive",
        "loadwarden_desired_workers",
        "loadwarden_failing_models",
    }


async def test_exporter_without_redis_withdraws_the_queue_gauges() -> None:
    """Redis unreachable: loadwarden_redis_up is 0 and no queue gauge is exported (none frozen)."""
    closed = _free_port()  # nothing listens there: every connection is refused
    settings = Settings(redis_url=f"redis://127.0.0.1:{closed}/0")
    async with _exporter(settings) as http:

        async def scrape() -> str | None:
            try:
                text = (await http.get("/metrics")).text
            except httpx.TransportError:
                return None
            return text if "loadwarden_redis_up 0.0" in text else None

        text = await eventually(scrape, 10, "the exporter reports Redis down")
        ready = await http.get("/readyz")
    assert "loadwarden_queue_jobs" not in text and "loadwarden_workers_alive" not in text
    assert ready.status_code == 503


async def test_threshold_crossing_is_logged_once_per_limit(
    small_model: Path, captured_events: Events, make_supervisor: Callable[..., Supervisor]
) -> None:
    """A load past its near thresholds logs load_threshold_crossed once per limit, counted."""

    def crossed() -> list[str]:
        return [e["limit"] for e in captured_events if e["event"] == "load_threshold_crossed"]

    # The child holds 48 MiB over its expected 64 MiB baseline until cancelled, so it is
    # sampled (many times) past the memory threshold however fast the machine is.
    async with make_supervisor("hold_memory", Settings(threshold_fraction=0.01)) as sup:
        cancel = asyncio.Event()
        task = asyncio.create_task(sup.load(LoadRequest(source=str(small_model)), cancel=cancel))
        await eventually(lambda: "memory" in crossed(), timeout_s=30)
        cancel.set()
        report = await task
        scraped = sup.metrics.registry.get_sample_value(
            "loadwarden_threshold_crossings_total", {"limit": "memory"}
        )
    assert report.outcome is Outcome.CANCELLED
    assert len(crossed()) == len(set(crossed()))
    assert scraped == 1


async def test_sampled_from_one_interval_in(
    small_model: Path, make_supervisor: Callable[..., Supervisor]
) -> None:
    """The first psutil sample comes one interval into a load: a load that ends sooner has
    none (its figures are the kernel's), one that lasts a second has about ten."""
    async with make_supervisor("safetensors", Settings(sample_interval_s=0.5)) as sup:
        quick = await sup.load(LoadRequest(source=str(small_model)))
    async with make_supervisor("slow", Settings(sample_interval_s=0.1)) as sup:
        slow = await sup.load(LoadRequest(source=str(small_model)))
    assert quick.ok and slow.ok, (quick.error, slow.error)
    assert quick.resources is not None and slow.resources is not None
    if quick.resources.wall_seconds < 0.5:  # a machine so loaded it took longer proves nothing
        assert quick.resources.samples == 0 and quick.resources.series == []
    assert quick.resources.peak_rss_bytes > 0 and quick.resources.cpu_user_seconds >= 0
    assert slow.resources.samples >= 5 and slow.resources.series[0].t_s >= 0


def test_healthy_big_load_is_not_near_its_memory_limit() -> None:
    """A 4 GiB model holding what its derived limit expects stays below the memory threshold."""
    policy = Settings().limits
    size = 4 * 1024**3
    limits = derive_limits(size, LimitOverrides(), policy)
    expected = expected_memory_bytes(size, policy)
    near = near_thresholds(limits, expected, Settings().threshold_fraction)
    healthy_peak = 40 * 1024**2 + size  # a child's own ~40 MiB plus one copy of the tensors
    assert healthy_peak < near["memory"] < limits.memory_bytes
    assert healthy_peak / limits.memory_bytes > 0.8  # what used to warn


async def test_anomaly_beyond_history(
    redis_url: str, small_model: Path, captured_events: Events
) -> None:
    """A load far beyond its history logs load_anomaly (and still succeeds); noise does not."""
    redis = redis_client(redis_url)
    history = History(redis, Settings().limits)
    with open_model_file(small_model) as model_file:
        identity = model_identity(model_file, None)
    for _ in range(3):
        await history.record(identity, 1e-6, 1e-6, 1)
    settings = Settings(anomaly_min_wall_s=0, anomaly_min_rss_bytes=0)
    async with Supervisor(settings, history=history) as sup:
        report = await sup.load(LoadRequest(source=str(small_model)))
        counted = sup.metrics.registry.get_sample_value(
            "loadwarden_load_anomalies_total", {"kind": "wall"}
        )
    kinds = {e["kind"] for e in captured_events if e["event"] == "load_anomaly"}
    async with Supervisor(Settings(), history=history) as sup:  # default margins
        quiet = await sup.load(LoadRequest(source=str(small_model)))
        noise = sup.metrics.registry.get_sample_value(
            "loadwarden_load_anomalies_total", {"kind": "wall"}
        )
    await redis.aclose()
    assert report.outcome is Outcome.OK and quiet.outcome is Outcome.OK
    assert kinds >= {"wall", "peak_rss"}
    assert counted == 1
    assert noise == 0  # milliseconds beyond a tiny history are within the absolute margin


def test_resource_chart_draws_memory_and_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    """`show` charts memory and CPU over time from the samples kept in a report."""
    from loadwarden.producer.contract import LoadReport

    report = LoadReport.model_validate(
        {
            "job_id": "j",
            "source": "s",
            "outcome": "ok",
            "attempts": [],
            "worker": {"id": "w", "hostname": "h", "pid": 1, "version": "0"},
            "started_at": "2026-01-01T00:00:00Z",
            "finished_at": "2026-01-01T00:00:01Z",
            "resources": {
                "wall_seconds": 1,
                "cpu_user_seconds": 1,
                "cpu_system_seconds": 0,
                "peak_rss_bytes": 4 << 20,
                "read_bytes": 0,
                "samples": 3,
                "series": [
                    {"t_s": 0, "rss_bytes": 1 << 20, "cpu_s": 0},
                    {"t_s": 0.5, "rss_bytes": 2 << 20, "cpu_s": 0.5},
                    {"t_s": 1.0, "rss_bytes": 4 << 20, "cpu_s": 0.6},
                ],
            },
        }
    )
    _render.resource_chart(report)
    out = capsys.readouterr().out
    assert "memory" in out and "highest sample 4.0 MiB" in out and "highest 100% of a core" in out
    assert "kernel's high-water mark" in out  # which peak is which
    assert _render.sparkline([1, 2, 4]) == "▂▄█"


def test_show_command(redis_url: str, small_model: Path) -> None:
    """`loadwarden show JOB_ID` prints the report of a finished job."""

    async def one_job() -> str:
        settings = Settings(redis_url=redis_url)
        async with Client(settings=settings) as client:
            handle = await client.enqueue(LoadRequest(source=str(small_model)))
        await WorkerRunner(settings, burst=True, handle_signals=False).run()
        return handle.job_id

    job_id = asyncio.run(one_job())
    exe = str(Path(sys.executable).parent / "loadwarden")
    shown = subprocess.run(
        [exe, "show", job_id, "--redis", redis_url],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert shown.returncode == 0, shown.stderr
    assert job_id in shown.stdout and ("memory" in shown.stdout or "no samples" in shown.stdout)


def test_autoscale_for_a_prepared_backlog(redis_url: str) -> None:
    """`autoscale --json` answers ceil((ready + running) / (rate x target)) for a known backlog."""
    import json
    import time

    from loadwarden.producer.keys import SERVICE_KEY_PREFIX

    client = blocking_redis_client(redis_url)
    now_ms = int(time.time() * 1000) - 5000
    client.zadd("loadwarden:queue", {f"job-{i}": now_ms for i in range(120)})
    # The last hour: 100 loads that kept a slot busy 400 s in all -> 4 s each; two slots per
    # worker -> 0.5 jobs/s per worker. With a 60 s target, one worker is worth 30 jobs.
    client.hset(SERVICE_KEY_PREFIX + str(now_ms // 60_000), mapping={"jobs": 100, "seconds": 400})
    client.close()
    exe = str(Path(sys.executable).parent / "loadwarden")
    env = {
        **__import__("os").environ,
        "LOADWARDEN_AUTOSCALE__TARGET_DRAIN_S": "60",
        "LOADWARDEN_CONCURRENCY": "2",  # the workers' slots the rate counts
    }
    out = subprocess.run(
        [exe, "autoscale", "--json", "--redis", redis_url],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env=env,
    )
    decision = json.loads(out.stdout)
    assert decision["desired"] == 4  # ceil(120 / (0.5 x 60))
    assert decision["counts"]["ready"] == 120
    assert decision["service_rate_per_worker"] == pytest.approx(0.5)


def test_queue_gauges_are_withdrawn_when_redis_is_lost() -> None:
    """Gauges read while Redis answered disappear once it does not: nothing stays frozen."""
    registry = CollectorRegistry()
    gauges = QueueGauges(registry)
    counts = {"ready": 4, "deferred": 0, "running": 2, "dead": 1, "workers": 1}
    gauges.update(counts, desired=2, oldest_age_s=12.5)
    assert registry.get_sample_value("loadwarden_queue_jobs", {"state": "ready"}) == 4
    assert registry.get_sample_value("loadwarden_queue_oldest_job_age_seconds") == 12.5
    assert registry.get_sample_value("loadwarden_redis_up") == 1
    gauges.lost()
    assert registry.get_sample_value("loadwarden_queue_jobs", {"state": "ready"}) is None
    assert registry.get_sample_value("loadwarden_desired_workers") is None
    assert registry.get_sample_value("loadwarden_redis_up") == 0
