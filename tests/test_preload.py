"""Batch preloading: client.preload(), and `loadwarden preload` embedded and against a worker."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from loadwarden.producer.client import Client
from loadwarden.producer.contract import (
    LimitOverrides,
    LoadReport,
    LoadRequest,
    Outcome,
    RetryPolicy,
)
from loadwarden.producer.preload import EntryState, PreloadEntry
from loadwarden.worker.config import Settings
from loadwarden.worker.queue.runner import WorkerRunner
from tests.conftest import call_until

ROOT = Path(__file__).parent.parent
LOADWARDEN = str(Path(sys.executable).parent / "loadwarden")
sys.path.insert(0, str(ROOT / "examples"))
from make_models import make  # noqa: E402

#: What each entry of examples/catalog.toml must end as.
EXPECTED = {
    "tiny": "ok",
    "encoder": "ok",
    "encoder-alias": "ok",
    "mixed": "ok",
    "sharded": "ok",
    "mixed-wrong-digest": "invalid",
    "truncated": "invalid",
    "header-bomb": "invalid",
    "disguised-pickle": "refused",
}


def test_readme_and_the_catalog_count_the_demo_as_it_ends() -> None:
    """README's demo sentence and examples/catalog.toml's comment give the counts of
    EXPECTED (the outcomes the end-to-end tests below check)."""
    numbers = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    words = {word: n for n, word in enumerate(numbers)}
    counts = Counter(EXPECTED.values())
    root = Path(__file__).parent.parent
    readme = " ".join((root / "README.md").read_text().split())
    said = re.search(
        r"(\w+) entries load, .*?of the (\w+) hostile files (\w+) end `invalid` and (\w+),"
        r" a disguised pickle, `refused`",
        readme,
    )
    comment = " ".join(
        line.lstrip("# ")
        for line in (root / "examples" / "catalog.toml").read_text().splitlines()
        if line.startswith("#")
    )
    told = re.search(
        r"(\w+) entries load; (\w+) do not, on purpose: (\w+) are invalid and (\w+) is refused",
        comment,
    )
    want = [counts["ok"], len(EXPECTED) - counts["ok"], counts["invalid"], counts["refused"]]
    for found in (said, told):
        assert found is not None
        assert [words[w.lower()] for w in found.groups()] == want, found.group(0)


@pytest.fixture
def example_catalog(tmp_path: Path) -> Path:
    """examples/catalog.toml beside freshly generated example models."""
    make(tmp_path / "models")
    shutil.copy(ROOT / "examples" / "catalog.toml", tmp_path / "catalog.toml")
    return tmp_path / "catalog.toml"


def _outcomes(document: dict[str, object]) -> dict[str, str | None]:
    entries = document["entries"]
    assert isinstance(entries, list)
    return {e["name"]: (e["report"] or {}).get("outcome") for e in entries}


async def test_duplicates_become_one_job_and_a_rerun_uses_stored_reports(
    worker_runner: WorkerRunner, settings: Settings, small_model: Path
) -> None:
    """Repeated entries (same request on the same file) run once; a second run runs nothing;
    the same digest at another path is its own job (the path decides whether it loads)."""
    import hashlib

    digest = hashlib.sha256(small_model.read_bytes()).hexdigest()  # noqa: ASYNC240
    copy = small_model.with_name("copy.safetensors")
    shutil.copy(small_model, copy)
    batch = [
        ("a", LoadRequest(source=str(small_model))),
        ("a-again", LoadRequest(source=str(small_model))),
        ("pinned", LoadRequest(source=str(small_model), sha256=digest)),
        ("pinned-copy", LoadRequest(source=str(copy), sha256=digest)),
    ]
    seen: list[tuple[str, EntryState]] = []

    def progress(entry: PreloadEntry) -> None:
        seen.append((entry.name, entry.state))

    async with Client(settings=settings) as client:
        first = await client.preload(batch, on_progress=progress)
        spawned = worker_runner.supervisor.forkserver.spawned
        second = await client.preload(batch)
    assert first.ok and second.ok
    assert (first.totals.entries, first.totals.jobs, spawned) == (4, 3, 3)
    assert [e.duplicate_of for e in first.entries] == [None, "a", None, None]
    assert ("a", EntryState.DONE) in seen and ("a", EntryState.PENDING) in seen
    assert second.totals.cached == 4
    assert worker_runner.supervisor.forkserver.spawned == spawned


async def test_stored_failures_are_not_served_forever(
    worker_runner: WorkerRunner, settings: Settings, small_model: Path, tmp_path: Path
) -> None:
    """A file missing on the first run loads on the next once it exists (pinned or not); an
    invalid verdict on a file the producer sees is reused until the file changes."""
    import hashlib

    digest = hashlib.sha256(small_model.read_bytes()).hexdigest()  # noqa: ASYNC240
    late = tmp_path / "late.safetensors"
    late_pinned = tmp_path / "late-pinned.safetensors"
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 16)
    once = RetryPolicy(max_attempts=1)
    batch = [
        ("late", LoadRequest(source=str(late), retry=once)),
        ("late-pinned", LoadRequest(source=str(late_pinned), sha256=digest, retry=once)),
        ("bad", LoadRequest(source=str(bad), retry=once)),
    ]
    async with Client(settings=settings) as client:
        first = await client.preload(batch)
        shutil.copy(small_model, late)
        shutil.copy(small_model, late_pinned)
        second = await client.preload(batch)
        bad.write_bytes(small_model.read_bytes())  # noqa: ASYNC240
        third = await client.preload(batch)
    assert [str(e.outcome) for e in first.entries] == ["unavailable", "unavailable", "invalid"]
    assert [str(e.outcome) for e in second.entries] == ["ok", "ok", "invalid"]
    assert [e.cached for e in second.entries] == [False, False, True]
    assert [str(e.outcome) for e in third.entries] == ["ok", "ok", "ok"]
    assert [e.cached for e in third.entries] == [True, True, False]


@pytest.mark.parametrize(
    ("outcome", "code", "pinned", "reused"),
    [
        ("ok", None, False, True),
        ("invalid", "bad_header", True, True),
        ("invalid", "bad_header", False, False),
        ("refused", "code_bearing_format", True, True),
        ("refused", "outside_root", True, False),
        ("refused", "over_budget", True, False),
        ("unavailable", "not_found", True, False),
        ("timeout", "deadline", True, False),
        ("crashed", "signal", True, False),
        ("memory_exceeded", "rlimit", True, False),
        ("cancelled", "cancelled", True, False),
    ],
)
def test_reuse_table(outcome: str, code: str | None, pinned: bool, reused: bool) -> None:
    """Which stored reports preload reuses: ok, and verdicts on pinned content only."""
    from datetime import UTC, datetime

    from loadwarden.producer.contract import ErrorInfo, ModelSummary, WorkerInfo
    from loadwarden.producer.preload import reusable

    digest = "ab" * 32
    now = datetime.now(UTC)
    model = ModelSummary(
        format="safetensors",
        file_bytes=1,
        bytes=0,
        parameters=0,
        dtypes={},
        tensors=[],
        sha256=digest if pinned else None,
    )
    report = LoadReport(
        job_id="j",
        source="/nowhere/m.safetensors",
        outcome=Outcome(outcome),
        error=ErrorInfo(type="X", code=code, message="m") if code else None,
        attempts=[],
        model=model,
        worker=WorkerInfo(id="w", hostname="h", pid=1, version="0"),
        started_at=now,
        finished_at=now,
    )
    request = LoadRequest(source="/nowhere/m.safetensors", sha256=digest)
    assert reusable(report, request) is reused


async def test_force_runs_again(
    worker_runner: WorkerRunner, settings: Settings, small_model: Path
) -> None:
    """--force ignores stored reports and loads every job again."""
    batch = [LoadRequest(source=str(small_model))]
    async with Client(settings=settings) as client:
        await client.preload(batch)
        again = await client.preload(batch, force=True)
    assert again.totals.cached == 0 and worker_runner.supervisor.forkserver.spawned == 2


async def test_fail_fast_skips_the_rest(
    worker_runner: WorkerRunner, settings: Settings, small_model: Path, tmp_path: Path
) -> None:
    """With fail_fast, nothing more is enqueued after the first failure."""
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 16)
    batch = [LoadRequest(source=str(bad))] + [
        LoadRequest(source=str(small_model), limits=LimitOverrides(timeout_seconds=10 + i))
        for i in range(5)
    ]
    async with Client(settings=settings) as client:
        result = await client.preload(batch, concurrency=1, fail_fast=True)
    assert result.entries[0].outcome is Outcome.INVALID
    assert all(e.state is EntryState.SKIPPED for e in result.entries[1:])
    assert not result.ok


async def test_batch_timeout_leaves_unfinished_entries(
    settings: Settings, small_model: Path
) -> None:
    """Entries still out when the batch's time runs out are reported unfinished (no worker here)."""
    async with Client(settings=settings) as client:
        result = await client.preload([LoadRequest(source=str(small_model))], timeout_s=0.3)
    assert result.entries[0].state is EntryState.UNFINISHED
    assert result.totals.unfinished == 1 and not result.ok


def _preload(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LOADWARDEN, "preload", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
    )


def test_examples_catalog_embedded_end_to_end(example_catalog: Path, tmp_path: Path) -> None:
    """The example catalog preloads on the embedded server: right outcomes, report file, exit 1."""
    report_path = tmp_path / "report.json"
    state = tmp_path / "state"
    result = _preload(
        str(example_catalog), "--state-dir", str(state), "--json-report", str(report_path)
    )
    assert result.returncode == 1, result.stderr
    assert "running embedded" in result.stderr
    assert "preload summary" in result.stdout
    document = json.loads(report_path.read_text())
    assert _outcomes(document) == EXPECTED
    assert document["totals"]["jobs"] == 8
    again = _preload(str(example_catalog), "--state-dir", str(state), "--json")
    assert json.loads(again.stdout)["totals"]["cached"] == len(EXPECTED)


def test_examples_catalog_against_a_worker(
    example_catalog: Path, redis_url: str, tmp_path: Path
) -> None:
    """The same catalog against a running worker and Redis gives the same outcomes."""
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [LOADWARDEN, "worker", "--redis", redis_url],
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
            cwd=example_catalog.parent,
        )
    try:
        call_until(lambda: b"worker_started" in log.read_bytes() or worker.poll() is not None, 30)
        result = _preload(str(example_catalog), "--redis", redis_url, "--json")
    finally:
        worker.terminate()
        worker.wait(30)
    assert result.returncode == 1, result.stderr
    assert _outcomes(json.loads(result.stdout)) == EXPECTED


def test_invalid_catalog_is_refused_whole(tmp_path: Path) -> None:
    """A catalog with defects enqueues nothing, lists every defect, and exits 2."""
    catalog = tmp_path / "bad.toml"
    catalog.write_text('[[model]]\nname = "a"\n\n[[model]]\nsource = "b"\nsha256 = "xyz"\n')
    result = _preload(str(catalog), "--redis", "unix:///nonexistent")
    assert result.returncode == 2
    assert result.stderr.count("  - ") >= 3


def test_calibrate_command_writes_recommendations(example_catalog: Path, tmp_path: Path) -> None:
    """`calibrate CATALOG -o FILE` measures every entry and writes a catalog of limits."""
    from loadwarden.producer.catalog import load_catalog

    output = tmp_path / "limits.toml"
    result = subprocess.run(
        [LOADWARDEN, "calibrate", str(example_catalog), "-o", str(output), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 1  # the hostile entries get no recommendation
    outcomes = {c["name"]: c["report"]["outcome"] for c in json.loads(result.stdout)}
    assert outcomes == EXPECTED
    recommended = {name: r.limits for name, r in load_catalog(output).requests()}
    assert all(recommended[n].memory_bytes for n, o in EXPECTED.items() if o == "ok")
