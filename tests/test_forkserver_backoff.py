"""While a lost fork server's restart waits out its backoff, jobs keep their attempts: the
worker claims none, and a load that needs a child waits for the restart (within its job's
deadline) instead of ending ``crashed``/``sandbox`` at once."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog

from loadwarden.producer.client import Client
from loadwarden.producer.contract import JobPhase, LimitOverrides, LoadRequest, Outcome
from loadwarden.worker.config import Settings
from loadwarden.worker.load.supervisor import Supervisor
from loadwarden.worker.sandbox import _backoff
from loadwarden.worker.sandbox.children import SandboxError, stop_child
from loadwarden.worker.sandbox.forkserver import ForkServer
from tests.conftest import TEST_LOADERS, eventually, running_worker
from tests.forkserver_dies import MARKER


async def _kill_twice(forkserver: ForkServer) -> None:
    """Kill the fork server, wait for its restart, kill the new one: lost twice within 30 s of
    a start, its next start waits 1 s (``_backoff``); returns while that wait runs."""
    os.kill(forkserver.pid or 0, signal.SIGKILL)
    await eventually(lambda: forkserver.restarts == 1, 30, "the first restart")
    os.kill(forkserver.pid or 0, signal.SIGKILL)
    await eventually(lambda: not forkserver.alive, 30, "the loss")


def _lost_waits(events: list[dict[str, Any]]) -> list[float]:
    return [e["again_in_s"] for e in events if e["event"] == "forkserver_lost"]


async def test_jobs_enqueued_during_the_backoff_all_end_ok_on_their_first_attempt(
    settings: Settings, small_model: Path
) -> None:
    """Kill a worker's fork server twice in a row and enqueue jobs while its restart waits 1 s:
    none is claimed meanwhile (no load waits in the worker), and each ends ok with one attempt."""
    async with running_worker(settings) as runner, Client(settings=settings) as client:
        forkserver = runner.supervisor.forkserver
        with structlog.testing.capture_logs() as events:
            await _kill_twice(forkserver)
            handles = [
                await client.enqueue(LoadRequest(source=str(small_model), labels={"n": str(n)}))
                for n in range(6)
            ]
            assert not forkserver.alive, "the backoff ended before the jobs were enqueued"
            reports = [await handle.report(30) for handle in handles]
        assert forkserver.restarts == 2
    assert _lost_waits(events)[-1] >= 0.9  # the second loss waited: the window was real
    for report in reports:
        assert report.outcome is Outcome.OK, report.error
        assert [a.number for a in report.attempts] == [1], report.attempts
    assert not any(e["event"] == "forkserver_awaited" for e in events), "claimed while down"


async def test_a_load_during_the_backoff_waits_for_the_restart_within_its_deadline(
    small_model: Path,
) -> None:
    """A load that reaches its child while the restart waits 1 s waits for it and ends ok; one
    whose job deadline ends first ends ``timeout`` saying what it waited for."""
    async with Supervisor(Settings(), preload=[TEST_LOADERS]) as sup:
        with structlog.testing.capture_logs() as events:
            await _kill_twice(sup.forkserver)
            down_s = sup.metrics.registry.get_sample_value("loadwarden_forkserver_down_seconds")
            short = LoadRequest(source=str(small_model), limits=LimitOverrides(timeout_seconds=0.2))
            waited, cut = await asyncio.gather(
                sup.load(LoadRequest(source=str(small_model))), sup.load(short)
            )
            assert sup.forkserver.restarts == 2
            # up again, not yet for 30 s: down since the first loss (``_backoff``)
            assert sup.forkserver.alive and sup.forkserver.down_s > down_s
    assert waited.outcome is Outcome.OK, waited.error
    assert down_s > 0
    assert cut.outcome is Outcome.TIMEOUT
    assert cut.error is not None and "waiting for the fork server" in cut.error.message
    assert sum(e["event"] == "forkserver_awaited" for e in events) == 2


async def test_a_load_waiting_for_the_restart_shows_phase_waiting(small_model: Path) -> None:
    """A load admitted while its fork server restarts is ``waiting`` until the restart is done
    (the heartbeat's phase), then ``loading``, and ends ok."""
    async with Supervisor(Settings(), preload=[TEST_LOADERS]) as sup:
        forkserver = sup.forkserver
        phases: list[JobPhase] = []
        with structlog.testing.capture_logs() as events:
            async with forkserver._lock:  # holds the restart back until the phase is read
                os.kill(forkserver.pid or 0, signal.SIGKILL)
                await eventually(lambda: forkserver.restarting, 30, "the restart")
                load = asyncio.create_task(sup.load(LoadRequest(source=str(small_model))))
                await eventually(
                    lambda: any(e["event"] == "forkserver_awaited" for e in events),
                    30,
                    "the load waits for the restart",
                )
                phases += [job.phase for job in sup.in_flight.values()]
            await eventually(
                lambda: [j.phase for j in sup.in_flight.values()] != phases,
                30,
                "the load goes on",
            )
            phases += [job.phase for job in sup.in_flight.values()]
            report = await load
    assert phases[:1] == [JobPhase.WAITING]
    assert phases[1:] in ([JobPhase.LOADING], []), phases  # [] when it ended at once
    assert report.outcome is Outcome.OK, report.error


async def test_a_failed_restart_fails_the_loads_waiting_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restart's start that fails (the new fork server dies at once) fails those waiting for
    it (an attempt each: ``crashed``/``sandbox``); the restart goes on, and once a start
    succeeds the waiters return."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    marker = tmp_path / MARKER
    forkserver = ForkServer(preload=["tests.forkserver_dies"], ready=0)
    try:
        await forkserver.start()
        marker.touch()
        os.kill(forkserver.pid or 0, signal.SIGKILL)
        await eventually(lambda: forkserver.restarting, 30, "the restart")
        with pytest.raises(SandboxError, match="did not start"):
            async with asyncio.timeout(30):
                await forkserver.running()
        marker.unlink()
        async with asyncio.timeout(30):
            await forkserver.running()
        assert forkserver.alive
        await stop_child(await forkserver.spawn())
    finally:
        await forkserver.close()


async def test_livez_fails_once_the_fork_server_stays_down_past_the_setting(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose fork server cannot start again answers /livez 503, saying why, once it
    has been down longer than ``forkserver_down_max_s``; before, /livez is 200 (and /readyz
    already 503)."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    settings = Settings(
        redis_url=redis_url, metrics_port=0, metrics_host="127.0.0.1", forkserver_down_max_s=0.5
    )
    preload = [TEST_LOADERS, "tests.forkserver_dies"]
    async with running_worker(settings, preload=preload) as runner:
        forkserver = runner.supervisor.forkserver
        assert runner.probes is not None
        base = f"http://127.0.0.1:{runner.probes.port}"
        async with httpx.AsyncClient(base_url=base, timeout=5) as http:
            assert (await http.get("/livez")).status_code == 200
            (tmp_path / MARKER).touch()  # every start from now on dies at once
            os.kill(forkserver.pid or 0, signal.SIGKILL)
            await eventually(lambda: forkserver.down_s > 0, 30, "the loss")
            early = await http.get("/livez")
            down_s = forkserver.down_s  # read after the answer: it was at most this when served

            async def dead() -> httpx.Response | None:
                answer = await http.get("/livez")
                return answer if answer.status_code == 503 else None

            failed = await eventually(dead, 30, "/livez fails")
            assert forkserver.down_s > 0.5 and not forkserver.alive
            ready = await http.get("/readyz")
    assert down_s > 0.5 or early.status_code == 200, (down_s, early.text)
    assert "no fork server for" in failed.text
    assert "LOADWARDEN_FORKSERVER_DOWN_MAX_S (0.5 s)" in failed.text
    assert ready.status_code == 503 and "fork server not running" in ready.text


def _restarted(forkserver: ForkServer, restarts: int) -> Callable[[], bool]:
    return lambda: forkserver.restarts == restarts and forkserver.alive


async def test_livez_fails_for_a_fork_server_lost_again_soon_after_each_start(
    redis_url: str,
) -> None:
    """A crash loop: the fork server starts again each time but is killed once it runs, three
    times. No single down time is long (the backoff waits 0 s, 1 s, 2 s), yet once the third
    runs, /livez answers 503 and the gauge reads over ``forkserver_down_max_s`` (2.5 s): the
    down time counts from the first loss until one has stayed up 30 s, not until any start."""
    settings = Settings(
        redis_url=redis_url, metrics_port=0, metrics_host="127.0.0.1", forkserver_down_max_s=2.5
    )
    async with running_worker(settings) as runner:
        forkserver = runner.supervisor.forkserver
        assert runner.probes is not None
        base = f"http://127.0.0.1:{runner.probes.port}"
        async with httpx.AsyncClient(base_url=base, timeout=5) as http:
            assert (await http.get("/livez")).status_code == 200
            for restarts in (1, 2, 3):
                os.kill(forkserver.pid or 0, signal.SIGKILL)
                await eventually(_restarted(forkserver, restarts), 30, f"restart {restarts}")
            live = await http.get("/livez")
            gauge = runner.supervisor.metrics.registry.get_sample_value(
                "loadwarden_forkserver_down_seconds"
            )
            assert forkserver.alive and forkserver.restarts == 3, "lost again meanwhile"
    assert live.status_code == 503, live.text
    assert "no fork server for" in live.text and "lost again soon after its start" in live.text
    assert gauge is not None and gauge > 2.5


async def test_a_fork_server_that_stays_up_ends_the_down_time(
    small_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a restarted fork server has stayed up the backoff's stable window (made 0.5 s
    here), the down time and its gauge are 0 again, and the next loss counts anew."""
    monkeypatch.setattr(_backoff, "SHORT_LIFE_S", 0.5)
    async with Supervisor(Settings(), preload=[TEST_LOADERS]) as sup:
        forkserver = sup.forkserver
        os.kill(forkserver.pid or 0, signal.SIGKILL)
        await eventually(_restarted(forkserver, 1), 30, "the restart")
        await eventually(lambda: forkserver.down_s == 0.0, 30, "the down time ends")
        gauge = sup.metrics.registry.get_sample_value("loadwarden_forkserver_down_seconds")
        assert forkserver.restarts == 1 and forkserver.alive
        report = await sup.load(LoadRequest(source=str(small_model)))
    assert gauge == 0.0
    assert report.outcome is Outcome.OK, report.error


@pytest.mark.parametrize(("value", "limit"), [("null", None), ("NULL", None), ("120", 120.0)])
def test_the_livez_limit_is_turned_off_from_the_environment_as_documented(
    value: str, limit: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README: LOADWARDEN_FORKSERVER_DOWN_MAX_S=null makes /livez ignore the fork server."""
    monkeypatch.setenv("LOADWARDEN_FORKSERVER_DOWN_MAX_S", value)
    assert Settings().forkserver_down_max_s == limit
