"""The failure memory: a model that keeps failing is refused with no child, then forgiven."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from typer.testing import CliRunner, Result

from loadwarden.producer import failures as store
from loadwarden.producer.client import Client
from loadwarden.producer.connection import redis_client
from loadwarden.producer.contract import (
    LimitOverrides,
    LoadReport,
    LoadRequest,
    ModelFormat,
    Outcome,
    RetryPolicy,
)
from loadwarden.producer.errors import (
    ChildCrashed,
    LoadError,
    LoadTimeout,
    MemoryExceeded,
    SourceRefused,
)
from loadwarden.producer.keys import RUNNING_ZSET
from loadwarden.producer.settings import RedisOptions
from loadwarden.worker._keys import ATTEMPTS_KEY_PREFIX
from loadwarden.worker._tasks import cancel_and_wait
from loadwarden.worker.cli import main as cli
from loadwarden.worker.config import FailureMemoryPolicy, LimitPolicy, Settings, SourcePolicy
from loadwarden.worker.load._lookup import FirstWritesFailed, look_up
from loadwarden.worker.load.failures import (
    REFUSED_CODE,
    FailureMemory,
    RepeatedlyFailing,
    counts_against,
)
from loadwarden.worker.load.history import FLUSH_DELAY_S, History
from loadwarden.worker.load.supervisor import Supervisor
from loadwarden.worker.ops.queue_gauges import QueueGauges, update_queue_gauges
from loadwarden.worker.queue.jobs import JobBook
from loadwarden.worker.sandbox.forkserver import ForkServer
from tests.conftest import TEST_LOADERS, eventually, running_worker
from tests.safetensors_files import valid_model

#: The hang loader's deadline: long enough to start a child, short enough to keep tests fast.
HANG_S = 0.3


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = redis_client(redis_url, RedisOptions())
    yield client
    await client.aclose()


def _model(path: Path, seed: int = 0) -> Path:
    valid_model(path, {"w": np.full((64,), seed, dtype=np.float32)})
    return path


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return _model(tmp_path / "m.safetensors")


def _supervisor(redis: Redis, loader: str = "hang", **policy: Any) -> Supervisor:
    return Supervisor(
        Settings(),
        preload=[TEST_LOADERS],
        loaders={ModelFormat.SAFETENSORS: loader},
        failures=FailureMemory(redis, FailureMemoryPolicy(**policy)),
    )


async def _hang(sup: Supervisor, path: Path) -> LoadReport:
    request = LoadRequest(source=str(path), limits=LimitOverrides(timeout_seconds=HANG_S))
    return await sup.load(request)


async def test_a_model_timing_out_three_times_is_refused_without_a_child(
    redis: Redis, redis_url: str, model: Path
) -> None:
    """After its third timeout a model is refused at once (no child), the report says which
    failures and until when, the refusal is counted, and a clear admits it again."""
    async with _supervisor(redis) as sup:
        for _ in range(3):
            assert (await _hang(sup, model)).outcome is Outcome.TIMEOUT
        assert sup.forkserver.spawned == 3
        started = time.monotonic()
        refused = await _hang(sup, model)
        refused_s = time.monotonic() - started
        assert sup.forkserver.spawned == 3
        refusals = sup.metrics.registry.get_sample_value("loadwarden_failure_memory_refusals_total")
        async with Client(settings=Settings(redis_url=redis_url)) as client:
            [held] = await client.failing_models()
            assert await client.clear_failing([held.identity]) == 1
        again = await _hang(sup, model)
        assert sup.forkserver.spawned == 4
    print(f"refused in {refused_s * 1000:.1f} ms")  # a figure for the log, not a test
    assert refusals == 1
    assert refused.outcome is Outcome.REFUSED and refused.resources is None
    assert refused.error is not None and refused.error.code == REFUSED_CODE
    assert "3 time(s)" in refused.error.message and "timeout/deadline" in refused.error.message
    memory = refused.error.failure_memory
    assert memory is not None and memory.refused and memory.identity == held.identity
    assert [(f.outcome, f.error_code) for f in memory.failures] == [
        (Outcome.TIMEOUT, "deadline")
    ] * 3
    assert 880 < (memory.expires_at - refused.finished_at).total_seconds() <= 900
    assert again.outcome is Outcome.TIMEOUT


async def test_the_memory_expires_and_a_changed_file_is_a_new_model(
    redis: Redis, model: Path, tmp_path: Path
) -> None:
    """A refused model is admitted again once its window has passed; a rewritten file at once."""
    async with _supervisor(redis, threshold=1, window_s=1.0) as sup:
        assert (await _hang(sup, model)).outcome is Outcome.TIMEOUT
        assert (await _hang(sup, model)).outcome is Outcome.REFUSED
        assert sup.forkserver.spawned == 1
        _model(model, seed=1)  # same path, new bytes and mtime: a new identity
        assert (await _hang(sup, model)).outcome is Outcome.TIMEOUT
        assert sup.forkserver.spawned == 2
        other = _model(tmp_path / "other.safetensors")
        assert (await _hang(sup, other)).outcome is Outcome.TIMEOUT
        assert (await _hang(sup, other)).outcome is Outcome.REFUSED
        await eventually(
            lambda: _forgotten(redis), 10, "the memory forgot the models after its window"
        )
        assert (await _hang(sup, other)).outcome is Outcome.TIMEOUT
        assert sup.forkserver.spawned == 4


async def _forgotten(redis: Redis) -> bool:
    return await store.listing(redis) == []


async def test_a_success_forgets_the_failures(redis: Redis, model: Path) -> None:
    """A successful load of a model clears the failures remembered for it."""
    digest = hashlib.sha256(await asyncio.to_thread(model.read_bytes)).hexdigest()
    identity = f"sha256:{digest}"
    for job in ("a", "b"):
        await store.record(
            redis,
            identity,
            job_id=job,
            source=str(model),
            outcome="timeout",
            error_code="deadline",
            threshold=3,
            window_s=900,
        )
    assert [m.identity for m in await store.listing(redis)] == [identity]
    async with _supervisor(redis, loader="safetensors") as sup:
        report = await sup.load(LoadRequest(source=str(model), sha256=digest))
    assert report.outcome is Outcome.OK, report.error
    assert await store.read(redis, identity, 3) is None
    assert await store.listing(redis) == []


async def test_a_sandbox_failure_does_not_count(
    redis: Redis, model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child that cannot be started is our machinery failing: nothing is remembered."""

    async def broken(self: ForkServer) -> None:
        raise OSError(errno.EMFILE, "injected")

    async with _supervisor(redis, threshold=1) as sup:
        monkeypatch.setattr(ForkServer, "spawn", broken)
        report = await _hang(sup, model)
    assert report.outcome is Outcome.CRASHED
    assert report.error is not None and report.error.code == "sandbox"
    assert await store.listing(redis) == []


@pytest.mark.parametrize(
    ("error", "child_ran", "child_timed_out", "counts"),
    [
        (LoadTimeout("x", code="deadline"), True, True, True),
        (LoadTimeout("hashing", code="deadline"), True, False, False),
        (LoadTimeout("inspecting", code="deadline"), False, False, False),
        (MemoryExceeded("x", code="cgroup_oom"), True, False, True),
        (ChildCrashed("x", code="signal"), True, False, True),
        (ChildCrashed("x", code="sandbox"), True, False, False),
        (ChildCrashed("x", code="cgroup_failed"), True, False, False),
        (ChildCrashed("x", code="protocol_violation"), True, False, False),
        (ChildCrashed("x", code="internal_error"), False, False, False),
        (SourceRefused("x", code=REFUSED_CODE), False, False, False),
        (None, True, False, False),
    ],
)
def test_which_failures_count_against_a_model(
    error: LoadError | None, child_ran: bool, child_timed_out: bool, counts: bool
) -> None:
    """Only a load child's own failure, by an allowed code, counts against the model."""
    assert counts_against(error, child_ran=child_ran, child_timed_out=child_timed_out) is counts
    cut = counts_against(
        error, child_ran=child_ran, child_timed_out=child_timed_out, limit_cut=True
    )
    assert cut is (counts and not isinstance(error, LoadTimeout))  # a cut deadline: not its own


async def test_a_timeout_cut_short_by_a_fork_server_restart_is_not_the_model_s(
    redis: Redis, model: Path
) -> None:
    """A load that waited out a fork server's restart (1 s of its 2.5 s) and then reached the
    deadline of what was left is not remembered against its model; one that did not wait is."""
    from tests.test_forkserver_backoff import _kill_twice

    async with _supervisor(redis, threshold=1) as sup:
        await _kill_twice(sup.forkserver)
        request = LoadRequest(source=str(model), limits=LimitOverrides(timeout_seconds=2.5))
        waited = await sup.load(request)
        assert sup.forkserver.restarts == 2
        assert await store.listing(redis) == []
        again = await sup.load(request)
    assert waited.outcome is Outcome.TIMEOUT and again.outcome is Outcome.TIMEOUT
    assert waited.error is not None and waited.error.code == "deadline"
    assert waited.resources is not None and waited.resources.wall_seconds < 2.0  # the cut one
    assert len(await store.listing(redis)) == 1  # the second timed out on its own deadline


async def test_redis_trouble_never_fails_a_load(model: Path) -> None:
    """With no Redis to ask, the memory stays silent and the load runs."""
    dead = redis_client(
        "redis://127.0.0.1:1/0", RedisOptions(connect_timeout_s=0.5, ride_through_s=0)
    )
    try:
        async with _supervisor(dead, loader="safetensors") as sup:
            report = await sup.load(LoadRequest(source=str(model)))
    finally:
        await dead.aclose()
    assert report.outcome is Outcome.OK, report.error


async def _cli(*args: str, url: str) -> Result:
    """The command, in-process (in a thread: it runs its own event loop)."""
    runner = CliRunner()
    env = {"LOADWARDEN_REDIS_URL": url}
    return await asyncio.to_thread(runner.invoke, cli.app, list(args), env=env)


async def test_a_jobs_retries_count_once_and_the_cli_lists_and_clears(
    settings: Settings, redis_url: str, model: Path
) -> None:
    """A worker's job that times out on all 3 attempts is remembered once (not refused); the
    CLI lists it (JSON and table) and clears it."""
    request = LoadRequest(
        source=str(model),
        limits=LimitOverrides(timeout_seconds=HANG_S),
        retry=RetryPolicy(max_attempts=3, base_s=0.01, max_s=0.01),
    )
    async with (
        running_worker(settings, loaders={"safetensors": "hang"}) as runner,
        Client(settings=settings) as client,
    ):
        report = await (await client.enqueue(request)).report(timeout_s=30)
        spawned = runner.supervisor.forkserver.spawned
        [held] = await client.failing_models()
    assert report.outcome is Outcome.TIMEOUT and len(report.attempts) == 3
    assert spawned == 3
    assert not held.refused and [f.job_id for f in held.failures] == [report.job_id]
    listed = await _cli("failures", "list", "--json", url=redis_url)
    assert listed.exit_code == 0, listed.output
    assert [m["identity"] for m in json.loads(listed.stdout)] == [held.identity]
    table = await _cli("failures", "list", url=redis_url)
    assert held.identity in table.stdout and "timeout (deadline)" in table.stdout
    cleared = await _cli("failures", "clear", held.identity, "--json", url=redis_url)
    assert json.loads(cleared.stdout) == {"cleared": 1}
    empty = await _cli("failures", "list", url=redis_url)
    assert empty.exit_code == 0 and "no failing models" in empty.stdout
    usage = await _cli("failures", "clear", url=redis_url)
    assert usage.exit_code == 2


async def test_the_gauge_counts_the_models_refused_now(redis: Redis, settings: Settings) -> None:
    """loadwarden_failing_models is read from Redis: models at the threshold, not below it."""
    for identity, jobs in (("file:" + "a" * 64, 2), ("file:" + "b" * 64, 1)):
        for job in range(jobs):
            await store.record(
                redis,
                identity,
                job_id=str(job),
                source="/m",
                outcome="crashed",
                error_code="signal",
                threshold=2,
                window_s=60,
            )
    registry = CollectorRegistry()
    gauges = QueueGauges(registry)
    updater = asyncio.create_task(update_queue_gauges(redis, gauges, settings, interval_s=0.05))
    try:
        await eventually(
            lambda: registry.get_sample_value("loadwarden_failing_models") == 1, 10, "gauge read"
        )
        await store.forget(redis)
        await eventually(
            lambda: registry.get_sample_value("loadwarden_failing_models") == 0, 10, "gauge clear"
        )
    finally:
        await cancel_and_wait(updater)


async def _record(redis: Redis, identity: str, job_id: str, threshold: int = 3) -> int:
    return await store.record(
        redis,
        identity,
        job_id=job_id,
        source="/m",
        outcome="crashed",
        error_code="signal",
        threshold=threshold,
        window_s=60,
    )


async def test_concurrent_records_are_counted_once_per_job_and_capped(redis: Redis) -> None:
    """Workers recording at once lose nothing; a job counts once; the newest are kept."""
    identity = "file:" + "c" * 64
    await asyncio.gather(*(_record(redis, identity, f"job-{i}") for i in range(2)))
    assert await _record(redis, identity, "job-0") == 2  # job-0's retry: still two jobs
    held = await store.read(redis, identity, 3)
    assert held is not None and not held.refused
    assert (await store.listing(redis))[0].refused is False
    counts = await asyncio.gather(
        *(_record(redis, identity, f"burst-{i}") for i in range(store.MAX_REMEMBERED + 5))
    )
    assert max(counts) == store.MAX_REMEMBERED
    held = await store.read(redis, identity, 3)
    assert held is not None and held.refused and len(held.failures) == store.MAX_REMEMBERED
    assert "job-0" not in {f.job_id for f in held.failures}  # the oldest went first
    assert (await store.listing(redis))[0].refused is True
    assert await store.forget(redis) == 1 and await store.read(redis, identity, 3) is None


async def test_the_memory_can_be_turned_off(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LOADWARDEN_FAILURE_MEMORY__ENABLED=false: the worker neither reads nor writes it."""
    monkeypatch.setenv("LOADWARDEN_FAILURE_MEMORY__ENABLED", "false")
    monkeypatch.setenv("LOADWARDEN_FAILURE_MEMORY__WINDOW_S", "60")
    off = Settings(redis_url=settings.redis_url)
    assert off.failure_memory == FailureMemoryPolicy(enabled=False, window_s=60)
    async with running_worker(off) as runner:
        assert runner.supervisor.failures is None
    async with running_worker(settings) as runner:
        assert runner.supervisor.failures is not None


async def _commands_during(redis: Redis, work: Any) -> list[str]:
    """The commands the server ran while ``work`` was awaited, as MONITOR saw them."""
    seen: list[str] = []
    async with redis.monitor() as monitor:
        await redis.echo("lw-begin")

        async def watch() -> None:
            began = False
            async for entry in monitor.listen():
                command = str(entry["command"]).split()[0].upper()
                if command == "ECHO":
                    if began:
                        return
                    began = "lw-begin" in entry["command"]
                elif began:
                    seen.append(command)

        watcher = asyncio.create_task(watch())
        await work
        await redis.echo("lw-end")
        async with asyncio.timeout(10):
            await watcher
    return seen


async def test_memory_and_history_read_in_one_transaction(
    redis: Redis, captured_events: list[dict[str, Any]]
) -> None:
    """Before a load, the failure memory and the history come back from one transaction, with
    the samples recorded since the last one written first; a key of the wrong type costs
    only its own answer."""
    policy = FailureMemoryPolicy(threshold=2)
    memory, history = FailureMemory(redis, policy), History(redis, LimitPolicy())
    log = structlog.get_logger("test")
    failed = ChildCrashed("x", code="signal")
    await memory.record("m", job_id="j1", source="s", error=failed, log=log)
    await history.record("m", 0.5, 0.1, 1000)
    found: list[Any] = []

    async def lookup() -> None:
        found.extend(await look_up("m", memory, history, log))

    assert await _commands_during(redis, lookup()) == [
        *("MULTI", "LPUSH", "LTRIM", "EXPIRE"),
        *("HGETALL", "PTTL", "LRANGE", "EXEC"),
    ]
    remembered, stats = found
    assert remembered is not None and not remembered.refused and len(remembered.failures) == 1
    assert stats is not None and stats.samples == 1
    await redis.set(History.key("n"), "not a list")
    remembered, stats = await look_up("n", memory, history, log)
    assert (remembered, stats) == (None, None)
    assert [e["event"] for e in captured_events if "unavailable" in e["event"]] == [
        "history_unavailable"
    ]
    for job_id in ("j2", "j3"):
        await memory.record("n", job_id=job_id, source="s", error=failed, log=log)
    with pytest.raises(RepeatedlyFailing):  # refused, even with its history unreadable
        await look_up("n", memory, history, log)


async def test_recorded_history_is_written_within_its_delay_or_on_close(redis: Redis) -> None:
    """A recorded sample that no read carries is written on its own within FLUSH_DELAY_S;
    close() writes what is still pending at once."""
    history = History(redis, LimitPolicy())
    await history.record("a", 0.5, 0.1, 1000)
    assert await redis.llen(History.key("a")) == 0  # queued, not written yet
    await eventually(
        lambda: redis.llen(History.key("a")), timeout_s=FLUSH_DELAY_S + 5, what="the sample"
    )
    await history.record("b", 0.5, 0.1, 1000)
    await history.close()
    assert await redis.llen(History.key("b")) == 1


async def test_a_jobs_lease_rides_in_the_look_up(redis: Redis, tmp_path: Path) -> None:
    """A job's first lease write (attempts, marker, running entry) goes in the look-up's
    transaction when the model opened on the loop; before the open, on its own, when the
    open goes to a thread (the first open under a root, a folder); and when it cannot be
    written the load stops before any inspection or child (FirstWritesFailed)."""
    from tests.checkpoints import save_pretrained, state_dict

    model = _model(tmp_path / "m.safetensors")
    folder = tmp_path / "ckpt"
    save_pretrained(folder, state_dict(), 40_000)
    settings = Settings(sources=SourcePolicy(allow_roots=(tmp_path,)))
    book = JobBook(redis, settings)
    sup = Supervisor(
        settings,
        failures=FailureMemory(redis, FailureMemoryPolicy()),
        history=History(redis, LimitPolicy()),
    )
    lease = ["SET", "SET", "ZADD"]
    reports: dict[str, LoadReport] = {}

    async def load(source: Path, job_id: str) -> None:
        async with book.lease(job_id, [], hand_over=True) as first:
            request = LoadRequest(source=str(source))
            reports[job_id] = await sup.load(request, job_id=job_id, first=first)

    async with sup:
        for source, alone in ((model, True), (model, False), (folder, True)):
            job_id = f"{source.name}-{alone}"
            commands = await _commands_during(redis, load(source, job_id))
            assert reports[job_id].outcome == Outcome.OK, reports[job_id]
            ahead = [*lease, "MULTI"] if alone else ["MULTI", *lease]
            assert commands[:4] == ahead and "HGETALL" in commands, (source.name, commands)
            assert await redis.get(ATTEMPTS_KEY_PREFIX + job_id) == b"[]"
            assert await redis.zscore(RUNNING_ZSET, job_id) is not None
        await redis.set(RUNNING_ZSET, "not a sorted set")
        with pytest.raises(FirstWritesFailed):
            await load(model, "refused")
        assert not sup.in_flight
