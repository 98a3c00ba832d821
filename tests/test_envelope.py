"""Planted jobs: whatever a job's envelope or keys hold, the worker reports, dead-letters, goes on.

Every case is written to Redis by hand (as an attacker with queue access would) and
run by a real ``loadwarden`` worker process.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from loadwarden.producer.client import Client
from loadwarden.producer.contract import LoadRequest, Outcome
from tests.conftest import StartWorker

#: A job key's content, or a callable that plants the job's keys itself.
Plant = bytes | Callable[[redis.Redis, str, str, bytes], None]


def _doc(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def _good(request: dict[str, object], **override: object) -> bytes:
    envelope: dict[str, object] = {"t": 1, "f": "load", "a": [], "k": {"request": request}}
    envelope["et"] = int(time.time() * 1000)
    envelope.update(override)
    return json.dumps({k: v for k, v in envelope.items() if v is not _MISSING}).encode()


_MISSING = object()


def _hash_job(r: redis.Redis, queue: str, job_id: str, good: bytes) -> None:
    r.hset(f"arq:job:{job_id}", "f", "load")  # GET answers WRONGTYPE


def _retry_key(value: str | None, kind: str = "string") -> Callable[..., None]:
    def plant(r: redis.Redis, queue: str, job_id: str, good: bytes) -> None:
        r.set(f"arq:job:{job_id}", good)
        if kind == "list":
            r.rpush(f"arq:retry:{job_id}", "1")
        else:
            r.set(f"arq:retry:{job_id}", value or "")

    return plant


#: Envelopes (as the bytes of arq:job:<id>) that must each end invalid / bad_payload.
BAD_ENVELOPES: dict[str, Callable[[dict[str, object]], Plant]] = {
    "t_string": lambda q: _good(q, t="x", et=1),
    "t_float_huge": lambda q: _good(q, t=1e300),
    "t_bool": lambda q: _good(q, t=True),
    "t_int_huge": lambda q: _good(q, t=10**30),
    "t_negative": lambda q: _good(q, t=-5),
    "f_list": lambda q: _good(q, f=["load"]),
    "f_object": lambda q: _good(q, f={}),
    "f_null": lambda q: _good(q, f=None),
    "f_other_function": lambda q: _good(q, f="shutdown"),
    "a_string": lambda q: _good(q, a="x"),
    "a_positional": lambda q: _good(q, a=[q, 2]),
    "a_object": lambda q: _good(q, a={"x": 1}),
    "k_list": lambda q: _good(q, k=[]),
    "k_null": lambda q: _good(q, k=None),
    "k_request_not_object": lambda q: _good(q, k={"request": "x"}),
    "k_ctx_clash": lambda q: _good(q, k={"request": q, "ctx": 1}),
    "et_string": lambda q: _good(q, et="x"),
    "et_float_huge": lambda q: _good(q, et=1e300),
    "et_float": lambda q: _good(q, et=1.5),
    "et_negative": lambda q: _good(q, et=-(10**20)),
    "et_past_year_9999": lambda q: _good(q, et=10**20),
    "et_bool": lambda q: _good(q, et=True),
    "et_missing": lambda q: _good(q, et=_MISSING),
    "top_level_array": lambda q: b"[]",
    "top_level_number": lambda q: b"1" * 5000,  # past sys.int_info's digit limit
    "nested_deeply": lambda q: b'{"t":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "not_utf8": lambda q: b"\xff\xfe{}",
    "oversized": lambda q: _good({**q, "labels": {"x": "y" * (2 << 20)}}),
    "job_key_is_a_hash": lambda q: _hash_job,
    "retry_key_not_a_number": lambda q: _retry_key("x"),
    "retry_key_is_a_list": lambda q: _retry_key(None, kind="list"),
}


def test_an_oversized_job_is_refused_before_it_is_parsed() -> None:
    """A 60 MiB job document becomes a marker without being decoded: bounded time and memory."""
    import tracemalloc

    from loadwarden.worker.queue.envelope import MAX_JOB_BYTES, job_deserializer

    payload = _good({"source": "/m.safetensors", "labels": {"x": "[" * (60 << 20)}})
    tracemalloc.start()
    try:
        document = job_deserializer(payload)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "exceeds" in document["k"]["request"]["__undecodable__"]
    assert peak < MAX_JOB_BYTES, f"the refusal itself allocated {peak} bytes"


@pytest.mark.parametrize("case", sorted(BAD_ENVELOPES))
def test_deserializer_turns_every_bad_envelope_into_a_marker(case: str) -> None:
    """The deserializer never raises and hands arq only envelopes of the exact shape it reads."""
    from loadwarden.worker.queue.envelope import job_deserializer

    planted = BAD_ENVELOPES[case]({"source": "/m.safetensors"})
    if callable(planted):
        pytest.skip("this case plants keys, not an envelope")
    document = job_deserializer(planted)
    assert document["f"] == "load" and document["a"] == [] and document["et"] == 0
    assert "__undecodable__" in document["k"]["request"]


async def test_planted_jobs_end_in_reports_and_the_worker_goes_on(
    start_worker: StartWorker, redis_url: str, small_model: Path
) -> None:
    """Each planted job ends with a classified report and a dead letter; the worker survives."""
    worker = start_worker(redis_url, concurrency=4, lease_s=2, lease_renew_s=0.5)
    request = {"source": str(small_model)}
    good = _good(request)
    r = redis.Redis.from_url(redis_url)
    queue = "loadwarden:queue"
    now = time.time() * 1000
    for case, make in BAD_ENVELOPES.items():
        planted = make(request)
        if callable(planted):
            planted(r, queue, case, good)
        else:
            r.set(f"arq:job:{case}", planted)
        r.zadd(queue, {case: now})
    # A marker no worker wrote (no expiry) must not hold its job forever.
    r.set("arq:job:stray-marker", good)
    r.set("arq:in-progress:stray-marker", b"1")
    r.zadd(queue, {"stray-marker": now})
    r.close()
    async with Client(redis_url) as client:
        reports = {c: await client.report(c, timeout_s=60) for c in BAD_ENVELOPES}
        stray = await client.report("stray-marker", timeout_s=30)
        after = await (await client.enqueue(LoadRequest(source=str(small_model)))).report(
            timeout_s=30
        )
        dead = {d.job_id for d in await client.dead_letters(count=1000)}
    outcomes = {
        c: (str(rep.outcome), rep.error.code if rep.error else None) for c, rep in reports.items()
    }
    for case, (outcome, code) in outcomes.items():
        assert (outcome, code) == ("invalid", "bad_payload"), (case, outcomes)
    assert dead >= set(BAD_ENVELOPES)
    assert stray.outcome is Outcome.OK and after.outcome is Outcome.OK
    assert worker.poll() is None, worker.log_path.read_text()[-3000:]  # type: ignore[attr-defined]
