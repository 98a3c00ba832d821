"""bench/tiny.py's baseline: a plain arq worker running a no-op child per job.

    cd bench && python -c 'import sys, _arq_baseline; _arq_baseline.main(*sys.argv[1:])' URL QUEUE

What a careful arq user would write without loadwarden: arq's own ``Worker``
(poll 10 ms, ``max_jobs`` 10, JSON instead of pickle), and per job one child
from a multiprocessing fork server that preloaded numpy and safetensors (the
load child's imports), which does nothing and exits; the job awaits the child's
exit on the event loop (its sentinel), not in a thread. No file is opened, no
header inspected, no limits, no cgroup, no sampling: the floor that a job queue
plus a fresh process per job costs.

Started with ``-c``, not as a script: multiprocessing re-runs a main *script* in
every child before its target (as ``__mp_main__``, here importing asyncio each
time: ~30 ms a child). Imported by name instead, this module is one the fork
server preloads, and a child only looks ``noop`` up in it.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
from typing import Any

#: The baseline the issue names: arq polling every 10 ms, 10 jobs at once.
POLL_DELAY_S = 0.01
MAX_JOBS = 10


def noop() -> None:
    """The child's whole work."""


async def run_child(ctx: dict[str, Any]) -> int:
    """arq job: one fresh fork-server child that does nothing; its exit code."""
    process = ctx["mp"].Process(target=noop)
    process.start()
    loop = asyncio.get_running_loop()
    exited = loop.create_future()
    loop.add_reader(process.sentinel, lambda: exited.done() or exited.set_result(None))
    try:
        await exited
    finally:
        loop.remove_reader(process.sentinel)
    process.join()
    return int(process.exitcode or 0)


def main(url: str, queue: str) -> None:
    from arq.connections import RedisSettings
    from arq.worker import Worker, func

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["numpy", "safetensors.numpy", __name__])
    # Start the fork server now (its preload included), not on the first job.
    warm = context.Process(target=noop)
    warm.start()
    warm.join()

    worker = Worker(
        functions=[func(run_child, name="noop")],
        redis_settings=RedisSettings.from_dsn(url),
        queue_name=queue,
        poll_delay=POLL_DELAY_S,
        max_jobs=MAX_JOBS,
        keep_result=3600,
        job_serializer=lambda o: json.dumps(o).encode(),
        job_deserializer=json.loads,
        ctx={"mp": context},
        log_results=False,
        handle_signals=True,
    )
    print("ready", flush=True)
    worker.run()
