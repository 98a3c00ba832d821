"""The loadwarden command line, run as a real process, against a real Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadwarden.producer.client import BlockingClient, JobState
from loadwarden.producer.contract import LoadReport, LoadRequest, Outcome
from tests.conftest import call_until

LOADWARDEN = str(Path(sys.executable).parent / "loadwarden")
EXIT_OK, EXIT_OUTCOME, EXIT_USAGE, EXIT_NO_ANSWER = 0, 1, 2, 3


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LOADWARDEN, *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def bad_model(tmp_path: Path) -> Path:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\xff" * 64)
    return path


@pytest.fixture
def worker_process(redis_url: str, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``loadwarden worker`` in its own process, ready once it has logged worker_started."""
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [LOADWARDEN, "worker", "--redis", redis_url],
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
        )
    try:
        call_until(lambda: b"worker_started" in log.read_bytes() or proc.poll() is not None, 30)
        assert proc.poll() is None, log.read_text()
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_help_explains_every_command() -> None:
    """--help lists every command, and each command's help runs."""
    out = run("--help").stdout
    for command in ("worker", "enqueue", "report", "load", "inspect", "status"):
        assert command in out
        assert run(command, "--help").returncode == 0


def test_load_valid_file_prints_ok_report(small_model: Path) -> None:
    """`load FILE --json` prints one report with outcome ok and the manifest, exit 0."""
    result = run("load", str(small_model), "--json")
    assert result.returncode == EXIT_OK, result.stderr
    report = LoadReport.model_validate_json(result.stdout)
    assert report.outcome is Outcome.OK
    assert report.model is not None and len(report.model.tensors) == 6


def test_load_malformed_file_is_invalid_and_fails(bad_model: Path) -> None:
    """`load FILE --json` on a malformed file prints outcome invalid and exits non-zero."""
    result = run("load", str(bad_model), "--json")
    assert result.returncode == EXIT_OUTCOME
    assert json.loads(result.stdout)["outcome"] == "invalid"


def test_load_with_a_bad_setting_is_one_usage_error(small_model: Path) -> None:
    """A bad setting met after `load` launched its fork server: exit 2, the usage message,
    no traceback (the fork server is let finish starting, then stopped)."""
    result = run("load", str(small_model), env={"LOADWARDEN_CONCURRENCY": "many"})
    assert result.returncode == EXIT_USAGE, result.stderr
    assert "concurrency" in result.stderr and "Traceback" not in result.stderr


def test_load_with_a_bad_request_is_one_usage_error(small_model: Path) -> None:
    """A bad request (here --sha256) is checked after `load` launched its fork server: exit 2,
    the field named, no traceback; under --json, stdout is the one error document."""
    plain = run("load", str(small_model), "--sha256", "not-hex")
    as_json = run("load", str(small_model), "--sha256", "not-hex", "--json")
    for result in (plain, as_json):
        assert result.returncode == EXIT_USAGE, result.stderr
        assert "sha256" in result.stderr and "Traceback" not in result.stderr
    assert plain.stdout == ""
    assert json.loads(as_json.stdout)["error"]["type"] == "BadParameter"


@pytest.mark.parametrize("command", ["load", "enqueue"])
def test_an_unknown_log_level_is_one_usage_error(small_model: Path, command: str) -> None:
    """`--log-level bogus` is a usage error (exit 2) naming the levels, before anything runs
    (no Redis is reached), not a traceback; under --json, stdout is the one error document."""
    args = (command, str(small_model), "--redis", "redis://127.0.0.1:1", "--log-level", "bogus")
    if command == "load":
        args = (command, str(small_model), "--log-level", "bogus")
    plain = run(*args)
    as_json = run(*args, "--json")
    for result in (plain, as_json):
        assert result.returncode == EXIT_USAGE, result.stderr
        assert "debug, info, warning, error" in result.stderr
        assert "Traceback" not in result.stderr
    assert plain.stdout == ""
    assert json.loads(as_json.stdout)["error"]["type"] == "BadParameter"


def test_log_level_is_case_insensitive(small_model: Path) -> None:
    """`--log-level WARNING` is the same level as `warning`."""
    result = run("load", str(small_model), "--log-level", "WARNING", "--json")
    assert result.returncode == EXIT_OK, result.stderr


def test_inspect_prints_summary_or_defect(small_model: Path, bad_model: Path) -> None:
    """`inspect --json` prints {outcome, error, model}: the summary, or the named defect."""
    good = run("inspect", str(small_model), "--json")
    bad = run("inspect", str(bad_model), "--json")
    assert good.returncode == EXIT_OK and json.loads(good.stdout)["model"]["parameters"] > 0
    document = json.loads(bad.stdout)
    assert bad.returncode == EXIT_OUTCOME
    assert (document["outcome"], document["error"]["code"]) == ("invalid", "header_too_large")


def test_enqueue_wait_prints_report_from_redis(
    worker_process: subprocess.Popen[bytes], redis_url: str, small_model: Path
) -> None:
    """With a worker running, `enqueue FILE --wait --json` prints the report that came back."""
    result = run("enqueue", str(small_model), "--wait", "--json", "--redis", redis_url)
    assert result.returncode == EXIT_OK, result.stderr
    report = LoadReport.model_validate_json(result.stdout)
    assert report.outcome is Outcome.OK and report.worker.pid == worker_process.pid


def test_enqueue_then_report_by_id(
    worker_process: subprocess.Popen[bytes], redis_url: str, bad_model: Path
) -> None:
    """`enqueue --json` prints the job id; `report ID --wait --json` prints its report."""
    env = {"LOADWARDEN_REDIS_URL": redis_url}
    enqueued = run("enqueue", str(bad_model), "--json", env=env)
    job_id = json.loads(enqueued.stdout)["job_id"]
    result = run("report", job_id, "--wait", "--json", env=env)
    assert result.returncode == EXIT_OUTCOME
    assert json.loads(result.stdout)["job_id"] == job_id


def test_blocking_client_against_a_worker_process(
    worker_process: subprocess.Popen[bytes], redis_url: str, small_model: Path
) -> None:
    """The synchronous facade enqueues and waits like the async client, with the same handle."""
    with BlockingClient(redis_url) as client:
        handle = client.enqueue(LoadRequest(source=str(small_model)))
        assert handle.report(timeout_s=30).outcome is Outcome.OK
        assert client.report(handle.job_id, timeout_s=0).outcome is Outcome.OK
        assert handle.status() is JobState.COMPLETE


def test_no_answer_exits_3(tmp_path: Path) -> None:
    """Unreachable Redis and unknown job ids exit 3 with a clear message."""
    result = run("report", "nope", "--redis", f"unix://{tmp_path}/none.sock")
    assert result.returncode == EXIT_NO_ANSWER
    assert "cannot reach Redis" in result.stderr


def test_worker_stops_cleanly_on_sigterm(worker_process: subprocess.Popen[bytes]) -> None:
    """SIGTERM stops an idle worker promptly with exit 0, its fork server gone with it."""
    worker_process.send_signal(signal.SIGTERM)
    assert worker_process.wait(30) == 0


def test_enqueue_wait_without_redis_runs_embedded(small_model: Path, tmp_path: Path) -> None:
    """With no Redis configured, `enqueue --wait` runs on an embedded server and worker."""
    env = {"XDG_STATE_HOME": str(tmp_path / "state"), "LOADWARDEN_REDIS_URL": ""}
    result = run("enqueue", str(small_model), "--wait", "--json", env=env)
    assert result.returncode == EXIT_OK, result.stderr
    assert "running embedded" in result.stderr
    assert LoadReport.model_validate_json(result.stdout).outcome is Outcome.OK
    assert run("enqueue", str(small_model), env=env).returncode == 2


def test_cancel_and_dead_letters_from_the_cli(redis_url: str, bad_model: Path) -> None:
    """`cancel` answers for a queued job; `dead list`, `dead retry` and `dead purge` work."""
    import asyncio

    from loadwarden.producer.client import Client
    from loadwarden.worker.config import Settings
    from loadwarden.worker.queue.runner import WorkerRunner

    env = {"LOADWARDEN_REDIS_URL": redis_url}
    queued = json.loads(run("enqueue", str(bad_model), "--json", env=env).stdout)["job_id"]
    cancelled = run("cancel", queued, "--json", env=env)
    assert json.loads(cancelled.stdout) == {
        "job_id": queued,
        "state": "queued",
        "cancel_sent": True,
    }
    assert run("cancel", "no-such-job", env=env).returncode == EXIT_NO_ANSWER

    async def drain() -> None:
        # A worker in burst mode: runs what is queued (the cancelled job, a bad file), then stops.
        settings = Settings(redis_url=redis_url)
        async with Client(settings=settings) as client:
            await client.enqueue(LoadRequest(source=str(bad_model), labels={"second": "yes"}))
        await WorkerRunner(settings, burst=True, handle_signals=False).run()

    asyncio.run(drain())
    dead = json.loads(run("dead", "list", "--json", env=env).stdout)
    assert [d["outcome"] for d in dead] == ["invalid"]  # the cancelled job is not dead-lettered
    retried = json.loads(run("dead", "retry", dead[0]["id"], "--json", env=env).stdout)
    assert len(retried["job_ids"]) == 1
    assert json.loads(run("dead", "list", "--json", env=env).stdout) == []
    assert json.loads(run("dead", "purge", "--yes", "--json", env=env).stdout) == {"removed": 0}
