"""A fork server lost under a running worker (killed, crashed) is started again, with a backoff
when it keeps dying at once; a load running then ends ``crashed``/``sandbox`` and nothing
leaks (loads during the backoff: ``test_forkserver_backoff``)."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import psutil
import pytest
import structlog

from loadwarden.producer.client import Client
from loadwarden.producer.contract import LoadRequest, ModelFormat, Outcome
from loadwarden.worker.config import Settings
from loadwarden.worker.load.supervisor import Supervisor
from loadwarden.worker.sandbox._backoff import restart_wait_s
from loadwarden.worker.sandbox.children import SandboxError, stop_child
from loadwarden.worker.sandbox.forkserver import ForkServer
from tests.conftest import TEST_LOADERS, assert_pid_gone, eventually, running_worker
from tests.forkserver_dies import MARKER


def _children(pid: int) -> list[int]:
    return [child.pid for child in psutil.Process(pid).children()]


async def test_a_killed_fork_server_is_started_again_and_the_next_job_ends_ok(
    settings: Settings, small_model: Path
) -> None:
    """SIGKILL the fork server of a running worker: a new one starts with no job asking (the
    worker is ready again), it is counted, the old one and its children are gone, and the
    next job ends ok."""
    async with running_worker(settings) as runner, Client(settings=settings) as client:
        sup = runner.supervisor
        first = await (await client.enqueue(LoadRequest(source=str(small_model)))).report(30)
        assert first.outcome is Outcome.OK, first.error
        old = sup.forkserver.pid
        assert old is not None
        old_children = _children(old)  # the child forked ahead for the next load
        os.kill(old, signal.SIGKILL)
        await eventually(lambda: sup.forkserver.restarts == 1, 30, "a new fork server")
        assert sup.forkserver.pid not in (None, old) and sup.forkserver.alive
        assert (await runner.readiness())[0]
        restarts = sup.metrics.registry.get_sample_value("loadwarden_forkserver_restarts_total")
        assert restarts == 1
        assert not psutil.pid_exists(old), "the lost fork server was not reaped"
        for pid in old_children:
            assert_pid_gone(pid)
        labels = {"after": "kill"}
        request = LoadRequest(source=str(small_model), labels=labels)
        after = await (await client.enqueue(request)).report(30)
        assert runner.arq is not None and runner.arq.alive
    assert after.outcome is Outcome.OK, after.error


async def test_a_fork_server_killed_mid_load(small_model: Path) -> None:
    """Killed while a load runs: that load ends crashed/sandbox (retried), its cgroup is
    removed all the same, and the next load runs in the new fork server and ends ok."""
    sup = Supervisor(Settings(), preload=[TEST_LOADERS], loaders={ModelFormat.SAFETENSORS: "hang"})
    async with sup:
        with structlog.testing.capture_logs() as events:
            loading = asyncio.create_task(sup.load(LoadRequest(source=str(small_model))))
            await eventually(
                lambda: any(e["event"] == "load_started" for e in events), what="the load"
            )
        folders = _cgroup_folders(sup)  # the load's (placed before it started), the next's
        os.kill(sup.forkserver.pid or 0, signal.SIGKILL)
        report = await loading
        assert report.outcome is Outcome.CRASHED
        assert report.error is not None and report.error.code == "sandbox"
        await eventually(lambda: sup.forkserver.restarts == 1, 30, "a new fork server")
        if sup.cgroups is not None:
            await sup.cgroups.drain()
            assert folders and not folders & _cgroup_folders(sup), "a lost child's cgroup was left"
        sup.loaders[ModelFormat.SAFETENSORS] = "safetensors"
        after = await sup.load(LoadRequest(source=str(small_model)))
    assert after.outcome is Outcome.OK, after.error


def _cgroup_folders(sup: Supervisor) -> set[str]:
    if sup.cgroups is None:
        return set()
    return {p.name for p in sup.cgroups.memory_base.iterdir() if p.is_dir()}


async def test_a_fork_server_that_dies_at_once_is_started_again_after_a_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lost, then dying at once on each start: the starts back off (a spawn meanwhile is
    refused at once, with no launch, as SandboxError: a load waits for the restart first);
    once it can start again, it does so by itself."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    marker = tmp_path / MARKER
    forkserver = ForkServer(preload=["tests.forkserver_dies"], ready=0)
    with structlog.testing.capture_logs() as events:
        try:
            await forkserver.start()
            marker.touch()
            os.kill(forkserver.pid or 0, signal.SIGKILL)
            # Lost soon after its start: started again at once, which fails: the next waits.
            await eventually(lambda: _failed_starts(events) == 1, 30, "a failed start")
            with pytest.raises(SandboxError, match="starting it again in"):
                await forkserver.spawn()
            assert _failed_starts(events) == 1, "a spawn during the wait launched one"
            assert not forkserver.alive and forkserver.pid is None  # no zombie left meanwhile
            marker.unlink()
            await eventually(lambda: forkserver.restarts == 1, 30, "a new fork server")
            await stop_child(await forkserver.spawn())
        finally:
            await forkserver.close()


def _failed_starts(events: list[dict[str, Any]]) -> int:
    return sum(e["event"] == "forkserver_start_failed" for e in events)


def test_the_waits_double_from_the_second_short_life() -> None:
    assert [restart_wait_s(n) for n in range(10)] == [0, 0, 1, 2, 4, 8, 16, 32, 60, 60]
