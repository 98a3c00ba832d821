"""One sandboxed load, end to end in-process: real fork server, real children, real limits."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import structlog
from safetensors.numpy import load_file

from loadwarden.producer.contract import LimitOverrides, LoadReport, LoadRequest, Outcome
from loadwarden.producer.errors import (
    ChildCrashed,
    CpuExceeded,
    InvalidModel,
    LoadTimeout,
    MemoryExceeded,
)
from loadwarden.worker.config import LimitPolicy, Settings
from loadwarden.worker.formats import ModelFormat
from loadwarden.worker.load.supervisor import Supervisor
from loadwarden.worker.sandbox import forkserver
from loadwarden.worker.sandbox.cgroups import Cgroup
from loadwarden.worker.sandbox.children import Child, stop_child
from tests.conftest import TEST_LOADERS, assert_pid_gone, eventually, group_members, require_cgroups
from tests.safetensors_files import entry, raw_file, valid_model, write

pytestmark = pytest.mark.timeout(60)


def _child_pid(events: list[structlog.typing.EventDict]) -> int:
    started = [e for e in events if e["event"] == "load_started"]
    assert len(started) == 1
    return int(started[0]["child_pid"])


async def _child_started(events: list[structlog.typing.EventDict], timeout_s: float = 10) -> int:
    """Wait, with a bound, until the supervisor has logged load_started; return the child's pid."""
    await eventually(
        lambda: any(e["event"] == "load_started" for e in events), timeout_s, "the load started"
    )
    return _child_pid(events)


async def test_valid_model_manifest_matches_reference(
    supervisor: Supervisor, small_model: Path
) -> None:
    """A valid multi-dtype model loads ok, and its manifest equals what safetensors reads."""
    digest = hashlib.sha256(small_model.read_bytes()).hexdigest()  # noqa: ASYNC240 (1 MB)
    report = await supervisor.load(LoadRequest(source=str(small_model), sha256=digest))
    assert report.outcome is Outcome.OK, report.error
    assert report.model is not None and report.model.sha256 == digest
    reference = load_file(small_model)
    manifest = {t.name: (t.dtype, t.shape, t.bytes) for t in report.model.tensors}
    assert manifest.keys() == reference.keys()
    for name, arr in reference.items():
        dtype, shape, nbytes = manifest[name]
        assert (shape, nbytes) == (list(arr.shape), arr.nbytes)
        assert (
            dtype
            == {
                "float32": "F32",
                "float16": "F16",
                "int64": "I64",
                "bool": "BOOL",
                "float64": "F64",
                "uint8": "U8",
            }[arr.dtype.name]
        )
    assert report.model.parameters == sum(a.size for a in reference.values())
    assert report.resources is not None
    assert report.resources.peak_rss_bytes > 0 and report.resources.read_bytes >= report.model.bytes
    assert {"setsid", "no_new_privs", "rlimit_as", "rlimit_cpu", "pdeathsig"} <= set(
        report.confinement
    )


async def test_an_unpinned_file_is_not_hashed(supervisor: Supervisor, small_model: Path) -> None:
    """A single file with no digest to check loads without a hash: model.sha256 is null."""
    report = await supervisor.load(LoadRequest(source=str(small_model)))
    assert report.outcome is Outcome.OK, report.error
    assert report.model is not None and report.model.sha256 is None


async def test_wrong_sha256_is_invalid(supervisor: Supervisor, small_model: Path) -> None:
    """A digest that does not match the file gives invalid with code sha256_mismatch."""
    report = await supervisor.load(LoadRequest(source=str(small_model), sha256="0" * 64))
    assert report.outcome is Outcome.INVALID
    assert report.error is not None and report.error.code == "sha256_mismatch"
    with pytest.raises(InvalidModel):
        report.raise_for_outcome()


DEFECTS = {
    "header_too_large": raw_file("{}", length=2**40),
    "header_beyond_file": raw_file('{"t": 1}', length=100),
    "header_not_utf8": raw_file(b'{"\xff": 1}'),
    "duplicate_key": raw_file('{"t": {}, "t": {}}'),
    "non_finite_number": raw_file('{"__metadata__": {"a": NaN}}'),
    "unknown_dtype": raw_file({"t": entry("Q9", [4], 0, 4)}, b"\0" * 4),
    "bad_shape": raw_file({"t": entry("U8", [-4], 0, 4)}, b"\0" * 4),
    "offsets_not_contiguous": raw_file(
        {"a": entry("U8", [4], 0, 4), "b": entry("U8", [4], 2, 6)}, b"\0" * 6
    ),
    "data_size_mismatch": raw_file({"t": entry("U8", [4], 0, 4)}, b"\0" * 2),
}


@pytest.mark.parametrize("code", sorted(DEFECTS))
async def test_header_defect_is_invalid_without_a_child(
    supervisor: Supervisor, tmp_path: Path, code: str
) -> None:
    """Each class of header defect gives invalid, names the defect, and starts no child."""
    path = write(tmp_path / "bad.safetensors", DEFECTS[code])
    before = supervisor.forkserver.spawned
    report = await supervisor.load(LoadRequest(source=path))
    assert report.outcome is Outcome.INVALID
    assert report.error is not None and report.error.code == code
    assert supervisor.forkserver.spawned == before
    assert report.resources is None


@pytest.mark.parametrize("loader", ["stop_self", "hang"])
async def test_load_that_never_finishes_times_out(
    make_supervisor: Callable[..., Supervisor],
    small_model: Path,
    loader: str,
    captured_events: list[structlog.typing.EventDict],
) -> None:
    """A child that never answers gives timeout within deadline + 1 s, and its group is gone."""
    async with make_supervisor(loader) as sup:
        loop = asyncio.get_running_loop()
        started = loop.time()
        report = await sup.load(
            LoadRequest(source=str(small_model), limits=LimitOverrides(timeout_seconds=1.0))
        )
        elapsed = loop.time() - started
    assert report.outcome is Outcome.TIMEOUT
    assert report.error is not None and report.error.type == LoadTimeout.__name__
    assert elapsed < 1.0 + 1.0
    pid = _child_pid(captured_events)
    assert_pid_gone(pid)
    assert group_members(pid) == []


async def test_grandchildren_die_with_the_group(
    make_supervisor: Callable[..., Supervisor],
    small_model: Path,
    captured_events: list[structlog.typing.EventDict],
) -> None:
    """A loader's own child is killed with the process group when the load is stopped."""
    async with make_supervisor("grandchild") as sup:
        report = await sup.load(
            LoadRequest(source=str(small_model), limits=LimitOverrides(timeout_seconds=1.0))
        )
    assert report.outcome is Outcome.TIMEOUT
    pid = _child_pid(captured_events)
    assert_pid_gone(pid)
    assert group_members(pid) == []


async def test_memory_limit_below_need_is_memory_exceeded(
    supervisor: Supervisor, tmp_path: Path
) -> None:
    """A memory limit below what the model needs gives memory_exceeded."""
    import numpy as np

    path = valid_model(
        tmp_path / "big.safetensors", {"w": np.ones((64, 1024, 1024), dtype=np.uint8)}
    )
    report = await supervisor.load(
        LoadRequest(source=path, limits=LimitOverrides(memory_bytes=32 * 1024 * 1024))
    )
    assert report.outcome is Outcome.MEMORY_EXCEEDED, report.error
    assert report.error is not None and report.error.type == MemoryExceeded.__name__


async def test_cpu_limit_on_a_spinning_child_is_cpu_exceeded(
    make_supervisor: Callable[..., Supervisor], small_model: Path
) -> None:
    """A child that spins past its CPU-time limit gives cpu_exceeded, not timeout."""
    async with make_supervisor("spin") as sup:
        report = await sup.load(
            LoadRequest(
                source=str(small_model), limits=LimitOverrides(cpu_seconds=1, timeout_seconds=20)
            )
        )
    assert report.outcome is Outcome.CPU_EXCEEDED, report.error
    assert report.error is not None and report.error.type == CpuExceeded.__name__
    assert report.resources is not None
    # The kernel checks RLIMIT_CPU on its own clock, which rusage's user + system time
    # does not match exactly: it has read 0.85 s for a 1 s limit on a busy machine.
    assert report.resources.cpu_user_seconds + report.resources.cpu_system_seconds >= 0.75


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGTERM, signal.SIGKILL])
async def test_child_killed_by_a_signal_is_crashed(
    make_supervisor: Callable[..., Supervisor],
    small_model: Path,
    sig: signal.Signals,
    captured_events: list[structlog.typing.EventDict],
) -> None:
    """A child killed by a signal from outside gives crashed, naming the signal."""
    async with make_supervisor("hang") as sup:
        task = asyncio.create_task(sup.load(LoadRequest(source=str(small_model))))
        pid = await _child_started(captured_events)
        os.kill(pid, sig)
        report = await task
    assert report.outcome is Outcome.CRASHED
    assert report.error is not None and report.error.type == ChildCrashed.__name__
    assert sig.name in report.error.message


async def test_protocol_violation_is_crashed(
    make_supervisor: Callable[..., Supervisor], small_model: Path
) -> None:
    """A child whose answer breaks the protocol is reported crashed, never trusted."""
    async with make_supervisor("bad_reply") as sup:
        report = await sup.load(LoadRequest(source=str(small_model)))
    assert report.outcome is Outcome.CRASHED
    assert report.error is not None and report.error.code == "protocol_violation"


async def test_cancelled_load_leaves_no_child(
    make_supervisor: Callable[..., Supervisor],
    small_model: Path,
    captured_events: list[structlog.typing.EventDict],
) -> None:
    """Cancelling a running load (worker shutdown) kills its child and re-raises the cancel."""
    async with make_supervisor("hang") as sup:
        task = asyncio.create_task(sup.load(LoadRequest(source=str(small_model))))
        pid = await _child_started(captured_events)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert_pid_gone(pid)


async def test_symlink_and_missing_file_are_classified(
    supervisor: Supervisor, small_model: Path, tmp_path: Path
) -> None:
    """A symlink out of the roots is refused, a missing file unavailable: no child starts."""
    link = tmp_path / "link.safetensors"
    link.symlink_to("/etc/passwd")
    refused = await supervisor.load(LoadRequest(source=str(link)))
    missing = await supervisor.load(LoadRequest(source=str(tmp_path / "nope.safetensors")))
    assert (refused.outcome, missing.outcome) == (Outcome.REFUSED, Outcome.UNAVAILABLE)
    assert refused.error is not None and refused.error.code == "outside_root"
    assert supervisor.forkserver.spawned == 0


MiB = 1024 * 1024
#: Zero-size tensors whose per-tensor cost alone passes the tight policy's memory.
MANY_TENSORS = 30_000
#: The child's baseline and slack cut to the bone (it starts near 23 MiB), so that a
#: few seconds' worth of tensors is enough to show what per-tensor overhead does.
TIGHT = LimitPolicy(
    baseline_memory_bytes=24 * MiB, memory_slack_bytes=8 * MiB, memory_floor_bytes=32 * MiB
)


async def test_many_zero_size_tensors_load_ok(tmp_path: Path) -> None:
    """A valid file of many zero-size tensors loads ok: its memory limit counts every tensor."""
    path = tmp_path / "many.safetensors"
    write(path, raw_file({f"t{n}": entry("F32", [0], 0, 0) for n in range(MANY_TENSORS)}))
    async with Supervisor(Settings(limits=TIGHT)) as sup:
        report = await sup.load(LoadRequest(source=str(path)))
    assert report.outcome is Outcome.OK, report.error
    assert report.model is not None and report.model.tensor_count == MANY_TENSORS
    assert report.model.tensors_truncated  # the report lists the first REPORT_MAX_TENSORS


_SPEC = {
    "loader": "safetensors",
    "memory_bytes": 1 << 30,
    "cpu_seconds": 5.0,
    "max_fds": 64,
    "address_space_limit": True,
    "landlock": False,
    "manifest_digest": "ab" * 32,
    "expect": {"dev": 1, "ino": 2, "size": 3},
}


def test_child_spec_round_trips_typed() -> None:
    """The spec the supervisor sends is the spec the child reads, as typed fields."""
    from loadwarden.worker.sandbox.spec import ChildSpec, FileIdentity, SpecFile

    one = ChildSpec.from_json(_SPEC)
    assert one.identities == [FileIdentity(1, 2, 3)] and one.memory_bytes == 1 << 30
    assert ChildSpec.from_json(json.loads(json.dumps(one.to_json()))) == one
    shards = ChildSpec(
        **{**one.to_json(), "expect": None},
        files=(SpecFile("a", FileIdentity(1, 2, 3)), SpecFile("b", FileIdentity(1, 4, 5))),
    )
    assert ChildSpec.from_json(json.loads(json.dumps(shards.to_json()))) == shards
    assert [f.ino for f in shards.identities] == [2, 4]


@pytest.mark.parametrize(
    "change",
    [
        {"memory_bytes": "1073741824"},  # a string
        {"memory_bytes": True},  # a bool is not a count
        {"memory_bytes": 0},
        {"cpu_seconds": float("nan")},
        {"landlock": 1},
        {"manifest_digest": 7},
        {"expect": {"dev": 1, "ino": 2}},  # a field missing
        {"expect": {"dev": 1, "ino": 2, "size": 3, "path": "/etc/passwd"}},  # one unknown
        {"files": [{"name": "a", "expect": {"dev": 1, "ino": 2, "size": 3}}]},  # and expect
        {"sha256": "ab" * 32},  # the loader is never told a digest
        {"loader": None},
    ],
)
def test_child_spec_refuses_what_the_supervisor_never_sends(change: dict[str, object]) -> None:
    """A missing, unknown or mistyped field is a SpecError in the child, not a KeyError later."""
    from loadwarden.worker.sandbox.spec import ChildSpec, SpecError

    with pytest.raises(SpecError):
        ChildSpec.from_json({**_SPEC, **change})


def _started_pids(events: list[structlog.typing.EventDict]) -> list[int]:
    return [int(e["child_pid"]) for e in events if e["event"] == "load_started"]


async def test_the_next_load_takes_a_child_forked_ahead(
    supervisor: Supervisor,
    small_model: Path,
    captured_events: list[structlog.typing.EventDict],
) -> None:
    """After a load, one child waits forked ahead; the next load takes it (counted as one
    child, used by that load alone) and another is forked ahead."""
    server = supervisor.forkserver
    assert server.waiting == []  # none before the first load
    assert (await supervisor.load(LoadRequest(source=str(small_model)))).ok
    ahead = (await eventually(lambda: server.waiting, what="a child forked ahead"))[0]
    if supervisor.cgroups is not None:  # it waits in a cgroup of its own, not the worker's
        folder = supervisor.cgroups.memory_base / f"child-{ahead}"
        assert str(ahead) in (folder / "cgroup.procs").read_text().split()
    assert (await supervisor.load(LoadRequest(source=str(small_model)))).ok
    assert _started_pids(captured_events)[1] == ahead and server.spawned == 2
    assert_pid_gone(ahead)  # it ended with its load; its cgroup is removed after the report
    if supervisor.cgroups is not None:
        await supervisor.cgroups.drain()
        assert not (supervisor.cgroups.memory_base / f"child-{ahead}").exists()
    assert (await eventually(lambda: server.waiting, what="another forked ahead")) != [ahead]


async def test_a_child_forked_ahead_is_placed_off_the_event_loop(
    supervisor: Supervisor, small_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Placing a child forked ahead in its cgroup blocks a thread, not the event loop (the
    kernel's cgroup locks can hold a mkdir or a migration for a grace period): a load
    runs to its end while that placement is held."""
    require_cgroups(supervisor)
    cgroups, server = supervisor.cgroups, supervisor.forkserver
    assert cgroups is not None
    request = LoadRequest(source=str(small_model))
    assert (await supervisor.load(request)).ok
    await eventually(lambda: server.waiting, what="a child forked ahead")
    prepare, held, release, timed_out = cgroups.prepare, threading.Event(), threading.Event(), []

    def held_prepare(name: str, pids_max: int) -> Cgroup:
        if not held.is_set():  # the next child forked ahead: held until the load below ends
            held.set()
            timed_out.append(not release.wait(10))
        return prepare(name, pids_max)

    monkeypatch.setattr(cgroups, "prepare", held_prepare)
    try:
        assert (await supervisor.load(request)).ok  # takes the child; the next one is held
        await eventually(held.is_set, what="the next child's placement under way")
        assert server.waiting == []
        assert (await supervisor.load(request)).ok  # forks and places a child of its own
    finally:
        release.set()
    await eventually(lambda: timed_out, what="the held placement released")
    assert timed_out == [False]  # released by the test, not by its bound
    await eventually(lambda: server.waiting, what="the held child, placed and waiting")


async def test_close_stops_a_child_forked_ahead_while_it_is_placed(supervisor: Supervisor) -> None:
    """A child forked ahead whose placement (``on_ready``, a thread in the worker) is still
    running when the fork server closes is stopped, and its cgroup removed: it never joined
    the waiting children that ``close`` stops."""
    server = supervisor.forkserver
    placing: asyncio.Queue[int] = asyncio.Queue()
    release = asyncio.Event()
    placed = server.on_ready

    async def slow_place(child: Child) -> None:
        if placed is not None:
            await placed(child)
        placing.put_nowait(child.pid)
        await release.wait()  # never set: close cancels it

    server.on_ready = slow_place
    first = await server.spawn()  # another is forked ahead, then held in slow_place
    async with asyncio.timeout(10):
        held = await placing.get()
    await stop_child(first)
    if first.cgroup is not None:
        first.cgroup.remove()
    await server.close()
    assert server.waiting == []
    assert_pid_gone(held)
    if supervisor.cgroups is not None:
        await supervisor.cgroups.drain()
        assert not (supervisor.cgroups.memory_base / f"child-{held}").exists()


async def test_a_stale_child_forked_ahead_is_replaced_and_close_stops_it(
    small_model: Path,
    captured_events: list[structlog.typing.EventDict],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A child that waited past READY_MAX_AGE_S is killed, not used (it would soon stop
    waiting for its spec); close() stops the child still waiting."""
    async with Supervisor(Settings()) as sup:
        assert (await sup.load(LoadRequest(source=str(small_model)))).ok
        stale = (await eventually(lambda: sup.forkserver.waiting, what="a child ahead"))[0]
        monkeypatch.setattr(forkserver, "READY_MAX_AGE_S", 0.0)
        assert (await sup.load(LoadRequest(source=str(small_model)))).ok
        assert stale not in _started_pids(captured_events)
        assert_pid_gone(stale)
        waiting = await eventually(lambda: sup.forkserver.waiting, what="a fresh child ahead")
        base = sup.cgroups.memory_base if sup.cgroups is not None else None
        assert base is None or not (base / f"child-{stale}").exists()
    assert_pid_gone(waiting[0])
    assert base is None or not base.exists()  # its cgroup and the worker's are gone


def _descriptors(pid: int | None) -> list[str]:
    """What each of a process's descriptors is (a tiny /proc folder: read synchronously)."""
    folder = Path(f"/proc/{pid}/fd")
    return [os.readlink(entry) for entry in folder.iterdir()]


def _warmed_up(report: LoadReport) -> int:
    """The warm-up rounds a ``report_warm_up`` child inherited from its fork server."""
    assert report.error is not None and report.error.code == "loader_error", report.error
    return int(report.error.message.rsplit("warmed_up=", 1)[1])


async def test_the_fork_servers_warm_up_leaves_nothing_behind(
    make_supervisor: Callable[..., Supervisor], small_model: Path
) -> None:
    """The fork server warms its children's code on a file of its own (_child.warm_up)
    before it says it is ready: every round ran (children inherit the count); neither
    that file nor its socket pair stays open, and a load after it still succeeds."""
    async with make_supervisor("report_warm_up") as sup:
        await sup.forkserver.start()
        held = _descriptors(sup.forkserver.pid)
        assert not [d for d in held if "loadwarden-warm-up" in d], held
        assert len([d for d in held if d.startswith("socket:")]) == 1, held  # its control socket
        probed = await sup.load(LoadRequest(source=str(small_model)))
    assert _warmed_up(probed) == 16
    async with make_supervisor() as sup:
        report = await sup.load(LoadRequest(source=str(small_model)))
    assert report.outcome is Outcome.OK, report.error


@pytest.mark.parametrize("preload", ["tests.preload_no_memfd", "tests.preload_memfd_refused"])
async def test_a_fork_server_whose_warm_up_fails_still_starts_and_loads(
    small_model: Path, preload: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """Without os.memfd_create (an old glibc, musl), or with one the kernel refuses, the
    warm-up (only an optimisation) does not run, and the fork server starts confined and
    loads all the same; a refusal is one line on its stderr."""
    loaders = {ModelFormat.SAFETENSORS: "report_warm_up"}
    async with Supervisor(Settings(), preload=[TEST_LOADERS, preload], loaders=loaders) as sup:
        probed = await sup.load(LoadRequest(source=str(small_model)))
        # The next child is forked once the load's is stopped: a fork holds its socket.
        await eventually(lambda: sup.forkserver.waiting, what="the next child, forked ahead")
        held = _descriptors(sup.forkserver.pid)
        no_new_privs = _status_field(sup.forkserver.pid, "NoNewPrivs")
    assert _warmed_up(probed) == 0
    assert len([d for d in held if d.startswith("socket:")]) == 1, held
    assert no_new_privs == "1"  # _confine_self ran after the failed warm-up
    refused = "warm-up skipped" in capfd.readouterr().err
    assert refused is (preload == "tests.preload_memfd_refused")
    async with Supervisor(Settings(), preload=[TEST_LOADERS, preload]) as sup:
        report = await sup.load(LoadRequest(source=str(small_model)))
    assert report.outcome is Outcome.OK, report.error


def _status_field(pid: int | None, name: str) -> str:
    """One field of /proc/PID/status (a tiny /proc file: read synchronously)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    raise AssertionError(f"no {name} in /proc/{pid}/status")
