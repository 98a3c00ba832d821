"""Is header inspection linear in the tensor count, and what does it cost beside a real load?

Builds two valid safetensors files of tiny F32 tensors, ``--small`` and ``--large``
tensors (default 15,000 and 150,000), and measures in one run, best of ``--n``
(default 3) by process CPU time:

* ``inspect_model`` (loadwarden's header inspection, no child) on each;
* ``safetensors.numpy.load_file`` (the library's whole load, in-process) on the large one;
* the JSON size of a report's model summary, whole and capped at ``report_max_tensors``.

Prints the per-tensor cost of the large file ÷ the small one (1.0 is linear) and
inspection ÷ ``load_file`` on the large file.

Run: ``python bench/inspect_scale.py [--small 15000] [--large 150000] [--n 3]``
"""

from __future__ import annotations

import argparse
import json
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from loadwarden.worker._files import open_model_file
from loadwarden.worker.config import Settings
from loadwarden.worker.formats import inspect_model


def write_model(path: Path, tensors: int) -> None:
    """A valid safetensors file of ``tensors`` F32 tensors of shape [4]."""
    header = {
        f"model.layers.{i}.weight": {
            "dtype": "F32",
            "shape": [4],
            "data_offsets": [16 * i, 16 * (i + 1)],
        }
        for i in range(tensors)
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as out:
        out.write(struct.pack("<Q", len(raw)) + raw + bytes(16 * tensors))


def best_cpu_s(fn: Callable[[], object], n: int) -> float:
    times = []
    for _ in range(n):
        started = time.process_time()
        fn()
        times.append(time.process_time() - started)
    return min(times)


def inspect_cpu_s(path: Path, n: int) -> tuple[float, object]:
    caps = Settings().inspection
    with open_model_file(path) as model_file:
        result: list[object] = []

        def run() -> None:
            result[:] = [
                inspect_model(
                    model_file.fd, model_file.size, path=model_file.path, declared=None, caps=caps
                )
            ]

        return best_cpu_s(run, n), result[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=15_000)
    parser.add_argument("--large", type=int, default=150_000)
    parser.add_argument("--n", type=int, default=3)
    args = parser.parse_args()
    import safetensors.numpy

    with tempfile.TemporaryDirectory() as folder:
        small, large = Path(folder, "small.safetensors"), Path(folder, "large.safetensors")
        write_model(small, args.small)
        write_model(large, args.large)
        small_s, _ = inspect_cpu_s(small, args.n)
        large_s, inspected = inspect_cpu_s(large, args.n)
        load_s = best_cpu_s(lambda: safetensors.numpy.load_file(str(large)), args.n)
    summary = inspected.summary  # type: ignore[attr-defined]
    whole = len(summary.model_dump_json())
    capped = len(summary.capped(Settings().report_max_tensors).model_dump_json())
    per_small, per_large = small_s / args.small, large_s / args.large
    print(f"inspect {args.small:,} tensors: {small_s:.3f} s ({per_small * 1e6:.1f} µs/tensor)")
    print(f"inspect {args.large:,} tensors: {large_s:.3f} s ({per_large * 1e6:.1f} µs/tensor)")
    print(f"load_file {args.large:,} tensors: {load_s:.3f} s")
    print(f"per-tensor cost, large ÷ small: {per_large / per_small:.2f} (1.00 is linear)")
    print(f"inspect ÷ load_file, {args.large:,} tensors: {large_s / load_s:.2f}")
    print(f"model summary JSON: {whole:,} bytes whole, {capped:,} bytes in a report")


if __name__ == "__main__":
    main()
