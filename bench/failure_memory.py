"""What a load refused by the failure memory costs, against a healthy load of the same model.

Measured in one run, ``--n`` times each (default 50), through ``Supervisor.load`` with the
failure memory on a real Redis:

* (a) baseline: a healthy load of a tiny safetensors model (open, inspect, one confined
  child, report), the cheapest load a worker runs;
* (b) refused: the same model after ``threshold`` failures were recorded for it: open,
  one Redis round trip, the report; no inspection, no child.

Also the memory's check alone on a model it does not hold (what every load pays), and
how long a model that hangs to its deadline would hold a slot instead (``--deadline-s``).
The medians' ratio is the figure to read; absolute times move with the machine's load.

Run: ``python bench/failure_memory.py [--redis URL] [--n 50] [--deadline-s 60]``
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from loadwarden.producer import failures as store
from loadwarden.producer.connection import redis_client
from loadwarden.producer.contract import LoadRequest, Outcome
from loadwarden.worker.config import FailureMemoryPolicy, Settings, SourcePolicy
from loadwarden.worker.load.failures import FailureMemory
from loadwarden.worker.load.supervisor import Supervisor
from loadwarden.worker.ops.logs import configure_logging


async def _timed(sup: Supervisor, request: LoadRequest, n: int, expect: Outcome) -> list[float]:
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        report = await sup.load(request)
        samples.append(time.perf_counter() - started)
        assert report.outcome is expect, report.error
    return samples


async def main(url: str, n: int, deadline_s: float, path: Path, digest: str) -> None:
    folder = path.parent
    settings = Settings(redis_url=url, sources=SourcePolicy(allow_roots=(folder,)))
    policy = FailureMemoryPolicy()
    redis = redis_client(url, settings.redis)
    identity = f"sha256:{digest}"
    request = LoadRequest(source=str(path), sha256=digest)
    try:
        await store.forget(redis, [identity])
        memory = FailureMemory(redis, policy)
        async with Supervisor(settings, failures=memory) as sup:
            await _timed(sup, request, 3, Outcome.OK)  # warm-up: page cache, fork server
            healthy = await _timed(sup, request, n, Outcome.OK)
            check = []
            log = sup._log  # the memory logs only on trouble
            for _ in range(n):
                started = time.perf_counter()
                await memory.admit("sha256:" + "0" * 64, log)
                check.append(time.perf_counter() - started)
            for job in range(policy.threshold):
                await store.record(
                    redis,
                    identity,
                    job_id=f"bench-{job}",
                    source=str(path),
                    outcome="timeout",
                    error_code="deadline",
                    threshold=policy.threshold,
                    window_s=policy.window_s,
                )
            spawned = sup.forkserver.spawned
            refused = await _timed(sup, request, n, Outcome.REFUSED)
            assert sup.forkserver.spawned == spawned, "a refused load started a child"
    finally:
        await store.forget(redis, [identity])
        await redis.aclose()
    a, b, c = (statistics.median(s) * 1000 for s in (healthy, refused, check))
    print(f"cores: {os.cpu_count()}, n = {n} each, medians (p95)")
    for name, samples in (
        ("(a) healthy load, one child", healthy),
        ("(b) refused by the failure memory", refused),
        ("    the memory's check alone", check),
    ):
        p95 = sorted(samples)[max(0, round(0.95 * len(samples)) - 1)] * 1000
        print(f"{name:36} {statistics.median(samples) * 1000:8.2f} ms ({p95:.2f} ms)")
    print(f"refused / healthy: {b / a:.3f}; check / healthy: {c / a:.3f}")
    times = deadline_s * 1000 / b
    print(f"a model hanging to a {deadline_s:g} s deadline holds a slot {times:,.0f}x longer")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--redis", default=os.environ.get("LOADWARDEN_REDIS_URL", "redis://127.0.0.1:6379")
    )
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--deadline-s", type=float, default=60.0)
    args = parser.parse_args()
    configure_logging("warning")
    with tempfile.TemporaryDirectory(prefix="lw-bench-") as tmp:
        model = Path(tmp) / "tiny.safetensors"
        save_file({"w": np.arange(1024, dtype=np.float32)}, str(model))
        sha256 = hashlib.sha256(model.read_bytes()).hexdigest()
        asyncio.run(main(args.redis, args.n, args.deadline_s, model, sha256))
