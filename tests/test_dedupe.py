"""Idempotent enqueue under contention: the same request from many producers at once is one job."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from loadwarden.producer.client import Client
from loadwarden.producer.contract import LoadRequest

#: A producer process: enqueue argv[2] (a LoadRequest as JSON) argv[3] times at once once
#: the file argv[4] exists; print the job ids as a JSON list.
PRODUCER = """
import asyncio, json, os, sys, time
from loadwarden.producer.client import Client
from loadwarden.producer.contract import LoadRequest

async def main():
    request = LoadRequest.model_validate_json(sys.argv[2])
    async with Client(sys.argv[1]) as client:
        await client.redis()
        print("ready", flush=True)
        gun = time.monotonic() + 30  # the starting gun, shared by every producer; bounded
        while not os.path.exists(sys.argv[4]):
            if time.monotonic() > gun:
                sys.exit("no starting gun within 30 s")
            time.sleep(0.001)
        handles = await asyncio.gather(*(client.enqueue(request) for _ in range(int(sys.argv[3]))))
    print(json.dumps([h.job_id for h in handles]))

asyncio.run(main())
"""


async def test_concurrent_coroutines_make_one_job(redis_url: str) -> None:
    """50 coroutines, each with its own connection, enqueue one request at once: one job."""
    request = LoadRequest(source="/models/a.safetensors")
    clients = [await Client(redis_url).connect() for _ in range(50)]
    try:
        handles = await asyncio.gather(*(c.enqueue(request) for c in clients))
        status = await clients[0].status()
    finally:
        for client in clients:
            await client.close()
    assert len({h.job_id for h in handles}) == 1
    assert status.ready == 1


def test_concurrent_processes_make_one_job(redis_url: str, tmp_path: Path) -> None:
    """Four producer processes enqueue one request 20 times each at the same moment: one job."""
    request = LoadRequest(source="/models/b.safetensors", labels={"x": "y"}).model_dump_json()
    gun = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PRODUCER, redis_url, request, "20", str(gun)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        gun.touch()
        ids: set[str] = set()
        for proc in procs:
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0
            ids |= set(json.loads(out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert len(ids) == 1


async def test_a_finished_job_does_not_hold_its_request(redis_url: str) -> None:
    """Once a request's job has no job key any more (it finished), the same request is new work."""
    request = LoadRequest(source="/models/c.safetensors")
    async with Client(redis_url) as client:
        first = await client.enqueue(request)
        redis = await client.redis()
        await redis.delete(f"arq:job:{first.job_id}")  # what arq does once the job ends
        await redis.zrem(client.queue_name, first.job_id)
        second = await client.enqueue(request)
    assert first.job_id != second.job_id


async def test_a_callers_id_is_one_job_in_one_round_trip(redis_url: str) -> None:
    """A caller's job id: enqueued with its wake token in one command; the id again, whether
    its job waits or has a result, writes nothing."""
    request = LoadRequest(source="/models/d.safetensors")
    async with Client(redis_url) as client:
        redis = await client.redis()
        await client.enqueue(request, job_id="warm-up")  # loads the script
        await redis.config_resetstat()
        handle = await client.enqueue(request, job_id="mine")
        calls = {k: v["calls"] for k, v in (await redis.info("commandstats")).items()}
        stored = await redis.get("arq:job:mine")
        again = await client.enqueue(LoadRequest(source="/models/other.safetensors"), job_id="mine")
        await redis.set("arq:result:done", b"{}")
        after_result = await client.enqueue(request, job_id="done")
        unchanged = await redis.get("arq:job:mine")
        queued = await redis.zrange(client.queue_name, 0, -1)
        tokens = await redis.llen(f"{client.queue_name}:wake")
    assert handle.job_id == again.job_id == "mine" and after_result.job_id == "done"
    # The script's own commands count too (EXISTS, SET, ...): arq's path would add these.
    assert calls["cmdstat_evalsha"] == 1, calls
    assert not {"cmdstat_watch", "cmdstat_multi", "cmdstat_exec", "cmdstat_psetex"} & set(calls)
    assert stored is not None and b"/models/d.safetensors" in stored and unchanged == stored
    assert sorted(queued) == [b"mine", b"warm-up"]  # "done" had a result: not queued again
    assert tokens == 2  # one per job enqueued


async def test_a_job_expires_as_its_pool_says(redis_url: str) -> None:
    """Both enqueue scripts give the job key the pool's ``expires_extra_ms`` (arq's rule),
    not arq's default constant: a pool told to expire jobs sooner gets that."""
    from arq.constants import job_key_prefix

    async with Client(redis_url) as client:
        pool = await client.redis()
        pool.expires_extra_ms = 60_000  # arq's default is a day
        by_id = await client.enqueue(LoadRequest(source="/m/a.safetensors"), job_id="expiring")
        deduped = await client.enqueue(LoadRequest(source="/m/b.safetensors"))
        for handle in (by_id, deduped):
            ttl_ms = await pool.pttl(job_key_prefix + handle.job_id)
            assert 0 < ttl_ms <= 60_000, (handle.job_id, ttl_ms)
