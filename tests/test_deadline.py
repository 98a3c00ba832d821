"""One deadline and one cancel for the whole job (source, inspection, load), and bounded
supervisor memory whatever the header (issue #11, findings 2 and 4)."""

from __future__ import annotations

import asyncio
import io
import resource
import time
import zipfile
from pathlib import Path

import psutil
import pytest

from loadwarden.producer.contract import LimitOverrides, LoadRequest, Outcome
from loadwarden.worker.config import Settings
from loadwarden.worker.load._deadline import CancelFlag, Stopped, until
from loadwarden.worker.load._outcome import Stop
from loadwarden.worker.load.supervisor import Supervisor
from loadwarden.worker.sources import _http  # noqa: F401 (imported now, not in the deadline)
from tests import format_files as ff
from tests.conftest import eventually
from tests.safetensors_files import raw_file
from tests.test_sources import ModelServer, partials, server, web

#: Members of the slow archive, each with a header just under the 10,000-byte cap:
#: about 0.12 ms each to inspect on an idle machine here, so about 5 s in all, well past
#: the 1 s deadline (8,000 members took 0.96 s: the job could beat its deadline).
SLOW_MEMBERS = 40_000
#: The job deadline the tests ask for.
DEADLINE_S = 1.0
#: How far past its deadline a job may end (the child's reaping, the report).
SLACK_S = 2.0
__all__ = ["server"]  # the loopback HTTP server fixture, shared with test_sources

#: The supervisor's memory per job must stay under this whatever the input.
SUPERVISOR_BOUND_BYTES = 64 * 1024 * 1024


def _slow_npz() -> bytes:
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (0,), }" + " " * 9800
    member = ff.npy_bytes(header)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for n in range(SLOW_MEMBERS):
            archive.writestr(f"m{n}.npy", member)
    return out.getvalue()


@pytest.fixture(scope="module")
def slow_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("slow") / "slow.npz"
    path.write_bytes(_slow_npz())
    return path


def _inspection_children() -> list[psutil.Process]:
    return [
        p
        for p in psutil.Process().children(recursive=True)
        if any("_inspect_child" in part for part in p.cmdline())
    ]


async def test_a_trickling_download_ends_at_the_job_deadline(
    server: ModelServer, tmp_path: Path
) -> None:
    """A server sending a byte inside every read timeout cannot hold a job past its deadline."""
    cache = tmp_path / "cache"
    settings = Settings(sources=web(cache))
    async with Supervisor(settings) as sup:
        started = time.monotonic()
        request = LoadRequest(
            source=server.url("/trickle/m.safetensors"),
            limits=LimitOverrides(timeout_seconds=DEADLINE_S),
        )
        report = await asyncio.wait_for(sup.load(request), DEADLINE_S + 10)
        elapsed = time.monotonic() - started
    assert report.outcome is Outcome.TIMEOUT, report.error
    assert report.error is not None and report.error.code == "deadline"
    assert "opening the source" in report.error.message
    assert elapsed < DEADLINE_S + SLACK_S
    assert server.stalled.is_set() and partials(cache) == []


async def test_a_slow_inspection_ends_at_the_job_deadline(slow_npz: Path) -> None:
    """A header that takes seconds to inspect is stopped at the deadline, its child killed."""
    async with Supervisor(Settings()) as sup:
        started = time.monotonic()
        request = LoadRequest(source=str(slow_npz), limits=LimitOverrides(timeout_seconds=1))
        report = await asyncio.wait_for(sup.load(request), 30)
        elapsed = time.monotonic() - started
        assert sup.forkserver.spawned == 0
    assert report.outcome is Outcome.TIMEOUT, report.error
    assert report.error is not None and "inspecting" in report.error.message
    assert elapsed < DEADLINE_S + SLACK_S
    assert _inspection_children() == []


async def test_cancel_interrupts_inspection(slow_npz: Path) -> None:
    """Cancelling while a header is inspected ends the job cancelled at once, its child killed."""
    cancel = asyncio.Event()
    async with Supervisor(Settings()) as sup:
        job = asyncio.create_task(sup.load(LoadRequest(source=str(slow_npz)), cancel=cancel))
        await eventually(_inspection_children, 10, "an inspection child started")
        cancel.set()
        report = await asyncio.wait_for(job, SLACK_S)
    assert report.outcome is Outcome.CANCELLED, report.error
    assert report.error is not None and "inspecting" in report.error.message
    assert _inspection_children() == []


def _nested_arrays_header() -> bytes:
    """A 16 MiB safetensors header that is one tensor entry's worth of empty arrays."""
    body = b'{"t":[' + b"[]," * (5 * 1024 * 1024) + b"[]]}"
    return raw_file(body)


async def test_supervisor_memory_stays_bounded_on_a_costly_header(tmp_path: Path) -> None:
    """A 16 MiB header of nested arrays is rejected without the supervisor's memory growing."""
    path = tmp_path / "nested.safetensors"
    path.write_bytes(_nested_arrays_header())
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    async with Supervisor(Settings()) as sup:
        report = await sup.load(LoadRequest(source=str(path)))
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak_before
    assert report.outcome is Outcome.INVALID, report.error
    assert grown < SUPERVISOR_BOUND_BYTES, f"the supervisor's peak RSS grew by {grown} bytes"


async def _forever(stopped: asyncio.Event) -> None:
    """Work that never ends on its own; notes that it was cancelled."""
    try:
        await asyncio.Event().wait()
    finally:
        stopped.set()


#: A plain event (``loadwarden load``, a library caller) and a job's own (``JobBook``).
CANCELS = pytest.mark.parametrize("make_cancel", [asyncio.Event, CancelFlag])


@CANCELS
async def test_until_stops_work_at_its_deadline(make_cancel: type[asyncio.Event]) -> None:
    """Past the deadline the work is cancelled and awaited, then Stopped says deadline."""
    stopped = asyncio.Event()
    deadline = asyncio.get_running_loop().time() + 0.05
    with pytest.raises(Stopped) as caught:
        await until(_forever(stopped), deadline, make_cancel())
    assert caught.value.why is Stop.DEADLINE
    assert stopped.is_set()


@CANCELS
async def test_until_stops_work_on_a_cancel(make_cancel: type[asyncio.Event]) -> None:
    """A cancel set while the work runs stops it at once, and Stopped says cancel."""
    stopped, cancel = asyncio.Event(), make_cancel()
    asyncio.get_running_loop().call_soon(cancel.set)
    with pytest.raises(Stopped) as caught:
        await until(_forever(stopped), asyncio.get_running_loop().time() + 60, cancel)
    assert caught.value.why is Stop.CANCEL
    assert stopped.is_set()


@CANCELS
async def test_until_stops_at_once_on_a_cancel_set_before(make_cancel: type[asyncio.Event]) -> None:
    """A cancel already set stops the work at once (it never ends by itself), as cancel."""
    cancel = make_cancel()
    cancel.set()
    with pytest.raises(Stopped) as caught:
        await until(_forever(asyncio.Event()), asyncio.get_running_loop().time() + 60, cancel)
    assert caught.value.why is Stop.CANCEL


async def test_a_cancel_flag_is_followed_only_while_until_waits() -> None:
    """Once ``until`` returns, the flag holds nothing of it: a cancel set later wakes no one."""

    async def answer() -> int:
        return 42

    flag = CancelFlag()
    assert await until(answer(), asyncio.get_running_loop().time() + 60, flag) == 42
    assert flag._followers == set()
    flag.set()
    assert flag.is_set()


async def test_until_returns_what_the_work_returns_or_raises_what_it_raises() -> None:
    """Work that ends in time gives its result, or its own error (not a Stopped)."""

    async def answer() -> int:
        return 42

    async def fail() -> None:
        raise ValueError("its own")

    later = asyncio.get_running_loop().time() + 60
    assert await until(answer(), later, None) == 42
    with pytest.raises(ValueError, match="its own"):
        await until(fail(), later, None)
