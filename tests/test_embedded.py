"""Embedded mode: a dead in-process worker is noticed, leftovers cannot brick it, waits end."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from loadwarden.producer.client import Client
from loadwarden.producer.contract import LoadRequest
from loadwarden.producer.errors import EmbeddedWorkerDied
from loadwarden.worker.config import Settings
from loadwarden.worker.queue._redis_server import RedisServer
from loadwarden.worker.queue.embedded import embedded
from loadwarden.worker.queue.runner import WorkerRunner

LOADWARDEN = str(Path(sys.executable).parent / "loadwarden")
#: Finding 1's job: an envelope whose "t" is a string (it used to kill the worker).
PLANTED = b'{"t":"x","f":"load","a":[],"k":{"request":{"source":"/x"}},"et":1}'


def _plant(state_dir: Path, job_id: str = "planted") -> None:
    """Leave finding 1's job queued in an embedded state folder, as an earlier run might."""
    with RedisServer(data_dir=state_dir / "data", appendonly=True) as server:
        client = redis.Redis(unix_socket_path=str(server.socket_path))
        client.set(f"arq:job:{job_id}", PLANTED)
        client.zadd("loadwarden:queue", {job_id: time.time() * 1000})
        client.close()


def _keys(state_dir: Path, *keys: str) -> list[bool]:
    with RedisServer(data_dir=state_dir / "data", appendonly=True) as server:
        client = redis.Redis(unix_socket_path=str(server.socket_path))
        try:
            return [bool(client.exists(k)) for k in keys]
        finally:
            client.close()


@pytest.fixture
def catalog(small_model: Path) -> Path:
    path = small_model.parent / "catalog.toml"
    path.write_text(f'[[model]]\nname = "small"\nsource = "{small_model.name}"\n')
    return path


def _preload(catalog: Path, state_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LOADWARDEN, "preload", str(catalog), "--state-dir", str(state_dir), "--json", *extra],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        stdin=subprocess.DEVNULL,
        env={"PATH": "/usr/bin:/bin", "HOME": str(state_dir)},
    )


def test_a_planted_leftover_does_not_brick_preload(catalog: Path, tmp_path: Path) -> None:
    """Finding 1's job left in the state folder is named, ends in a report; preload completes."""
    state = tmp_path / "state"
    _plant(state)
    out = _preload(catalog, state)
    assert out.returncode == 0, out.stderr
    assert "1 job(s) an earlier run left queued will run first: planted" in out.stderr
    assert json.loads(out.stdout)["totals"]["ok"] == 1
    assert _keys(state, "arq:job:planted", "arq:result:planted") == [False, True]


def test_leftovers_can_be_dropped_unrun(catalog: Path, tmp_path: Path) -> None:
    """--drop-leftovers removes an earlier run's queued jobs without running them."""
    state = tmp_path / "state"
    _plant(state)
    out = _preload(catalog, state, "--drop-leftovers")
    assert out.returncode == 0, out.stderr
    assert "dropped 1 job(s) an earlier run left queued: planted" in out.stderr
    assert _keys(state, "arq:job:planted", "arq:result:planted") == [False, False]


async def test_a_command_notices_its_worker_dying(
    monkeypatch: pytest.MonkeyPatch, small_model: Path, tmp_path: Path
) -> None:
    """When the in-process worker dies mid-command, the wait ends at once with the reason."""
    enqueued = asyncio.Event()

    async def die(self: WorkerRunner, *args: object) -> None:
        await enqueued.wait()
        raise RuntimeError("injected worker death")

    monkeypatch.setattr(WorkerRunner, "_run_arq", die)
    loop = asyncio.get_running_loop()

    async def wait_for_a_report() -> float:
        async with (
            embedded(Settings(redis_url=None), state_dir=tmp_path / "state") as active,
            Client(settings=active) as client,
        ):
            handle = await client.enqueue(LoadRequest(source=str(small_model)))
            started = loop.time()
            enqueued.set()
            await handle.report(timeout_s=None)
        return started

    started = loop.time()
    with pytest.raises(EmbeddedWorkerDied, match="injected worker death"):
        started = await wait_for_a_report()
    assert loop.time() - started < 10


def test_report_wait_gives_up(redis_url: str) -> None:
    """`report --wait` with no worker ends with exit 3 after --timeout-s; its default is finite."""
    from loadwarden.worker.cli.main import DEFAULT_WAIT_S

    async def enqueue() -> str:
        async with Client(redis_url) as client:
            return (await client.enqueue(LoadRequest(source="/nowhere.safetensors"))).job_id

    job_id = asyncio.run(enqueue())
    out = subprocess.run(
        [LOADWARDEN, "report", job_id, "--wait", "--timeout-s", "0.5", "--redis", redis_url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 3 and "no report yet" in out.stderr
    assert 0 < DEFAULT_WAIT_S < float("inf")
