"""Tiny loads: ``loadwarden worker`` on its defaults against a plain arq worker, in one run.

    python bench/tiny.py [--rounds 3] [--jobs 300] [--paced 120] [--rate 40]
                         [--redis URL] [--worker-arg=--concurrency=10 ...] [--json]

Two sides, each a worker process of its own, run interleaved (A, B, A, B, ...)
against one Redis (a private server unless ``--redis`` names one; its database is
flushed between runs):

* baseline: a plain arq worker (poll 10 ms, max_jobs 10) whose job runs one
  no-op child from a fork server that preloaded numpy and safetensors
  (``bench/_arq_baseline.py``);
* loadwarden: ``loadwarden worker`` on its defaults (plus ``--worker-arg``s),
  loading a 1 KiB safetensors model per job.

Each run: warm-up jobs, then a backlog (``--jobs`` enqueued at once: jobs/s from
the first enqueue to the last finish), then ``--paced`` jobs at ``--rate`` per
second (enqueue -> finish from the stored results' own timestamps, p50/p99; for
loadwarden also as the caller sees it, ``enqueue()`` called -> ``report()``
returned, and that minus the same job's own enqueue -> finish: the caller's gap),
then ``--idle-s`` of nothing. The worker process's own CPU (user +
system, not its children's) is read per backlog job and while idle; per backlog job
also with its children's (fork server, load children), and with the private Redis's and
this process's own (enqueueing, waiting) besides: all the CPU a job costs the machine.
A backlog of tiny jobs is CPU bound on a small machine, so the run ends with what 1.5x
the baseline's jobs/s allows a job on this many CPUs, beside the floor any fresh
process per job pays: the fork server's image forked and exiting at once.
Medians over the rounds; p99 is nearest-rank. The goals (issue 13) are printed
with whether this run met them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from arq.connections import ArqRedis, RedisSettings, create_pool
from safetensors.numpy import save_file

from loadwarden.producer.client import Client
from loadwarden.producer.contract import LoadRequest
from loadwarden.worker.config import Settings
from loadwarden.worker.queue._redis_server import RedisServer

HERE = Path(__file__).resolve().parent
WARMUP_JOBS = 20
BASELINE_QUEUE = "bench:arq"
#: The baseline worker, imported by name (see bench/_arq_baseline.py for why).
BASELINE_MAIN = "import sys, _arq_baseline; _arq_baseline.main(*sys.argv[1:])"

Sample = dict[str, float]


def _p(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def _tree_cpu_s(process: psutil.Process) -> float:
    """A worker's CPU with all its descendants': the fork server and the load children it
    reaped (their time is in its children's figures once reaped; one still waiting for a
    spec is counted when it is)."""
    total = 0.0
    for member in (process, *process.children(recursive=True)):
        try:
            times = member.cpu_times()
        except psutil.NoSuchProcess:  # gone since the listing: counted by its parent
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


#: What any fresh process per job pays at least: the fork server's image (its preload
#: imported) forked, and the child exiting at once; CPU of both, per fork.
FORK_FLOOR = """
import os, resource, sys
import loadwarden.worker.sandbox._child  # what the fork server preloads
def cpu(who):
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime
n = int(sys.argv[1])
before = cpu(resource.RUSAGE_SELF) + cpu(resource.RUSAGE_CHILDREN)
for _ in range(n):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
after = cpu(resource.RUSAGE_SELF) + cpu(resource.RUSAGE_CHILDREN)
print((after - before) / n * 1000)
"""


def _fork_floor_ms(forks: int = 300) -> float:
    out = subprocess.run(
        [sys.executable, "-c", FORK_FLOOR, str(forks)], capture_output=True, check=True, text=True
    )
    return float(out.stdout)


def _ms(stamp: datetime) -> float:
    return stamp.timestamp() * 1000


class Side:
    """One worker under test: start it, enqueue to it, read its finished jobs' timestamps."""

    name: str

    def __init__(self, url: str, folder: Path) -> None:
        self.url = url
        self.folder = folder
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> psutil.Process:
        raise NotImplementedError

    async def enqueue(self) -> str:
        raise NotImplementedError

    async def finished(self, job_ids: list[str]) -> dict[str, tuple[float, float]]:
        """Job id -> (enqueued ms, finished ms) of those done."""
        raise NotImplementedError

    async def wait(
        self, job_ids: list[str], timeout_s: float = 300
    ) -> dict[str, tuple[float, float]]:
        """Wait until every job has a result (one cheap EXISTS per look: the bench shares the
        CPU with the worker), then read their timestamps."""
        redis = await self._redis()
        keys = [f"arq:result:{j}" for j in job_ids]
        deadline = time.monotonic() + timeout_s
        while (count := await redis.exists(*keys)) < len(keys):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: {count}/{len(job_ids)} jobs done")
            await asyncio.sleep(0.05)
        return await self.finished(job_ids)

    async def _redis(self) -> Any:
        raise NotImplementedError

    async def waiter(self, job_id: str) -> float:
        """Wait for one job as a caller would; the monotonic time it returned."""
        raise NotImplementedError

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    async def close(self) -> None:
        pass


class Baseline(Side):
    name = "arq baseline"

    def __init__(self, url: str, folder: Path) -> None:
        super().__init__(url, folder)
        self.pool: ArqRedis | None = None

    def start(self) -> psutil.Process:
        self.process = subprocess.Popen(
            [sys.executable, "-c", BASELINE_MAIN, self.url, BASELINE_QUEUE],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=HERE,
        )
        assert self.process.stdout is not None
        if self.process.stdout.readline().strip() != b"ready":
            raise RuntimeError("the baseline worker did not start")
        return psutil.Process(self.process.pid)

    async def _pool(self) -> ArqRedis:
        if self.pool is None:
            self.pool = await create_pool(
                RedisSettings.from_dsn(self.url),
                job_serializer=lambda o: json.dumps(o).encode(),
                job_deserializer=json.loads,
                default_queue_name=BASELINE_QUEUE,
            )
        return self.pool

    async def _redis(self) -> Any:
        return await self._pool()

    async def enqueue(self) -> str:
        job = await (await self._pool()).enqueue_job("noop", _job_id=uuid.uuid4().hex)
        assert job is not None
        return job.job_id

    async def finished(self, job_ids: list[str]) -> dict[str, tuple[float, float]]:
        pool = await self._pool()
        raw = await pool.mget([f"arq:result:{j}" for j in job_ids])
        found = {}
        for job_id, value in zip(job_ids, raw, strict=True):
            if value is not None:
                doc = json.loads(value)
                assert doc["s"], doc
                found[job_id] = (float(doc["et"]), float(doc["ft"]))
        return found

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.aclose()
            self.pool = None


class Loadwarden(Side):
    name = "loadwarden"

    def __init__(self, url: str, folder: Path, worker_args: list[str]) -> None:
        super().__init__(url, folder)
        self.worker_args = worker_args
        self.model = folder / "tiny.safetensors"
        save_file({"w": np.ones((16, 16), dtype=np.float32)}, str(self.model))  # 1 KiB
        self.client: Client | None = None

    def start(self) -> psutil.Process:
        env = {**os.environ, "LOADWARDEN_REDIS_URL": self.url}
        env.pop("LOADWARDEN_CONCURRENCY", None)
        self.process = subprocess.Popen(
            ["loadwarden", "worker", *self.worker_args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.folder,  # the default allowed root: the working directory
            env=env,
        )
        return psutil.Process(self.process.pid)

    async def _client(self) -> Client:
        if self.client is None:
            self.client = await Client(settings=Settings(redis_url=self.url)).connect()
        return self.client

    async def _redis(self) -> Any:
        return await (await self._client()).redis()

    async def enqueue(self) -> str:
        client = await self._client()
        handle = await client.enqueue(LoadRequest(source=str(self.model)), job_id=uuid.uuid4().hex)
        return handle.job_id

    async def finished(self, job_ids: list[str]) -> dict[str, tuple[float, float]]:
        client = await self._client()
        found = {}
        for job_id in job_ids:
            report = await client.stored_report(job_id)
            if report is not None:
                assert report.ok, report.error
                assert report.enqueued_at is not None and report.finished_at is not None
                found[job_id] = (_ms(report.enqueued_at), _ms(report.finished_at))
        return found

    async def waiter(self, job_id: str) -> float:
        client = await self._client()
        await client.report(job_id, timeout_s=120)
        return time.monotonic()

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None


async def _run(side: Side, args: argparse.Namespace, redis: psutil.Process | None) -> Sample:
    worker = side.start()
    try:
        # Warm-up (the first job also proves the worker is up).
        first = [await side.enqueue()]
        await side.wait(first, timeout_s=120)
        await side.wait([await side.enqueue() for _ in range(WARMUP_JOBS)])
        # Backlog.
        cpu0, tree0, own0 = _cpu_s(worker), _tree_cpu_s(worker), _own_cpu_s()
        redis0 = _cpu_s(redis) if redis is not None else 0.0
        ids = [await side.enqueue() for _ in range(args.jobs)]
        done = await side.wait(ids)
        cpu_per_job = (_cpu_s(worker) - cpu0) / args.jobs
        tree_per_job = (_tree_cpu_s(worker) - tree0) / args.jobs
        own_per_job = (_own_cpu_s() - own0) / args.jobs
        redis_per_job = ((_cpu_s(redis) - redis0) if redis is not None else 0.0) / args.jobs
        span_ms = max(f for _, f in done.values()) - min(e for e, _ in done.values())
        # Paced.
        caller: list[float] = []
        gap: dict[str, float] = {}  # job id -> caller's ms, less its report's below
        paced: list[str] = []
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.05
        watching = isinstance(side, Loadwarden)

        async def one(i: int) -> None:
            await asyncio.sleep(max(0.0, start + i / args.rate - loop.time()))
            called = time.monotonic()
            job_id = await side.enqueue()
            paced.append(job_id)
            if watching:
                caller.append((await side.waiter(job_id) - called) * 1000)
                gap[job_id] = caller[-1]

        await asyncio.gather(*(one(i) for i in range(args.paced)))
        stamps = await side.wait(paced)
        latencies = [f - e for e, f in stamps.values()]
        gaps = [ms - (stamps[j][1] - stamps[j][0]) for j, ms in gap.items()]
        # Idle.
        await asyncio.sleep(1.0)
        cpu1, t1 = _cpu_s(worker), time.monotonic()
        await asyncio.sleep(args.idle_s)
        idle = (_cpu_s(worker) - cpu1) / (time.monotonic() - t1)
    finally:
        side.stop()
        await side.close()
    sample = {
        "jobs_per_s": args.jobs / (span_ms / 1000),
        "p50_ms": _p(latencies, 0.5),
        "p99_ms": _p(latencies, 0.99),
        "cpu_ms_per_job": cpu_per_job * 1000,
        "tree_cpu_ms_per_job": tree_per_job * 1000,
        "all_cpu_ms_per_job": (tree_per_job + redis_per_job + own_per_job) * 1000,
        "idle_cpu_pct": idle * 100,
    }
    if caller:
        sample |= {
            "caller_p50_ms": _p(caller, 0.5),
            "caller_p99_ms": _p(caller, 0.99),
            "caller_gap_p50_ms": _p(gaps, 0.5),
            "caller_gap_p99_ms": _p(gaps, 0.99),
        }
    return sample


async def _flush(url: str) -> None:
    from loadwarden.producer.connection import redis_client

    redis = redis_client(url)
    await redis.flushdb()
    await redis.aclose()


def _median(samples: list[Sample]) -> Sample:
    keys = samples[0].keys()
    return {k: statistics.median(s[k] for s in samples) for k in keys}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    with ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lw-tiny-")))
        redis: psutil.Process | None = None
        if args.redis:
            url = args.redis
        else:
            server = stack.enter_context(RedisServer())
            url, redis = server.url, psutil.Process(server.pid)
        sides: list[Side] = [Baseline(url, folder), Loadwarden(url, folder, args.worker_arg)]
        if args.loadwarden_only:
            sides = sides[1:]
        runs: dict[str, list[Sample]] = {s.name: [] for s in sides}
        for _ in range(args.rounds):
            for side in sides:
                await _flush(url)
                sample = await _run(side, args, redis)
                runs[side.name].append(sample)
                if not args.json:
                    print(side.name, {k: round(v, 2) for k, v in sample.items()}, flush=True)
        if args.loadwarden_only:
            return {"loadwarden": _median(runs["loadwarden"]), "runs": runs}
        base, ours = (_median(runs[s.name]) for s in sides)
    return {
        "bench": "tiny",
        "rounds": args.rounds,
        "jobs": args.jobs,
        "paced": args.paced,
        "rate": args.rate,
        "worker_args": args.worker_arg,
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
        "fork_floor_ms": _fork_floor_ms(),
        "baseline": base,
        "loadwarden": ours,
        "ratios": {
            "jobs_per_s": ours["jobs_per_s"] / base["jobs_per_s"],
            "p50": ours["p50_ms"] / base["p50_ms"],
            "caller_over_report_p50_ms": ours["caller_p50_ms"] - ours["p50_ms"],
            "caller_over_report_p99_ms": ours["caller_p99_ms"] - ours["p99_ms"],
        },
        "runs": runs,
    }


GOALS: list[tuple[str, Callable[[dict[str, Any]], bool]]] = [
    ("throughput >= 1.5x baseline", lambda r: r["ratios"]["jobs_per_s"] >= 1.5),
    ("paced p50 <= 0.6x baseline", lambda r: r["ratios"]["p50"] <= 0.6),
    ("paced p99 <= 30 ms", lambda r: r["loadwarden"]["p99_ms"] <= 30),
    (
        "caller p50/p99 <= report's + 2 ms",
        lambda r: (
            max(r["ratios"]["caller_over_report_p50_ms"], r["ratios"]["caller_over_report_p99_ms"])
            <= 2
        ),
    ),
]


def _print(result: dict[str, Any]) -> None:
    base, ours, ratios = result["baseline"], result["loadwarden"], result["ratios"]
    print(
        f"\nmedians of {result['rounds']} rounds; load average "
        f"{' '.join(f'{x:.2f}' for x in result['load_average'])}"
    )
    rows = [
        ("backlog jobs/s", "jobs_per_s", "{:.0f}"),
        ("paced p50 ms (report)", "p50_ms", "{:.1f}"),
        ("paced p99 ms (report)", "p99_ms", "{:.1f}"),
        ("paced p50 ms (caller)", "caller_p50_ms", "{:.1f}"),
        ("paced p99 ms (caller)", "caller_p99_ms", "{:.1f}"),
        ("caller's gap p50 ms", "caller_gap_p50_ms", "{:.1f}"),
        ("caller's gap p99 ms", "caller_gap_p99_ms", "{:.1f}"),
        ("worker CPU ms per job", "cpu_ms_per_job", "{:.2f}"),
        ("  + its children", "tree_cpu_ms_per_job", "{:.2f}"),
        ("  + Redis and the bench", "all_cpu_ms_per_job", "{:.2f}"),
        ("worker idle CPU % core", "idle_cpu_pct", "{:.2f}"),
    ]
    print(f"{'':26} {'arq baseline':>14} {'loadwarden':>12}")
    for label, key, fmt in rows:
        b = fmt.format(base[key]) if key in base else "-"
        print(f"{label:26} {b:>14} {fmt.format(ours[key]):>12}")
    print(
        f"ratios: jobs/s {ratios['jobs_per_s']:.2f}x, p50 {ratios['p50']:.2f}x; caller above "
        f"report: p50 +{ratios['caller_over_report_p50_ms']:.1f} ms, "
        f"p99 +{ratios['caller_over_report_p99_ms']:.1f} ms (per job: p50 "
        f"+{ours['caller_gap_p50_ms']:.1f}, p99 +{ours['caller_gap_p99_ms']:.1f} ms)"
    )
    # The backlog is CPU bound on a small machine: what 1.5x the baseline's jobs/s allows.
    budget = result["cpus"] * 1000 / (1.5 * base["jobs_per_s"])
    children = ours["tree_cpu_ms_per_job"] - ours["cpu_ms_per_job"]
    print(
        f"CPU per job, all processes: baseline {base['all_cpu_ms_per_job']:.2f} ms, loadwarden "
        f"{ours['all_cpu_ms_per_job']:.2f} ms (its fork server and load children alone "
        f"{children:.2f} ms); 1.5x the baseline's jobs/s on {result['cpus']} CPUs allows at "
        f"most {budget:.2f} ms; one fork + exit of the fork server's image alone costs "
        f"{result['fork_floor_ms']:.2f} ms"
    )
    for goal, met in GOALS:
        print(f"  {'MET    ' if met(result) else 'NOT MET'} {goal}")


def _cli() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--paced", type=int, default=120)
    parser.add_argument("--rate", type=float, default=40.0)
    parser.add_argument("--idle-s", type=float, default=3.0)
    parser.add_argument("--redis", help="a Redis URL whose database is flushed (default: private)")
    parser.add_argument("--worker-arg", action="append", default=[], help="for loadwarden worker")
    parser.add_argument(
        "--loadwarden-only", action="store_true", help="no baseline, no ratios (a sweep)"
    )
    parser.add_argument("--json", action="store_true")
    return parser.parse_args()


def _entry(coro: Callable[[argparse.Namespace], Coroutine[Any, Any, dict[str, Any]]]) -> None:
    args = _cli()
    result = asyncio.run(coro(args))
    if args.json or args.loadwarden_only:
        print(json.dumps(result))
    else:
        _print(result)


if __name__ == "__main__":
    _entry(main)
