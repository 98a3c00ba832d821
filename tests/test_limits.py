"""Limits that fit the model: rlimit, cgroup and Landlock, history, and the memory budget."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio as aioredis
import structlog

from loadwarden.producer import connection
from loadwarden.producer.contract import Derivation, LimitOverrides, LoadRequest, Outcome
from loadwarden.worker._files import open_model_file
from loadwarden.worker.config import LimitPolicy, Settings
from loadwarden.worker.load.history import History, model_identity
from loadwarden.worker.load.supervisor import Supervisor
from tests.conftest import TEST_LOADERS, eventually, require_cgroups, require_landlock
from tests.safetensors_files import valid_model

MiB = 1024 * 1024
Events = list[structlog.typing.EventDict]


@pytest.fixture
def model_64m(tmp_path: Path) -> Path:
    return Path(
        valid_model(tmp_path / "m64.safetensors", {"w": np.ones((64, MiB), dtype=np.uint8)})
    )


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:  # type: ignore[type-arg]
    client = connection.redis_client(redis_url)
    yield client
    await client.aclose()


@pytest.mark.parametrize("warm", [False, True], ids=["first-load", "child-forked-ahead"])
@pytest.mark.parametrize(
    ("mechanism", "options", "code"),
    [
        ("rlimit", {"use_cgroups": False}, "memory_limit"),
        ("cgroup", {"use_address_space_limit": False}, "cgroup_oom"),
    ],
)
async def test_memory_limit_is_enforced_by_each_mechanism(
    mechanism: str,
    options: dict[str, bool],
    code: str,
    model_64m: Path,
    small_model: Path,
    warm: bool,
) -> None:
    """A model over its memory limit ends memory_exceeded, by RLIMIT_AS and by a cgroup alone,
    in a child forked for it and in one forked ahead (placed in its cgroup while it waited)."""
    async with Supervisor(Settings(**options)) as sup:
        if mechanism == "cgroup":
            require_cgroups(sup)
        if warm:
            assert (await sup.load(LoadRequest(source=str(small_model)))).ok
            await eventually(lambda: sup.forkserver.waiting, what="a child forked ahead")
        report = await sup.load(
            LoadRequest(source=str(model_64m), limits=LimitOverrides(memory_bytes=48 * MiB))
        )
    assert report.outcome is Outcome.MEMORY_EXCEEDED, report.error
    assert report.error is not None and report.error.code == code
    confinement = set(report.confinement)
    assert ("rlimit_as" in confinement) is (mechanism == "rlimit")
    assert any(c.startswith("cgroup_v") for c in confinement) is (mechanism == "cgroup")


async def test_cgroup_reports_peak_memory(model_64m: Path) -> None:
    """With a cgroup, the report carries the cgroup's own peak, at least the tensor bytes."""
    async with Supervisor(Settings()) as sup:
        require_cgroups(sup)
        report = await sup.load(LoadRequest(source=str(model_64m)))
    assert report.outcome is Outcome.OK
    assert report.resources is not None and report.resources.cgroup_peak_bytes is not None
    assert report.resources.cgroup_peak_bytes >= 64 * MiB


@pytest.mark.parametrize("loader", ["read_other", "write_file", "exec_true", "tcp_connect"])
async def test_landlock_denies_what_a_loader_must_not_do(
    make_supervisor: Callable[..., Supervisor], small_model: Path, loader: str
) -> None:
    """Under Landlock, reading another file, writing, exec and TCP are denied and reported."""
    async with make_supervisor(loader) as sup:
        require_landlock(sup)
        report = await sup.load(LoadRequest(source=str(small_model)))
    assert report.outcome is Outcome.REFUSED, report.error
    assert report.error is not None and report.error.code == "sandbox_denied"
    assert f"landlock_abi{sup.landlock_abi}" in report.confinement


def _fast_policy() -> LimitPolicy:
    # Declared-size deadlines of 0.2 s, so that only history can allow a 1-second load.
    return LimitPolicy(startup_s=0.1, timeout_floor_s=0.2, cpu_floor_s=1.0, history_min_samples=3)


async def _with_history(redis_client: aioredis.Redis, path: Path, wall_s: float) -> History:  # type: ignore[type-arg]
    history = History(redis_client, _fast_policy())
    with open_model_file(path) as model_file:
        identity = model_identity(model_file, None)
    for _ in range(3):
        await history.record(identity, wall_s, 0.05, 30 * MiB)
    return history


@pytest.mark.parametrize(
    ("history_wall_s", "outcome"),
    [(None, Outcome.TIMEOUT), (1.0, Outcome.OK), (0.1, Outcome.TIMEOUT)],
    ids=["no-history-killed", "slow-within-history-kept", "regression-10x-killed"],
)
async def test_deadline_follows_history(
    redis_client: aioredis.Redis,  # type: ignore[type-arg]
    small_model: Path,
    history_wall_s: float | None,
    outcome: Outcome,
) -> None:
    """A model that always takes ~1 s is not killed at the size-based deadline; a 10x one is."""
    history = None
    if history_wall_s is not None:
        history = await _with_history(redis_client, small_model, history_wall_s)
    settings = Settings(limits=_fast_policy())
    async with Supervisor(
        settings, preload=[TEST_LOADERS], history=history, loaders={"safetensors": "slow"}
    ) as sup:  # type: ignore[dict-item]
        report = await sup.load(LoadRequest(source=str(small_model)))
    assert report.outcome is outcome, report.error
    assert report.limits is not None
    expected = Derivation.DEFAULT if history is None else Derivation.HISTORY
    assert report.limits.derivation.timeout_seconds is expected


async def test_successful_loads_are_recorded(
    redis_client: aioredis.Redis, small_model: Path
) -> None:  # type: ignore[type-arg]
    """Each successful load adds a sample to its model's history."""
    history = History(redis_client, LimitPolicy())
    async with Supervisor(Settings(), history=history) as sup:
        for _ in range(2):
            assert (await sup.load(LoadRequest(source=str(small_model)))).ok
    with open_model_file(small_model) as model_file:
        stats = await history.stats(model_identity(model_file, None))
    assert stats is not None and stats.samples == 2


async def test_budget_admits_large_loads_one_at_a_time(
    small_model: Path, captured_events: Events
) -> None:
    """With a small budget, three large loads run one at a time and never together."""
    settings = Settings(memory_budget_bytes=300 * MiB)
    big = LimitOverrides(memory_bytes=200 * MiB)
    async with Supervisor(settings, preload=[TEST_LOADERS], loaders={"safetensors": "slow"}) as sup:  # type: ignore[dict-item]
        reports = await asyncio.gather(
            *(sup.load(LoadRequest(source=str(small_model), limits=big)) for _ in range(3))
        )
    assert all(r.ok for r in reports)
    running = peak = 0
    for event in captured_events:
        if event["event"] == "load_started":
            running += 1
        elif event["event"] == "job_finished":
            running -= 1
        peak = max(peak, running)
    assert peak == 1
    assert sup.admission.in_use_bytes == 0


async def test_load_over_the_whole_budget_is_refused(small_model: Path) -> None:
    """A load whose memory limit exceeds the whole budget is refused at once, with no child."""
    async with Supervisor(Settings(memory_budget_bytes=100 * MiB)) as sup:
        report = await sup.load(
            LoadRequest(source=str(small_model), limits=LimitOverrides(memory_bytes=200 * MiB))
        )
    assert report.outcome is Outcome.REFUSED
    assert report.error is not None and report.error.code == "over_budget"
    assert sup.forkserver.spawned == 0


def test_hundred_megabyte_model_limit_is_within_bounds() -> None:
    """A 100 MB model gets a memory limit between 1.0x and 1.5x its bytes plus the baseline."""
    from loadwarden.worker.load.limits import derive_limits

    policy = LimitPolicy()
    limits = derive_limits(100 * MiB, LimitOverrides(), policy)
    beyond_baseline = limits.memory_bytes - policy.baseline_memory_bytes
    assert 1.0 * 100 * MiB <= beyond_baseline <= 1.5 * 100 * MiB


async def test_calibrated_limits_fit_each_model_and_stop_a_10x_one(tmp_path: Path) -> None:
    """calibrate's limits let every entry of a catalog load, and stop a 10x bigger model."""
    from loadwarden.producer.catalog import parse_catalog
    from loadwarden.worker.cli.calibrate import calibrate, to_toml

    for name, mib in (("small", 8), ("medium", 24), ("huge", 240)):
        valid_model(tmp_path / f"{name}.safetensors", {"w": np.ones((mib, MiB), dtype=np.uint8)})
    catalog = parse_catalog(
        '[[model]]\nname = "small"\nsource = "small.safetensors"\n'
        '[[model]]\nname = "medium"\nsource = "medium.safetensors"\n',
        base_dir=tmp_path,
    )
    settings = Settings()
    async with Supervisor(settings) as sup:
        results = await calibrate(catalog.requests(), settings, sup)
        assert [r.report.outcome for r in results] == [Outcome.OK, Outcome.OK]
        toml = to_toml(catalog, results)
        recommended = parse_catalog(toml, base_dir=tmp_path)  # the output is a valid catalog
        for (_, request), result in zip(recommended.requests(), results, strict=True):
            assert request.limits == result.recommended
            assert (await sup.load(request)).ok
        medium_limits = results[1].recommended
        assert medium_limits is not None
        huge = await sup.load(
            LoadRequest(source=str(tmp_path / "huge.safetensors"), limits=medium_limits)
        )
    assert huge.outcome is Outcome.MEMORY_EXCEEDED


def test_history_stats_count_whole_samples_only() -> None:
    """A damaged history entry costs its own sample, on every read of the list (each entry
    is parsed once and kept by its bytes: a second read finds the same)."""
    raw = [
        *(b"[1.0,0.5,100]", b"not json", b"[1,2]", b'["x",1,2]', b"[2.0,1.5,300]"),
        *(b"[1,2,1e400]", b"[NaN,1,2]", b"[Infinity,1,2]", b"[1,-2,3]"),  # no load measured these
    ]
    first = History.stats_from(raw)
    assert first is not None and first.samples == 2
    assert History.stats_from(raw) == first
    assert History.stats_from([*raw, b"[3.0,2.5,500]"]) == History.stats_from(
        [b"[1.0,0.5,100]", b"[2.0,1.5,300]", b"[3.0,2.5,500]"]
    )
