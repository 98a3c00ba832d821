"""Every path of a job ends in a report: each stage of the load path fails in turn.

Faults are injected into a real in-process worker (real Redis, real fork server
and children) by replacing one of our own functions for the length of a job.
"""

from __future__ import annotations

import errno
import json
import pkgutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from loadwarden.producer.client import Client
from loadwarden.producer.contract import LoadRequest, Outcome, RetryPolicy
from loadwarden.worker.config import Settings
from loadwarden.worker.sandbox.cgroups import CgroupManager
from tests.conftest import running_worker


def _raise(exc: BaseException) -> Callable[..., Any]:
    def fail(*args: object, **kwargs: object) -> Any:
        raise exc

    return fail


def _once(exc: BaseException, real: Callable[..., Any]) -> Callable[..., Any]:
    """Raise ``exc`` the first time, then behave as ``real`` (a transient fault)."""
    calls: list[int] = []

    async def flaky(*args: object, **kwargs: object) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise exc
        return await real(*args, **kwargs)

    return flaky


#: stage -> (object path, attribute, replacement factory, expected outcome, expected code).
STAGES: dict[str, tuple[str, str, Callable[..., Any], str, str]] = {
    "parse": (
        "loadwarden.producer.contract.LoadRequest",
        "model_validate",
        lambda real: _raise(RecursionError("injected")),
        "invalid",
        "bad_request",
    ),
    "resolve_source": (
        "loadwarden.worker.load.supervisor",
        "open_model",
        lambda real: _raise(RuntimeError("injected")),
        "unavailable",
        "source_error",
    ),
    "open": (  # on the loop or in a thread, every opened file is adopted here
        "loadwarden.worker._files.ModelFile",
        "adopt",
        lambda real: _raise(OSError(errno.EIO, "injected")),
        "unavailable",
        "source_error",
    ),
    "inspect": (
        "loadwarden.worker.load.supervisor",
        "inspect_opened",
        lambda real: _raise(ValueError("Exceeds the limit (4300 digits)")),
        "invalid",
        "inspection_error",
    ),
    "derive_limits": (
        "loadwarden.worker.load.supervisor",
        "derive_limits",
        lambda real: _raise(ZeroDivisionError("injected")),
        "crashed",
        "internal_error",
    ),
    "admit": (
        "loadwarden.worker.load.admission.Admission",
        "reserve",
        lambda real: _raise(RuntimeError("injected")),
        "crashed",
        "internal_error",
    ),
    "child_start": (
        "loadwarden.worker.sandbox.forkserver.ForkServer",
        "spawn",
        lambda real: _raise(OSError(errno.EMFILE, "injected")),
        "crashed",
        "sandbox",
    ),
    "child_run": (
        "loadwarden.worker.load._child_run",
        "_converse",
        lambda real: _raise(RuntimeError("injected")),
        "crashed",
        "sandbox",
    ),
    "classify": (
        "loadwarden.worker.load.supervisor",
        "decide",
        lambda real: _raise(RuntimeError("injected")),
        "crashed",
        "internal_error",
    ),
    "store_result": (
        "loadwarden.worker.queue.jobs.JobBook",
        "finish",
        lambda real: _raise(RuntimeError("injected")),
        "ok",
        "",
    ),
    "store_result_redis_lost": (
        "loadwarden.worker.queue.jobs.JobBook",
        "finish",
        lambda real: _once(RedisConnectionError("injected"), real),
        "ok",
        "",
    ),
}


@pytest.mark.parametrize("stage", list(STAGES))
async def test_a_failing_stage_still_ends_in_a_report(
    stage: str, settings: Settings, small_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stage that raises what nobody expected ends the job with a classified report (and a
    dead letter unless ok); the worker stays up and runs the next job."""
    where, attr, make, outcome, code = STAGES[stage]
    target = pkgutil.resolve_name(where)
    request = LoadRequest(source=str(small_model), retry=RetryPolicy(max_attempts=1))
    async with running_worker(settings) as runner, Client(settings=settings) as client:
        monkeypatch.setattr(target, attr, make(getattr(target, attr)))
        report = await (await client.enqueue(request)).report(timeout_s=30)
        monkeypatch.undo()
        dead = [d.job_id for d in await client.dead_letters()]
        after = await (await client.enqueue(LoadRequest(source=str(small_model)))).report(
            timeout_s=30
        )
        assert runner.arq is not None and runner.arq.alive
    assert (str(report.outcome), report.error.code if report.error else "") == (outcome, code)
    assert (report.job_id in dead) is (outcome != "ok")
    assert after.outcome is Outcome.OK


async def test_cgroup_creation_failure_ends_in_a_report(
    settings: Settings, small_model: Path, tmp_path: Path
) -> None:
    """An OSError creating the load's cgroup (here: its parent folder is gone) is a crash report."""
    request = LoadRequest(source=str(small_model), retry=RetryPolicy(max_attempts=1))
    async with running_worker(settings) as runner, Client(settings=settings) as client:
        real = runner.supervisor.cgroups
        runner.supervisor.cgroups = CgroupManager(2, tmp_path / "no-such-cgroup", None)
        try:
            report = await (await client.enqueue(request)).report(timeout_s=30)
        finally:
            runner.supervisor.cgroups = real
    assert report.outcome is Outcome.CRASHED
    assert report.error is not None and report.error.code == "cgroup_failed"


def _npy_with_huge_dimension(path: Path) -> Path:
    """A .npy whose shape holds a 4000-digit hex integer (repr() of it raises ValueError)."""
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (0x" + "f" * 4000 + ",), }"
    header += " " * (-(len(header) + 11) % 64) + "\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode())
    return path


@pytest.mark.parametrize("command", ["inspect", "load"])
def test_huge_integer_in_a_header_is_a_clean_invalid(command: str, tmp_path: Path) -> None:
    """`inspect` and `load` of a header holding a 4000-digit integer say invalid, no traceback."""
    document = _cli_report(command, _npy_with_huge_dimension(tmp_path / "huge.npy"))
    assert document["outcome"] == "invalid"


def _cli_report(command: str, path: Path) -> dict[str, Any]:
    """Run `loadwarden COMMAND PATH --json`: exit 1, no traceback, one JSON document."""
    out = subprocess.run(
        [str(Path(sys.executable).parent / "loadwarden"), command, str(path), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    document: dict[str, Any] = json.loads(out.stdout)
    return document


async def test_huge_integer_in_a_header_through_the_worker(
    settings: Settings, tmp_path: Path
) -> None:
    """Through a worker, the same file ends invalid with a report and a dead letter."""
    path = _npy_with_huge_dimension(tmp_path / "huge.npy")
    async with running_worker(settings), Client(settings=settings) as client:
        report = await (await client.enqueue(LoadRequest(source=str(path)))).report(timeout_s=30)
        dead = [d.job_id for d in await client.dead_letters()]
    assert report.outcome is Outcome.INVALID and report.job_id in dead


async def test_source_with_a_nul_byte(settings: Settings) -> None:
    """A NUL byte in a source is refused by the contract, and by the worker if planted anyway."""
    with pytest.raises(ValueError, match="NUL"):
        LoadRequest(source="/models/a\0b.safetensors")
    async with running_worker(settings), Client(settings=settings) as client:
        pool = await client.redis()
        await pool.enqueue_job(
            "load",
            request={"source": "/models/a\0b.safetensors"},
            _job_id="nul",
            _queue_name=settings.queue_name,
        )
        report = await client.report("nul", timeout_s=30)
    assert report.outcome is Outcome.INVALID
    assert report.error is not None and report.error.code == "bad_request"


def _symlink_loop(tmp_path: Path) -> Path:
    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(loop.name)
    return loop


def _directory_loop(tmp_path: Path) -> Path:
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    return tmp_path / "a" / "model.safetensors"


def _name_too_long(tmp_path: Path) -> Path:
    return tmp_path / ("x" * 300 + ".safetensors")


@pytest.mark.parametrize(
    ("make", "codes"),
    [
        (_symlink_loop, {"symlink_loop", "symlink"}),  # inspect refuses every symlink
        (_directory_loop, {"symlink_loop"}),
        (_name_too_long, {"bad_path"}),
    ],
    ids=["symlink_loop", "directory_loop", "name_too_long"],
)
@pytest.mark.parametrize("command", ["inspect", "load"])
def test_unresolvable_paths_are_refused_with_a_report(
    command: str, make: Callable[[Path], Path], codes: set[str], tmp_path: Path
) -> None:
    """`inspect` and `load` of a path that cannot be resolved print a `refused` report."""
    document = _cli_report(command, make(tmp_path))
    assert document["outcome"] == "refused" and document["error"]["code"] in codes
