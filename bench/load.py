"""Sandboxed load vs. a bare in-process ``safetensors.numpy.load_file``: time and peak RSS.

For each size (``--sizes-mb``, MiB) this writes two safetensors models into a
temporary directory (removed at the end, also on Ctrl-C): ``F32`` (float32 and
float16 tensors) and ``BF16`` (the same tensor bytes, all bfloat16, cast with
ml_dtypes), computes their sha256, then ``--repeat`` times, alternating:

* baseline: a fresh interpreter (``python -c``) runs ``safetensors.numpy.load_file``
  with the default mmap backend (and, for reference, with ``backend="pread"``,
  the loader loadwarden's child uses). Only the ``load_file`` call is timed; the
  arrays are checked to be materialized (anonymous RSS grew by the tensor
  bytes), else one byte per page is touched inside the timed region. Its peak
  RSS is that process's own high-water mark (``VmHWM``), interpreter and numpy
  included, nothing subtracted. Not ``ru_maxrss``: after (v)fork + exec it keeps
  the launching process's peak (this bench's own RSS), so it is in the JSON only;
* loadwarden: ``Supervisor.load`` with the sha256 (verified by the supervisor),
  timed end to end around the call, next to the report's ``wall_seconds`` and
  ``peak_rss_bytes``, for each variant: our loader on the F32 model and on the
  BF16 model (which ``safetensors.numpy`` cannot load at all: its ratio is
  against the F32 baseline of the same size), and, with ``--compare``, the
  F32 model through the previous loader (safetensors.numpy's pread backend in
  the child) and through ours with one pread thread, without the madvise prefault,
  and with neither, and (two or one thread) without a pinned sha256, so nothing
  is hashed beside the child (``--variants`` picks any of them). The fork servers are
  started once, before any timing.

Before each side's run the file is read once, so both start from a warm page
cache. Times are medians over the repeats; peak RSS is the maximum. The goals
(issue 13), each printed as its own PASS/FAIL line per size and variant: the
child's own wall time (the report's ``wall_seconds``) / baseline(mmap) <= 1.1
(aim <= 1.0); end to end / baseline(mmap) <= 1.5 (the earlier goal, which also
pays for waiting on the supervisor's hash); peak RSS <= 1.1 x tensor bytes +
64 MiB.

Run: ``python bench/load.py [--sizes-mb 1024] [--repeat 3] [--compare | --variants LABELS]
[--json] [--strict]`` (``--variants "F32,F32 one thread"`` runs only those).
(exits 0 unless ``--strict`` and a size fails).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import safetensors.numpy
import structlog
from numpy.typing import NDArray

from loadwarden.producer.contract import LoadRequest, ModelFormat, Outcome
from loadwarden.worker.config import Settings, SourcePolicy
from loadwarden.worker.load.supervisor import Supervisor

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
#: Size of each weight tensor: big enough that per-tensor overhead does not dominate.
CHUNK_BYTES = 64 * MiB
#: The issues' goals: the child's wall time and the whole call, each against the baseline.
MAX_WALL_RATIO = 1.1
AIM_WALL_RATIO = 1.0
MAX_RATIO = 1.5
RSS_FACTOR = 1.1
RSS_SLACK_BYTES = 64 * MiB
#: Variants: label -> (model kind, child loader; None: the worker's own).
VARIANTS: dict[str, tuple[str, str | None]] = {
    "F32": ("F32", None),
    "BF16": ("BF16", None),
}
#: With --compare: the loader before ours, ours with one pread thread, without the
#: madvise prefault, and both (test loaders).
COMPARE_VARIANTS: dict[str, tuple[str, str | None]] = {
    "F32 previous loader": ("F32", "safetensors_library"),
    "F32 one thread": ("F32", "safetensors_one_thread"),
    "F32 no prefault": ("F32", "safetensors_no_prefault"),
    "F32 one thread no prefault": ("F32", "safetensors_one_thread_no_prefault"),
    "F32 no hash": ("F32", None),
    "F32 one thread no hash": ("F32", "safetensors_one_thread"),
}
#: Variants loaded without a pinned sha256: nothing is hashed beside the child.
UNHASHED = frozenset({"F32 no hash", "F32 one thread no hash"})
TEST_LOADERS = "tests.sandbox_loaders"

# Runs in a fresh interpreter: argv = path, backend. Prints one JSON object.
BASELINE_CODE = """
import json, resource, sys, time
import numpy as np
import safetensors.numpy

def status(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0

path, backend = sys.argv[1], sys.argv[2]
before = status("RssAnon")
started = time.perf_counter()
tensors = safetensors.numpy.load_file(path, backend=backend)
nbytes = sum(a.nbytes for a in tensors.values())
grew = status("RssAnon") - before
touched = grew < 0.95 * nbytes
if touched:  # lazy views of a mapping: read one byte per page so every page is loaded
    for a in tensors.values():
        int(a.reshape(-1).view(np.uint8)[::4096].sum())
seconds = time.perf_counter() - started
print(json.dumps({
    "seconds": seconds,
    "tensor_bytes": nbytes,
    "anon_rss_growth_bytes": grew,
    "touched": touched,
    "vm_hwm_bytes": status("VmHWM"),
    "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
}))
"""


@dataclass(slots=True)
class Model:
    """A generated model file."""

    kind: str
    size_mib: int
    path: str
    file_bytes: int
    tensor_bytes: int
    tensors: int
    sha256: str


@dataclass(slots=True)
class Baseline:
    """One baseline run in a fresh interpreter."""

    seconds: float
    peak_rss_bytes: int
    ru_maxrss_bytes: int
    materialized: bool


@dataclass(slots=True)
class Sandboxed:
    """One ``Supervisor.load``."""

    e2e_seconds: float
    wall_seconds: float
    child_cpu_seconds: float
    supervisor_cpu_seconds: float
    peak_rss_bytes: int
    outcome: str
    error: str | None


@dataclass(slots=True)
class VariantResult:
    """Medians (times) and maxima (RSS) over the repeats of one variant of one size."""

    label: str
    tensor_bytes: int
    baseline_mmap_s: float
    e2e_s: float
    wall_s: float
    child_cpu_s: float
    supervisor_cpu_s: float
    peak_rss_bytes: int
    outcomes: list[str]
    errors: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.e2e_s / self.baseline_mmap_s

    @property
    def wall_ratio(self) -> float:
        return self.wall_s / self.baseline_mmap_s

    @property
    def rss_per_tensor_byte(self) -> float:
        return self.peak_rss_bytes / self.tensor_bytes

    @property
    def rss_limit_bytes(self) -> int:
        return int(RSS_FACTOR * self.tensor_bytes) + RSS_SLACK_BYTES

    def checks(self) -> list[tuple[str, bool]]:
        """Each goal as one line of text and whether it is met."""
        rss_ok = self.peak_rss_bytes <= self.rss_limit_bytes
        aim = "met" if self.wall_ratio <= AIM_WALL_RATIO else "not met"
        return [
            (
                f"child wall {self.wall_s:.3f} s / baseline {self.baseline_mmap_s:.3f} s = "
                f"{self.wall_ratio:.2f} (goal <= {MAX_WALL_RATIO}; aim <= {AIM_WALL_RATIO}: {aim})",
                self.wall_ratio <= MAX_WALL_RATIO,
            ),
            (
                f"end to end {self.e2e_s:.3f} s / baseline = {self.ratio:.2f} "
                f"(goal <= {MAX_RATIO})",
                self.ratio <= MAX_RATIO,
            ),
            (
                f"peak RSS {_mib(self.peak_rss_bytes)} MiB (goal <= {_mib(self.rss_limit_bytes)} "
                f"MiB: {RSS_FACTOR} x tensor bytes + 64 MiB)",
                rss_ok,
            ),
            (
                f"outcomes {','.join(self.outcomes)}",
                all(o == Outcome.OK for o in self.outcomes),
            ),
        ]

    @property
    def passed(self) -> bool:
        return all(ok for _, ok in self.checks())

    def summary(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "ratio": round(self.ratio, 3),
            "wall_ratio": round(self.wall_ratio, 3),
            "rss_per_tensor_byte": round(self.rss_per_tensor_byte, 3),
            "rss_limit_bytes": self.rss_limit_bytes,
            "checks": [{"check": text, "pass": ok} for text, ok in self.checks()],
            "pass": self.passed,
        }


@dataclass(slots=True)
class SizeResult:
    """The baselines of one size (on its F32 model) and every variant's sandboxed loads."""

    size_mib: int
    tensors: int
    file_bytes: int
    tensor_bytes: int
    baseline_mmap_s: float
    baseline_pread_s: float
    baseline_mmap_peak_rss_bytes: int
    baseline_pread_peak_rss_bytes: int
    baseline_ru_maxrss_bytes: int
    baseline_materialized: bool
    variants: list[VariantResult]

    @property
    def passed(self) -> bool:
        return all(v.passed for v in self.variants)

    def summary(self) -> dict[str, Any]:
        fields = {k: v for k, v in asdict(self).items() if k != "variants"}
        return {**fields, "variants": [v.summary() for v in self.variants], "pass": self.passed}


def make_model(directory: str, kind: str, size_mib: int, rng: np.random.Generator) -> Model:
    """Write ~``size_mib`` MiB of weights (+ small biases): alternating float32/float16
    (``F32``), or all bfloat16 cast with ml_dtypes (``BF16``)."""
    tensors: dict[str, NDArray[Any]] = {}
    remaining = size_mib * MiB
    cols = 1024
    i = 0
    while remaining > 0:
        if kind == "BF16":
            dtype: Any = ml_dtypes.bfloat16
        else:
            dtype = np.float32 if i % 2 == 0 else np.float16
        itemsize = np.dtype(dtype).itemsize
        rows = max(1, min(CHUNK_BYTES, remaining) // (cols * itemsize))
        weight = rng.standard_normal((rows, cols), dtype=np.float32).astype(dtype, copy=False)
        bias = rng.standard_normal(cols, dtype=np.float32).astype(dtype, copy=False)
        tensors[f"layers.{i}.weight"] = weight
        tensors[f"layers.{i}.bias"] = bias
        remaining -= weight.nbytes + bias.nbytes
        i += 1
    path = os.path.join(directory, f"model-{kind.lower()}-{size_mib}mib.safetensors")
    # The safetensors writer takes ml_dtypes arrays (it names them by numpy's dtype name);
    # only its reader cannot give them back.
    safetensors.numpy.save_file(tensors, path, metadata={"bench": "loadwarden"})
    tensor_bytes = sum(t.nbytes for t in tensors.values())
    count = len(tensors)
    del tensors
    with open(path, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    return Model(kind, size_mib, path, os.path.getsize(path), tensor_bytes, count, digest)


def warm_page_cache(path: str) -> None:
    """Read the whole file once so the next load finds it in the page cache."""
    view = memoryview(bytearray(MiB))
    with open(path, "rb", buffering=0) as fh:
        while fh.readinto(view):
            pass


async def run_baseline(path: str, backend: str) -> Baseline:
    """One ``load_file`` in a fresh interpreter; its figures come back as JSON on stdout."""
    await asyncio.to_thread(warm_page_cache, path)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", BASELINE_CODE, path, backend, stdout=asyncio.subprocess.PIPE
    )
    try:
        out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"the baseline process exited with status {proc.returncode}")
    figures = json.loads(out)
    return Baseline(
        seconds=figures["seconds"],
        peak_rss_bytes=figures["vm_hwm_bytes"],
        ru_maxrss_bytes=figures["ru_maxrss_bytes"],
        materialized=not figures["touched"],
    )


async def run_sandboxed(sup: Supervisor, model: Model, hashed: bool = True) -> Sandboxed:
    """One ``Supervisor.load`` with sha256 verification (unless not ``hashed``), timed
    around the call."""
    await asyncio.to_thread(warm_page_cache, model.path)
    request = LoadRequest(source=model.path, sha256=model.sha256 if hashed else None)
    cpu_before = _own_cpu_s()
    started = time.perf_counter()
    report = await sup.load(request)
    e2e = time.perf_counter() - started
    cpu = _own_cpu_s() - cpu_before
    res = report.resources
    error = f"{report.error.code}: {report.error.message}" if report.error else None
    return Sandboxed(
        e2e_seconds=e2e,
        wall_seconds=res.wall_seconds if res else float("nan"),
        child_cpu_seconds=res.cpu_user_seconds + res.cpu_system_seconds if res else float("nan"),
        supervisor_cpu_seconds=cpu,
        peak_rss_bytes=res.peak_rss_bytes if res else 0,
        outcome=str(report.outcome),
        error=error,
    )


async def bench_size(
    sups: dict[str, Supervisor], models: dict[str, Model], repeat: int
) -> SizeResult:
    f32 = models["F32"]
    mmap_runs: list[Baseline] = []
    pread_runs: list[Baseline] = []
    runs: dict[str, list[Sandboxed]] = {label: [] for label in sups}
    labels = list(sups)
    for i in range(repeat):  # alternate, so drift (thermal, page cache) hits every side
        mmap_runs.append(await run_baseline(f32.path, "mmap"))
        pread_runs.append(await run_baseline(f32.path, "pread"))
        # Each round starts with the next variant: none always runs right after the baselines.
        for label in labels[i % len(labels) :] + labels[: i % len(labels)]:
            sup = sups[label]
            kind = (VARIANTS | COMPARE_VARIANTS)[label][0]
            runs[label].append(await run_sandboxed(sup, models[kind], label not in UNHASHED))
    baseline_mmap_s = statistics.median(r.seconds for r in mmap_runs)
    variants = [
        VariantResult(
            label=label,
            tensor_bytes=models[(VARIANTS | COMPARE_VARIANTS)[label][0]].tensor_bytes,
            baseline_mmap_s=baseline_mmap_s,
            e2e_s=statistics.median(s.e2e_seconds for s in done),
            wall_s=statistics.median(s.wall_seconds for s in done),
            child_cpu_s=statistics.median(s.child_cpu_seconds for s in done),
            supervisor_cpu_s=statistics.median(s.supervisor_cpu_seconds for s in done),
            peak_rss_bytes=max(s.peak_rss_bytes for s in done),
            outcomes=[s.outcome for s in done],
            errors=[s.error for s in done if s.error],
        )
        for label, done in runs.items()
    ]
    return SizeResult(
        size_mib=f32.size_mib,
        tensors=f32.tensors,
        file_bytes=f32.file_bytes,
        tensor_bytes=f32.tensor_bytes,
        baseline_mmap_s=baseline_mmap_s,
        baseline_pread_s=statistics.median(r.seconds for r in pread_runs),
        baseline_mmap_peak_rss_bytes=max(r.peak_rss_bytes for r in mmap_runs),
        baseline_pread_peak_rss_bytes=max(r.peak_rss_bytes for r in pread_runs),
        baseline_ru_maxrss_bytes=max(r.ru_maxrss_bytes for r in mmap_runs + pread_runs),
        baseline_materialized=all(r.materialized for r in mmap_runs + pread_runs),
        variants=variants,
    )


async def bench(
    models: list[dict[str, Model]], repeat: int, variants: dict[str, tuple[str, str | None]]
) -> list[SizeResult]:
    # Entering starts the fork servers before any timing: a worker pays that once, not per load.
    # Variants with a test loader get a fork server of their own, so the worker's keeps the
    # modules it has in production and nothing more.
    folders = tuple({Path(m.path).parent for pair in models for m in pair.values()})
    settings = Settings(sources=SourcePolicy(allow_roots=folders))
    async with contextlib.AsyncExitStack() as stack:
        sups: dict[str, Supervisor] = {}
        for label, (_kind, loader) in variants.items():
            if loader is None:
                sups[label] = await stack.enter_async_context(Supervisor(settings))
            else:
                sups[label] = await stack.enter_async_context(
                    Supervisor(
                        settings,
                        preload=[TEST_LOADERS],
                        loaders={ModelFormat.SAFETENSORS: loader},
                    )
                )
        return [await bench_size(sups, pair, repeat) for pair in models]


def _own_cpu_s() -> float:
    """CPU time of this process (the supervisor: its hash thread, event loop), all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _mib(n: float) -> str:
    return f"{n / MiB:,.0f}"


def print_table(results: list[SizeResult], repeat: int) -> None:
    print(
        f"loadwarden load bench: Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
        f"median of {repeat} (times), max of {repeat} (RSS), load average "
        + " ".join(f"{x:.2f}" for x in os.getloadavg())
    )
    print(
        "page cache warmed equally: each file is read once right before every timed run, both sides"
    )
    print(
        "baseline: fresh interpreter per run, safetensors.numpy.load_file of the F32 model only; "
        "RSS = its VmHWM, interpreter + numpy included, nothing subtracted "
        "(not ru_maxrss: it inherits this bench's peak across fork+exec)"
    )
    print(
        "sandboxed: Supervisor.load with sha256 verification; e2e = around sup.load, "
        "wall = report.resources.wall_seconds (fork servers started beforehand); child CPU = "
        "the report's user + system; sup CPU = this process's own during the call (the hash); "
        "BF16 = the same tensor bytes in bfloat16, against the same F32 baseline"
    )
    print()
    header = (
        "size MiB",
        "tensors",
        "base mmap s",
        "base pread s",
        "base RSS MiB",
        "variant",
        "sbx e2e s",
        "sbx wall s",
        "child CPU s",
        "sup CPU s",
        "ratio",
        "wall ratio",
        "sbx RSS MiB",
        "RSS/tensor",
        "target",
    )
    rows = []
    for r in results:
        for v in r.variants:
            rows.append(
                (
                    _mib(r.tensor_bytes),
                    str(r.tensors),
                    f"{r.baseline_mmap_s:.3f}",
                    f"{r.baseline_pread_s:.3f}",
                    _mib(r.baseline_mmap_peak_rss_bytes),
                    v.label,
                    f"{v.e2e_s:.3f}",
                    f"{v.wall_s:.3f}",
                    f"{v.child_cpu_s:.3f}",
                    f"{v.supervisor_cpu_s:.3f}",
                    f"{v.ratio:.2f}",
                    f"{v.wall_ratio:.2f}",
                    _mib(v.peak_rss_bytes),
                    f"{v.rss_per_tensor_byte:.3f}",
                    "PASS" if v.passed else "FAIL",
                )
            )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    print()
    for r in results:
        for v in r.variants:
            for text, ok in v.checks():
                print(f"{'PASS' if ok else 'FAIL'}  {_mib(r.tensor_bytes)} MiB {v.label}: {text}")
            for error in v.errors:
                print(f"  error: {error}")
        print(
            f"{_mib(r.tensor_bytes)} MiB baseline pread RSS "
            f"{_mib(r.baseline_pread_peak_rss_bytes)} MiB; arrays "
            + ("materialized by load_file" if r.baseline_materialized else "touched per page")
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--sizes-mb",
        default="1024",
        help="model sizes in MiB, comma-separated (default: 1024, issue 13's 1 GiB goal)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per side per size (median)")
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also load the F32 model with the previous loader and with one pread thread",
    )
    parser.add_argument("--json", action="store_true", help="print only the JSON summary")
    parser.add_argument("--strict", action="store_true", help="exit 1 if any size fails the target")
    parser.add_argument(
        "--tmpdir", default=None, help="where to write the models (default: $TMPDIR)"
    )
    parser.add_argument(
        "--variants",
        default=None,
        help="only these variants, comma-separated labels (default: F32,BF16, all with --compare)",
    )
    args = parser.parse_args(argv)
    known = VARIANTS | COMPARE_VARIANTS
    if args.variants:
        labels = [label.strip() for label in args.variants.split(",") if label.strip()]
        if unknown := [label for label in labels if label not in known]:
            parser.error(f"unknown variants {unknown}; known: {', '.join(known)}")
        variants = {label: known[label] for label in labels}
    else:
        variants = VARIANTS | (COMPARE_VARIANTS if args.compare else {})
    sizes = [int(s) for s in args.sizes_mb.split(",") if s.strip()]
    if not sizes or min(sizes) <= 0 or args.repeat < 1:
        parser.error("sizes and --repeat must be positive")
    if any(loader for _, loader in variants.values()) and str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # the fork server imports tests.sandbox_loaders from here

    # The supervisor's log lines go to stderr, warnings and above only: stdout is the report.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up on SIGTERM too
    directory = tempfile.mkdtemp(prefix="loadwarden-bench-", dir=args.tmpdir)
    try:
        rng = np.random.default_rng(0)
        models = [
            {kind: make_model(directory, kind, size, rng) for kind in ("F32", "BF16")}
            for size in sizes
        ]
        results = asyncio.run(bench(models, args.repeat, variants))
    finally:
        shutil.rmtree(directory, ignore_errors=True)

    summary = {
        "bench": "load",
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "repeat": args.repeat,
        "page_cache": "warm (file read once before every timed run, both sides)",
        "ratio": "sandbox e2e_s / baseline_mmap_s (the F32 model's, also for BF16)",
        "wall_ratio": "the child's wall_seconds / baseline_mmap_s",
        "load_average": os.getloadavg(),
        "sizes": [r.summary() for r in results],
        "pass": all(r.passed for r in results),
    }
    if not args.json:
        print_table(results, args.repeat)
        print()
    print(json.dumps(summary, separators=(",", ":")))
    return 1 if args.strict and not summary["pass"] else 0


if __name__ == "__main__":
    sys.exit(main())
