"""Failover drill as a benchmark: time from kill -9 of the primary to the first job finished after.

A primary, one replica and three Sentinels on loopback (tests/redis_ha.py,
down-after-milliseconds 1000), two ``loadwarden worker`` processes on the
``redis+sentinel://`` URL. It measures one job's enqueue-to-report latency on a
healthy primary (the baseline), kills the primary with SIGKILL, then enqueues a
probe job at once through the same client, which rides through the failover,
and waits for its report. Printed: kill to promotion (Sentinel), kill to the
probe's report (the first job finished on the new primary), and their ratio to
the baseline.

    python bench/failover.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.redis_ha

from loadwarden.producer import Client, LoadRequest
from loadwarden.producer.contract import Outcome
from tests.redis_ha import SentinelTopology


def _start_workers(url: str, root: Path, count: int) -> list[subprocess.Popen[bytes]]:
    env = {
        **os.environ,
        "LOADWARDEN_SOURCES__ALLOW_ROOTS": json.dumps([str(root)]),
        "LOADWARDEN_LEASE_S": "2",
        "LOADWARDEN_LEASE_RENEW_S": "0.5",
    }
    procs = []
    for i in range(count):
        log = (root / f"worker{i}.log").open("wb")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "loadwarden.worker.cli.main", "worker", "--redis", url],
                env=env,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        )
        log.close()
    return procs


async def _one_load(client: Client, model: Path, n: int) -> float:
    started = time.monotonic()
    handle = await client.enqueue(LoadRequest(source=str(model), labels={"n": str(n)}))
    report = await handle.report(timeout_s=120)
    if report.outcome is not Outcome.OK:
        raise RuntimeError(f"probe ended {report.outcome}: {report.error}")
    return time.monotonic() - started


async def _round(root: Path, model: Path, number: int) -> tuple[float, float, float]:
    with SentinelTopology(replicas=1, sentinels=3) as topo:
        workers = _start_workers(topo.url, root, 2)
        try:
            async with Client(topo.url) as client:
                await _one_load(client, model, -1)  # warm: workers up, fork servers ready
                baseline = statistics.median([await _one_load(client, model, i) for i in range(5)])
                old = topo.primary_port()

                def promoted_at() -> float:
                    topo.wait_for_failover(old)  # polls the Sentinels every 50 ms
                    return time.monotonic()

                promoted = asyncio.get_running_loop().run_in_executor(None, promoted_at)
                killed = time.monotonic()
                topo.primary.kill()
                await _one_load(client, model, 1000 + number)
                first_job_s = time.monotonic() - killed
                promotion_s = await promoted - killed
            if any(w.poll() is not None for w in workers):
                raise RuntimeError("a worker exited during the failover")
            return baseline, promotion_s, first_job_s
        finally:
            for w in workers:
                w.terminate()
            for w in workers:
                w.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lw-failover-") as tmp:
        root = Path(tmp).resolve()
        model = root / "m.safetensors"
        save_file({"w": np.zeros((256, 256), dtype=np.float32)}, str(model))
        rows = [asyncio.run(_round(root, model, i)) for i in range(args.rounds)]
    print("round  baseline_s  kill_to_promotion_s  kill_to_first_job_s  ratio_to_baseline")
    for i, (base, promo, first) in enumerate(rows):
        print(f"{i:>5}  {base:>10.3f}  {promo:>19.2f}  {first:>19.2f}  {first / base:>17.1f}")
    firsts = [r[2] for r in rows]
    print(
        f"median kill -> first job finished on the new primary: {statistics.median(firsts):.2f} s "
        f"(baseline job {statistics.median(r[0] for r in rows):.3f} s)"
    )


if __name__ == "__main__":
    main()
