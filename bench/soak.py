"""Soak: many tiny loads through one worker; does the supervisor stay flat?

    python bench/soak.py [--jobs 10000] [--concurrency 2]

Starts a private Valkey and one in-process worker (the real arq worker, fork
server and sandbox), enqueues N loads of a 1 KiB model, and waits for every
report. Prints the supervisor's RSS and open descriptors after a warm-up and at
the end (the goal: flat within 5%), and jobs per second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from safetensors.numpy import save_file

from loadwarden.producer.client import Client
from loadwarden.producer.contract import LoadRequest
from loadwarden.worker.config import Settings, SourcePolicy
from loadwarden.worker.ops.logs import configure_logging
from loadwarden.worker.queue._redis_server import RedisServer
from loadwarden.worker.queue.runner import WorkerRunner

#: Loads before the first figures: connection pools and caches reach their steady size.
WARMUP = 1000


def _figures() -> tuple[int, int]:
    me = psutil.Process()
    return me.memory_info().rss, me.num_fds()


async def _run_batch(client: Client, source: str, start: int, count: int) -> None:
    ids = []
    for i in range(start, start + count):
        ids.append((await client.enqueue(LoadRequest(source=source, labels={"n": str(i)}))).job_id)
    for job_id in ids:  # each report is already there or on its way: wait for it
        report = await client.report(job_id, timeout_s=120)
        assert report.ok, report.error


async def main(jobs: int, concurrency: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="lw-soak-") as tmp, RedisServer() as server:
        folder = Path(tmp)
        model = folder / "tiny.safetensors"
        save_file({"w": np.ones((16, 16), dtype=np.float32)}, str(model))
        settings = Settings(
            redis_url=server.url,
            concurrency=concurrency,
            sources=SourcePolicy(allow_roots=(folder,)),
        )
        runner = WorkerRunner(settings, handle_signals=False)
        task = asyncio.create_task(runner.run())
        await asyncio.wait_for(runner.started.wait(), 60)
        async with Client(settings=settings) as client:
            await _run_batch(client, str(model), 0, WARMUP)
            rss0, fds0 = _figures()
            t0 = time.perf_counter()
            done = WARMUP
            trace = [(0, rss0, fds0)]
            while done < WARMUP + jobs:
                step = min(500, WARMUP + jobs - done)
                await _run_batch(client, str(model), done, step)
                done += step
                trace.append((done - WARMUP, *_figures()))
            elapsed = time.perf_counter() - t0
            rss1, fds1 = _figures()
        runner.stop()
        runner.stop()
        await task
    return {
        "bench": "soak",
        "jobs": jobs,
        "concurrency": concurrency,
        "jobs_per_s": round(jobs / elapsed, 1),
        "rss_start_bytes": rss0,
        "rss_end_bytes": rss1,
        "rss_ratio_end_to_start": round(rss1 / rss0, 4),
        "fds_start": fds0,
        "fds_end": fds1,
        "flat_within_5pct": rss1 <= rss0 * 1.05 and fds1 <= fds0 * 1.05,
        "trace": [{"jobs": j, "rss_bytes": r, "fds": f} for j, r, f in trace],
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args()
    configure_logging("warning")
    result = asyncio.run(main(args.jobs, args.concurrency))
    print(
        f"{result['jobs']} loads at concurrency {result['concurrency']}: "
        f"{result['jobs_per_s']} jobs/s; supervisor RSS {result['rss_start_bytes'] / 2**20:.1f} -> "
        f"{result['rss_end_bytes'] / 2**20:.1f} MiB (x{result['rss_ratio_end_to_start']}), "
        f"fds {result['fds_start']} -> {result['fds_end']}: "
        f"{'FLAT' if result['flat_within_5pct'] else 'NOT FLAT'} (goal: within 5%)"
    )
    print(json.dumps(result))
