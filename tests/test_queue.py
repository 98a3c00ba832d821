"""Producer -> Redis -> worker -> report, over a real Redis with an in-process arq worker."""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from arq.constants import (
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
    retry_key_prefix,
)
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from loadwarden.producer import wire
from loadwarden.producer.client import Client, JobState
from loadwarden.producer.connection import redis_client
from loadwarden.producer.contract import Attempt, LoadRequest, Outcome
from loadwarden.producer.errors import JobNotFound, RedisUnavailable, ReportTimeout
from loadwarden.producer.keys import (
    CANCEL_CHANNEL,
    CANCEL_KEY_PREFIX,
    DEDUPE_KEY_PREFIX,
    RECENT_STREAM,
    RUNNING_ZSET,
    dedupe_key,
)
from loadwarden.worker._keys import ATTEMPTS_KEY_PREFIX
from loadwarden.worker._tasks import cancel_and_wait
from loadwarden.worker.config import Settings
from loadwarden.worker.queue._claim import answered, claim
from loadwarden.worker.queue.jobs import JobBook
from loadwarden.worker.queue.runner import WorkerRunner
from tests.conftest import eventually


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[Client]:
    async with Client(settings=settings) as c:
        yield c


async def test_enqueued_job_is_run_and_its_report_comes_back(
    worker_runner: WorkerRunner, client: Client, small_model: Path
) -> None:
    """A job enqueued by the client is run by a worker, and its report comes back through Redis."""
    handle = await client.enqueue(LoadRequest(source=str(small_model), labels={"team": "search"}))
    report = await handle.report(timeout_s=30)
    assert report.outcome is Outcome.OK, report.error
    assert report.job_id == handle.job_id
    assert report.worker.id == worker_runner.supervisor.info.id
    assert report.labels == {"team": "search"}
    assert report.enqueued_at is not None and report.enqueued_at <= report.started_at
    assert await handle.status() is JobState.COMPLETE


async def test_bad_file_report_comes_back_invalid(
    worker_runner: WorkerRunner, client: Client, tmp_path: Path
) -> None:
    """A malformed file's report comes back through Redis as invalid, without a child."""
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00[]")
    report = await (await client.enqueue(LoadRequest(source=str(path)))).report(timeout_s=30)
    assert report.outcome is Outcome.INVALID
    assert worker_runner.supervisor.forkserver.spawned == 0


async def test_request_that_is_not_a_load_request_is_reported_invalid(
    worker_runner: WorkerRunner, client: Client, settings: Settings
) -> None:
    """A job whose arguments are not a valid LoadRequest ends invalid with code bad_request."""
    pool = await client.redis()
    await pool.enqueue_job(
        "load",
        request={"source": 7, "evil": True},
        _job_id="planted-1",
        _queue_name=settings.queue_name,
    )
    report = await client.report("planted-1", timeout_s=30)
    assert report.outcome is Outcome.INVALID
    assert report.error is not None and report.error.code == "bad_request"


async def test_pickle_payload_is_never_executed(
    worker_runner: WorkerRunner, client: Client, settings: Settings, redis_url: str, tmp_path: Path
) -> None:
    """A planted pickle job is refused and dead-lettered by the JSON deserializer, never run."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[object, ...]:
            return (Path.touch, (marker,))

    raw = redis_client(redis_url)
    payload = pickle.dumps({"t": 1, "f": "load", "a": [Evil()], "k": {}, "et": 0})
    await raw.set(job_key_prefix + "planted-2", payload)
    await raw.zadd(settings.queue_name, {"planted-2": time.time() * 1000})
    await raw.aclose()
    report = await client.report("planted-2", timeout_s=30)
    assert report.outcome is Outcome.INVALID
    assert report.error is not None and report.error.code == "bad_payload"
    assert not marker.exists()
    dead = await client.dead_letters()
    assert [d.job_id for d in dead] == ["planted-2"] and dead[0].request is None


async def test_unknown_job_and_report_timeout(client: Client) -> None:
    """An unknown id raises JobNotFound; a job with no worker raises ReportTimeout in time."""
    with pytest.raises(JobNotFound):
        await client.report("no-such-job", timeout_s=5)
    handle = await client.enqueue(LoadRequest(source="/nowhere.safetensors"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ReportTimeout):
        await handle.report(timeout_s=0.3)
    assert loop.time() - started < 2
    assert await handle.status() is JobState.QUEUED
    status = await client.status()
    assert (status.queued, status.running, status.workers_alive) == (1, 0, False)


async def test_unreachable_redis_is_a_clear_error(tmp_path: Path) -> None:
    """A client whose Redis does not answer raises RedisUnavailable quickly instead of hanging."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(RedisUnavailable, match="cannot reach Redis"):
        await Client(f"unix://{tmp_path}/no.sock").connect()
    assert loop.time() - started < 6


def test_client_without_configuration_says_what_is_missing() -> None:
    """A client with no URL and no LOADWARDEN_REDIS_URL says how to configure one."""
    with pytest.raises(RedisUnavailable, match="LOADWARDEN_REDIS_URL"):
        Client(settings=Settings(redis_url=None))


def test_wire_round_trip_of_a_report_through_arq_format(small_model: Path) -> None:
    """The worker's result document is plain JSON our deserializer accepts."""
    document = {"t": 1, "s": True, "r": {"outcome": "ok"}, "id": "x"}
    assert wire.loads(wire.dumps(document)) == document


async def test_bookkeeping_that_raises_before_sending_keeps_the_report(
    worker_runner: WorkerRunner,
    client: Client,
    small_model: Path,
    captured_events: list[dict[str, object]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Bookkeeping that fails while it is being built (in Python, before anything is sent)
    is logged and dropped: the report is still stored and pushed, arq's transaction runs."""

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("bookkeeping broke")

    monkeypatch.setattr(JobBook, "finish_on", broken)
    handle = await client.enqueue(LoadRequest(source=str(small_model)))
    report = await handle.report(timeout_s=30)
    assert report.outcome is Outcome.OK, report.error
    redis = await client.redis()
    assert await redis.exists(result_key_prefix + handle.job_id) == 1
    assert await redis.exists(job_key_prefix + handle.job_id) == 0
    failed = [e for e in captured_events if e["event"] == "job_bookkeeping_failed"]
    assert failed and "bookkeeping broke" in str(failed[0]["error"])


async def test_the_bookkeeping_ends_with_the_result_and_cannot_spoil_it(
    worker_runner: WorkerRunner,
    client: Client,
    small_model: Path,
    captured_events: list[dict[str, object]],
) -> None:
    """A finished job's bookkeeping lands with its stored result; a key of ours holding the
    wrong type costs that one write (logged), never the report or the rest."""
    redis = await client.redis()
    await redis.set(RECENT_STREAM, b"not a stream")  # XADD answers WRONGTYPE
    request = LoadRequest(source=str(small_model))
    handle = await client.enqueue(request)
    report = await handle.report(timeout_s=30)
    assert report.outcome is Outcome.OK, report.error
    keys = (ATTEMPTS_KEY_PREFIX + handle.job_id, DEDUPE_KEY_PREFIX + dedupe_key(request))
    assert await redis.exists(*keys) == 0
    assert await redis.zscore(RUNNING_ZSET, handle.job_id) is None
    # Logged once the transaction has answered, which may be after the push woke us.
    failed = await eventually(
        lambda: [e for e in captured_events if e["event"] == "job_bookkeeping_failed"],
        what="the failed write logged",
    )
    assert [e["job_id"] for e in failed] == [handle.job_id], failed


async def test_a_run_begins_with_what_its_claim_read_and_later_cancels(
    settings: Settings,
) -> None:
    """``begin`` answers from the claim's read (attempts, cancel flag) without reading Redis
    again, and a cancel that comes after that read still counts: the job's cancels are
    followed from before it (``LoadWorker`` registers the event before its claim)."""
    assert settings.redis_url
    redis = redis_client(settings.redis_url, settings.redis)
    book = JobBook(redis, settings)
    watcher = asyncio.create_task(book.watch_cancels())
    try:
        earlier = Attempt.model_validate(
            {
                "number": 1,
                "outcome": "crashed",
                "error_code": "worker_lost",
                "worker": "w",
                "started_at": "2026-01-01T00:00:00Z",
                "finished_at": "2026-01-01T00:00:01Z",
            }
        )
        raw = b"[" + earlier.model_dump_json().encode() + b"]"
        book.cancel_event("quiet")
        book.begun("quiet", raw, cancelled=False)
        assert await book.begin("quiet") == ([earlier], False)  # Redis holds no attempts

        event = book.cancel_event("late")  # before the claim, as LoadWorker does
        book.begun("late", None, cancelled=False)  # the claim saw no flag
        async with redis.pipeline(transaction=True) as pipe:  # a producer's cancel
            pipe.set(CANCEL_KEY_PREFIX + "late", "1", ex=60)
            pipe.publish(CANCEL_CHANNEL, "late")
            await pipe.execute()
        async with asyncio.timeout(10):
            await event.wait()
        assert await book.begin("late") == ([], True)
    finally:
        watcher.cancel()
        await asyncio.wait({watcher})
        await redis.delete(CANCEL_KEY_PREFIX + "late")
        await redis.aclose()


async def test_a_lease_renews_on_its_interval_and_stops_with_the_attempt(
    settings: Settings,
) -> None:
    """A lease writes the marker and the running entry anew every ``lease_renew_s`` (the
    first one interval in), and nothing of it runs once the attempt leaves it."""
    assert settings.redis_url
    quick = settings.model_copy(update={"lease_s": 5.0, "lease_renew_s": 0.05})
    redis = redis_client(quick.redis_url or "", quick.redis)
    book = JobBook(redis, quick)
    marker = in_progress_key_prefix + "leased"
    try:
        async with book.lease("leased", []):
            first = await redis.zscore(RUNNING_ZSET, "leased")
            assert first is not None and await redis.exists(marker)
            await redis.delete(marker)  # as a failover that lost it
            await eventually(lambda: redis.exists(marker), 5, "the marker written back")
            later = await redis.zscore(RUNNING_ZSET, "leased")
            assert later is not None and later > first
        names = {task.get_name() for task in asyncio.all_tasks()}
        assert "loadwarden-lease-leased" not in names
    finally:
        await redis.delete(marker, ATTEMPTS_KEY_PREFIX + "leased")
        await redis.zrem(RUNNING_ZSET, "leased")
        await redis.aclose()


async def test_a_claim_makes_the_runs_first_read_for_arq(settings: Settings) -> None:
    """The claim GETs the job and counts its try once; in the run's task arq's first
    transaction is answered from that (no second count), and only there, only once. A try
    counter that cannot count leaves arq's transaction to Redis, as before."""
    assert settings.redis_url
    redis = redis_client(settings.redis_url, settings.redis)
    queue, payload = "lw-test-queue", b'{"t":1}'
    try:
        for job_id in ("fine", "odd"):
            await redis.set(job_key_prefix + job_id, payload)
            await redis.zadd(queue, {job_id: 1})
        await redis.set(retry_key_prefix + "odd", "x")  # INCR answers an error
        fine = await claim(redis, queue, "fine", 60_000)
        odd = await claim(redis, queue, "odd", 60_000)
        assert fine is not None and fine.first_read is not None
        assert odd is not None and odd.first_read is None
        assert await redis.get(retry_key_prefix + "fine") == b"1"
        assert await redis.get(retry_key_prefix + "odd") == b"x"  # nothing counted
        assert answered(redis) is redis  # not in a run's task

        async def first_read(job_id: str) -> tuple[list[object], object]:
            async with answered(redis).pipeline(transaction=True) as pipe:
                pipe.get(job_key_prefix + job_id)
                pipe.incr(retry_key_prefix + job_id)
                pipe.expire(retry_key_prefix + job_id, 88400)
                answers = await pipe.execute()
            return answers, answered(redis)

        answers, after = await fine.start(first_read("fine"))
        assert answers == [payload, 1, True] and after is redis  # taken once
        assert await redis.get(retry_key_prefix + "fine") == b"1"  # not counted twice
        assert 0 < await redis.ttl(retry_key_prefix + "fine") <= 88400
        with pytest.raises(ResponseError):  # arq's own transaction, as before
            await odd.start(first_read("odd"))
    finally:
        for job_id in ("fine", "odd"):
            keys = (job_key_prefix, retry_key_prefix, in_progress_key_prefix)
            await redis.delete(*(prefix + job_id for prefix in keys))
        await redis.delete(queue)
        await redis.aclose()


def _book_of(runner: WorkerRunner) -> JobBook:
    """The running worker's JobBook (where its claims register cancel listeners)."""
    assert runner.arq is not None
    book = runner.arq._worker._book  # type: ignore[attr-defined]
    assert isinstance(book, JobBook)
    return book


def _listening(book: JobBook, job_id: str) -> bool:
    return job_id in book._cancel_events  # type: ignore[attr-defined]


@contextlib.asynccontextmanager
async def _monitored(redis_url: str) -> AsyncIterator[list[tuple[str, str]]]:
    """Every command Redis runs meanwhile, as (client type: tcp or lua, command), in order:
    Redis's own MONITOR, which shows the commands a script runs as the lua client's."""
    seen: list[tuple[str, str]] = []
    redis = redis_client(redis_url)
    ready = asyncio.Event()

    async def follow() -> None:
        async with redis.monitor() as monitor:
            ready.set()
            async for command in monitor.listen():
                seen.append((command["client_type"], command["command"]))

    task = asyncio.create_task(follow())
    try:
        async with asyncio.timeout(5):
            await ready.wait()
        yield seen
        # MONITOR shows commands in the order Redis ran them: once this one shows, all
        # of those before it have.
        end = f"ECHO monitored-{id(seen)}"
        await redis.echo(end.split()[1])
        await eventually(lambda: ("tcp", end) in seen, what="the monitor caught up")
    finally:
        await cancel_and_wait(task)
        await redis.aclose()


async def test_a_wrong_typed_attempts_key_ends_its_job_in_a_report_and_the_worker_serves_on(
    worker_runner: WorkerRunner,
    client: Client,
    small_model: Path,
    captured_events: list[dict[str, object]],
) -> None:
    """A job whose attempts key a producer planted with the wrong type ends in a classified
    report (the claim leaves that read to the run), not in an error out of the claim that
    would take the worker's main loop down; the same worker then serves the next job."""
    redis = await client.redis()
    arq = worker_runner.arq
    await redis.rpush(ATTEMPTS_KEY_PREFIX + "poison", "x")
    poisoned = await client.enqueue(LoadRequest(source=str(small_model)), job_id="poison")
    report = await poisoned.report(timeout_s=20)
    assert report.error is not None, report
    assert (report.outcome, report.error.code) == (Outcome.CRASHED, "internal_error"), report
    assert "WRONGTYPE" in report.error.message, report.error
    following = await client.enqueue(LoadRequest(source=str(small_model), labels={"n": "2"}))
    assert (await following.report(timeout_s=20)).outcome is Outcome.OK
    assert worker_runner.arq is arq  # never rebuilt: Redis was not taken for lost
    assert not [e for e in captured_events if e["event"] == "redis_lost"]
    assert not _listening(_book_of(worker_runner), "poison")


async def test_a_claim_that_starts_no_run_leaves_no_listener_and_gives_its_slot_back(
    worker_runner: WorkerRunner,
    client: Client,
    small_model: Path,
    redis_url: str,
    captured_events: list[dict[str, object]],
) -> None:
    """A claim that starts no run drops the cancel listener it registered before it: one
    answering nil (the job's in-progress marker set: running elsewhere), and one Redis
    answers with an error (out of memory: its PSETEX refused), which is arq's failed
    claim: the slot back, the job still queued, the worker's loop alive; the job runs
    once Redis takes writes again."""
    redis = await client.redis()
    arq = worker_runner.arq
    assert arq is not None
    worker = arq._worker  # type: ignore[attr-defined]
    book = _book_of(worker_runner)
    await redis.set(in_progress_key_prefix + "elsewhere", b"1", px=60_000)
    async with _monitored(redis_url) as seen:
        await client.enqueue(LoadRequest(source=str(small_model)), job_id="elsewhere")
        await eventually(
            lambda: any(
                c.startswith("EVALSHA") and in_progress_key_prefix + "elsewhere" in c
                for _, c in seen
            ),
            what="a claim of the job running elsewhere",
        )
    await redis.zrem(worker.queue_name, "elsewhere")  # no claim of it after this
    await eventually(lambda: not _listening(book, "elsewhere"), what="its listener dropped")

    worker.allow_pick_jobs = False  # the job goes in while Redis still takes writes
    handle = await client.enqueue(LoadRequest(source=str(small_model), labels={"n": "2"}))
    max_memory = (await redis.config_get("maxmemory"))["maxmemory"]
    refused = await _refused_writes(redis)
    await redis.config_set("maxmemory", 1)
    try:
        worker.allow_pick_jobs = True
        await eventually(lambda: _refused_writes(redis, more_than=refused), what="a refused claim")
        # Another claim may be on its way (listening until it fails): none stays.
        await eventually(lambda: not _listening(book, handle.job_id), what="no listener")
        # More refused claims than slots (Redis counts them): were each to keep its slot,
        # the last would find none.
        await eventually(
            lambda: _refused_writes(redis, more_than=refused + worker.max_jobs),
            what="more refused claims than slots",
        )
    finally:
        await redis.config_set("maxmemory", max_memory)
    assert (await handle.report(timeout_s=20)).outcome is Outcome.OK
    assert worker_runner.arq is arq  # never rebuilt: Redis was not taken for lost
    assert not [e for e in captured_events if e["event"] == "redis_lost"]
    failed = [e for e in captured_events if e["event"] == "job_claim_failed"]
    assert failed[0]["job_id"] == handle.job_id and "maxmemory" in str(failed[0]["error"])


async def _refused_writes(redis: Redis, more_than: int = -1) -> int:
    """How many scripts (EVALSHA: claims, while no enqueue runs) Redis failed, when more
    than ``more_than`` (else 0)."""
    stats = (await redis.info("commandstats")).get("cmdstat_evalsha", {})
    count = int(stats.get("failed_calls", 0))
    return count if count > more_than else 0


async def test_a_run_begins_with_what_its_claim_read(
    worker_runner: WorkerRunner, client: Client, small_model: Path, redis_url: str
) -> None:
    """A job's run reads its attempts and cancel flag only inside its claim's script: no
    round trip of its own for them (JobBook.begin answers from the claim's read)."""
    attempts_key, cancel_key = ATTEMPTS_KEY_PREFIX + "read", CANCEL_KEY_PREFIX + "read"
    async with _monitored(redis_url) as seen:
        handle = await client.enqueue(LoadRequest(source=str(small_model)), job_id="read")
        assert (await handle.report(timeout_s=20)).outcome is Outcome.OK
    reads = [(t, c) for t, c in seen if c in (f"GET {attempts_key}", f"EXISTS {cancel_key}")]
    assert reads == [("lua", f"GET {attempts_key}"), ("lua", f"EXISTS {cancel_key}")], reads
