"""What a ready child with numpy + ml_dtypes (the load child's imports) costs, four ways.

Measured in one run, ``--n`` times each (default 50) after ``--warmup``
untimed rounds (default 1: the first spawn also starts multiprocessing's
resource tracker), one full cycle per sample:

* (a) fork: ``os.fork()`` of this process, which has imported both; the child
  ``os._exit(0)``s at once and the parent ``waitpid``s it;
* (b) loadwarden: ``ForkServer.spawn()`` then ``stop_child()`` (SIGKILL + reap by
  the fork server); (b') is the ``spawn()`` part alone, until the pid is known;
* (c) ``multiprocessing.get_context("spawn")``: a ``Process`` whose target
  imports numpy and ml_dtypes, ``start()`` + ``join()``. A spawn child
  re-runs this module's top level, so it imports only os, sys, time and
  multiprocessing there; everything else is imported where it is used;
* (d) ``subprocess.run([sys.executable, "-c", "import numpy, ml_dtypes"])``.

Also the fork server's own start time (``await fs.start()``) and resident size
once it has preloaded (every child starts from it), ``--starts`` times.
p99 is nearest-rank (the maximum when N < 100). BLAS is held to one thread
(``OPENBLAS_NUM_THREADS=1`` etc., as in loadwarden's fork server) for every method.

Run: ``python bench/spawn.py [--n 50] [--warmup 1] [--starts 3] [--json]``
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

#: Same as loadwarden's fork server sets before numpy is imported: no idle BLAS threads.
ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
IMPORTS = "import numpy, ml_dtypes"


def import_loaders() -> None:
    """The spawn child's target: import what a load child needs."""
    import ml_dtypes  # noqa: F401
    import numpy  # noqa: F401


def _timed(cycle: Callable[[], None], n: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        cycle()
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        cycle()
        samples.append(time.perf_counter() - started)
    return samples


def fork_cycle() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise RuntimeError(f"forked child ended with status {status}")


def mp_spawn_cycle() -> None:
    process = multiprocessing.get_context("spawn").Process(target=import_loaders)
    process.start()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"spawned child exited with {process.exitcode}")


def interpreter_cycle() -> None:
    import subprocess

    subprocess.run([sys.executable, "-c", IMPORTS], check=True)


async def forkserver_samples(
    n: int, warmup: int, starts: int
) -> tuple[list[float], list[int], list[float], list[float]]:
    """Fork server start times (s) and resident sizes (bytes), spawn+stop cycles and
    spawn alone (s)."""
    import psutil

    from loadwarden.worker.sandbox.children import stop_child
    from loadwarden.worker.sandbox.forkserver import ForkServer

    start_s: list[float] = []
    rss: list[int] = []
    for i in range(starts):
        fs = ForkServer()
        started = time.perf_counter()
        await fs.start()
        start_s.append(time.perf_counter() - started)
        assert fs.pid is not None
        rss.append(psutil.Process(fs.pid).memory_info().rss)
        if i < starts - 1:
            await fs.close()
    cycles: list[float] = []
    spawns: list[float] = []
    try:
        for i in range(warmup + n):
            started = time.perf_counter()
            child = await fs.spawn()  # forked, waiting for its spec: ready
            spawned = time.perf_counter()
            await stop_child(child)  # no await in between, so nothing can skip it
            if i >= warmup:
                cycles.append(time.perf_counter() - started)
                spawns.append(spawned - started)
    finally:
        await fs.close()
    return start_s, rss, cycles, spawns


def p50(samples: list[float]) -> float:
    ordered = sorted(samples)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    rank = -(-99 * len(ordered) // 100)  # nearest rank: ceil(0.99 n)
    return ordered[rank - 1]


def main(argv: list[str] | None = None) -> int:
    import argparse
    import asyncio
    import json
    import logging

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=50, help="timed cycles per method")
    parser.add_argument("--warmup", type=int, default=1, help="untimed cycles per method first")
    parser.add_argument("--starts", type=int, default=3, help="fork server starts to time")
    parser.add_argument("--json", action="store_true", help="print only the JSON summary")
    args = parser.parse_args(argv)
    if args.n < 1 or args.warmup < 0 or args.starts < 1:
        parser.error("--n and --starts must be >= 1, --warmup >= 0")

    os.environ.update(ONE_THREAD)
    import structlog

    # loadwarden's info lines go to stderr only from warning up: stdout is the report.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    import_loaders()  # (a) forks a process that has them imported

    methods: dict[str, list[float]] = {}
    methods["(a) os.fork + waitpid"] = _timed(fork_cycle, args.n, args.warmup)
    start_s, rss, cycles, spawns = asyncio.run(forkserver_samples(args.n, args.warmup, args.starts))
    methods["(b) ForkServer.spawn + stop_child"] = cycles
    methods["(b') ForkServer.spawn alone"] = spawns
    methods['(c) multiprocessing "spawn" Process'] = _timed(mp_spawn_cycle, args.n, args.warmup)
    methods["(d) subprocess.run python -c"] = _timed(interpreter_cycle, args.n, args.warmup)

    ref50 = p50(cycles)
    ref99 = p99(cycles)
    rows = [
        {
            "method": name,
            "p50_ms": round(p50(s) * 1e3, 3),
            "p99_ms": round(p99(s) * 1e3, 3),
            "p50_ratio_to_b": round(p50(s) / ref50, 2),
            "p99_ratio_to_b": round(p99(s) / ref99, 2),
        }
        for name, s in methods.items()
    ]
    summary = {
        "bench": "spawn",
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "n": args.n,
        "warmup": args.warmup,
        "forkserver_start_ms": [round(s * 1e3, 1) for s in start_s],
        "forkserver_rss_bytes": rss,
        "methods": rows,
    }
    if not args.json:
        print(
            f"loadwarden spawn bench: Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
            f"N={args.n} per method after {args.warmup} warm-up; "
            "a ready child with numpy + ml_dtypes imported, one full cycle per sample"
        )
        starts = ", ".join(f"{s * 1e3:.1f}" for s in start_s)
        print(
            f"fork server start (await fs.start()): {starts} ms; median {p50(start_s) * 1e3:.1f} ms"
        )
        print(f"fork server resident once preloaded: {max(rss) / 2**20:.1f} MiB (max)")
        print()
        header = ("method", "p50 ms", "p99 ms", "p50 / (b)", "p99 / (b)")
        table = [
            (
                str(r["method"]),
                f"{r['p50_ms']:.2f}",
                f"{r['p99_ms']:.2f}",
                f"{r['p50_ratio_to_b']:.2f}",
                f"{r['p99_ratio_to_b']:.2f}",
            )
            for r in rows
        ]
        widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(header)]
        for cells in (header, *table):
            first, *rest = zip(cells, widths, strict=True)
            print("  ".join([first[0].ljust(first[1]), *(c.rjust(w) for c, w in rest)]))
        print("p99 is nearest-rank (the maximum when N < 100)")
        print()
    print(json.dumps(summary, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
