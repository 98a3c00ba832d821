"""How fast a second preload of an unchanged catalog is answered from stored reports.

    python bench/preload_rerun.py [--entries 100]

Generates N small safetensors models, preloads them once through the embedded
mode (private Valkey + in-process worker: the real queue and load path), then
again. Prints both times and the ratio rerun / first run; the goal from issue
#3 is a rerun well under a second for 100 entries.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from loadwarden.producer.client import Client
from loadwarden.producer.contract import LoadRequest
from loadwarden.worker.config import Settings, SourcePolicy
from loadwarden.worker.ops.logs import configure_logging
from loadwarden.worker.queue.embedded import embedded


async def main(entries: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="lw-bench-") as tmp:
        folder = Path(tmp)
        requests = []
        for i in range(entries):
            path = folder / f"m{i}.safetensors"
            save_file({"w": np.full((16, 16), i, dtype=np.float32)}, str(path))
            requests.append((f"m{i}", LoadRequest(source=str(path))))
        settings = Settings(concurrency=2, sources=SourcePolicy(allow_roots=(folder,)))
        async with (
            embedded(settings, state_dir=folder / "state") as active,
            Client(settings=active) as client,
        ):
            t0 = time.perf_counter()
            first = await client.preload(requests, concurrency=16)
            t1 = time.perf_counter()
            second = await client.preload(requests, concurrency=16)
            t2 = time.perf_counter()
    assert first.ok and second.ok and second.totals.cached == entries
    return {
        "bench": "preload_rerun",
        "entries": entries,
        "first_run_s": round(t1 - t0, 3),
        "rerun_s": round(t2 - t1, 4),
        "ratio_rerun_to_first": round((t2 - t1) / (t1 - t0), 4),
        "goal": "rerun < 1 s",
        "pass": (t2 - t1) < 1.0,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100)
    configure_logging("warning")
    result = asyncio.run(main(parser.parse_args().entries))
    print(
        f"{result['entries']} entries: first run {result['first_run_s']} s (real loads), "
        f"rerun {result['rerun_s']} s (stored reports), ratio {result['ratio_rerun_to_first']}, "
        f"{'PASS' if result['pass'] else 'FAIL'} ({result['goal']})"
    )
    print(json.dumps(result))
