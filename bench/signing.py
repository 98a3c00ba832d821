"""What a required signature costs a load: signed vs. pinned-sha256 vs. plain, same run.

For each size (``--sizes-mb``, MiB) this writes one float32 safetensors model into a
temporary directory (removed at the end), signs it with a P-256 key made here
(model-signing's API, ``FILE.sig``), and then ``--repeat`` times, alternating, runs
``Supervisor.load`` on it three ways, each timed end to end around the call:

* plain: no digest, no signature (the supervisor hashes nothing);
* pinned: the request pins the file's sha256 (hashed while the child loads);
* signed: ``signing.require`` names the key: the signature is verified and the file
  hashed before the child starts, then hashed again while it loads.

The file is read once first (a warm page cache for every side). Times are medians;
the ratios are against plain and pinned measured in the same run. Expect signed to
cost one extra sha256 pass (1.2-1.4 GB/s on our 2-core machines) on top of pinned.

Run: ``python bench/signing.py [--sizes-mb 64,256] [--repeat 3]`` (needs loadwarden[signing]).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import structlog
from safetensors.numpy import save_file

from loadwarden.producer.contract import LoadRequest, Outcome
from loadwarden.worker.config import Settings, SigningPolicy, SourcePolicy, TrustedSigner
from loadwarden.worker.load.supervisor import Supervisor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.signatures
from tests.signatures import make_key, sign

MiB = 1024 * 1024


def make_model(folder: Path, size_mb: int) -> Path:
    path = folder / f"model-{size_mb}mb.safetensors"
    rows = size_mb * MiB // (4 * 1024)
    save_file({"w": np.random.default_rng(0).standard_normal((rows, 1024), np.float32)}, str(path))
    return path


async def timed(sup: Supervisor, request: LoadRequest) -> float:
    start = time.perf_counter()
    report = await sup.load(request)
    elapsed = time.perf_counter() - start
    assert report.outcome is Outcome.OK, report.error
    return elapsed


async def run(sizes_mb: list[int], repeat: int) -> None:
    with tempfile.TemporaryDirectory(prefix="lw-signing-bench-") as tmp:
        folder = Path(tmp)
        private, public = make_key(folder, "bench")
        sources = SourcePolicy(allow_roots=(folder,))
        plain = Settings(sources=sources)
        signed = Settings(
            sources=sources,
            signing=SigningPolicy(
                signers={"bench": TrustedSigner(public_key=public)}, require=("bench",)
            ),
        )
        async with Supervisor(plain) as plain_sup, Supervisor(signed) as signed_sup:
            for size in sizes_mb:
                model = make_model(folder, size)
                sign(model, private)
                digest = hashlib.sha256(model.read_bytes()).hexdigest()  # also warms the cache
                times: dict[str, list[float]] = {"plain": [], "pinned": [], "signed": []}
                for _ in range(repeat):
                    times["plain"].append(await timed(plain_sup, LoadRequest(source=str(model))))
                    times["pinned"].append(
                        await timed(plain_sup, LoadRequest(source=str(model), sha256=digest))
                    )
                    times["signed"].append(await timed(signed_sup, LoadRequest(source=str(model))))
                med = {k: statistics.median(v) for k, v in times.items()}
                print(
                    f"{size} MiB: plain {med['plain']:.3f} s, pinned {med['pinned']:.3f} s, "
                    f"signed {med['signed']:.3f} s; signed/plain {med['signed'] / med['plain']:.2f}"
                    f", signed/pinned {med['signed'] / med['pinned']:.2f}"
                )
                model.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes-mb", default="64,256")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    asyncio.run(run([int(s) for s in args.sizes_mb.split(",")], args.repeat))


if __name__ == "__main__":
    main()
