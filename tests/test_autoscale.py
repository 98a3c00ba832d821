"""The autoscaling formula: pure functions, tested without sleeping or Redis."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import pytest

from loadwarden.worker.ops.autoscale import (
    AutoscaleDecision,
    AutoscaleInput,
    decide,
    service_rate,
)

DEFAULT_RATE = 0.33


def _input(
    ready: int = 0,
    running: int = 0,
    rate: float | None = 0.5,
    target_drain_s: float = 60.0,
    min_workers: int = 0,
    max_workers: int = 20,
) -> AutoscaleInput:
    return AutoscaleInput(
        ready=ready,
        running=running,
        service_rate_per_worker=rate,
        target_drain_s=target_drain_s,
        min_workers=min_workers,
        max_workers=max_workers,
        default_service_rate_per_worker=DEFAULT_RATE,
    )


# The formula


@pytest.mark.parametrize(
    ("ready", "running", "rate", "target_drain_s", "expected"),
    [
        (120, 8, 0.5, 60.0, 5),  # ceil(128 / 30): the prepared backlog of the issue
        (120, 0, 0.5, 60.0, 4),  # exactly 4 workers' worth: not rounded up
        (121, 0, 0.5, 60.0, 5),  # one job over: one more worker
        (1, 0, 0.5, 60.0, 1),  # the first ready job wakes a pool at zero
        (0, 2, 0.5, 60.0, 1),  # running jobs alone keep a worker
        (40, 0, 1 / 3, 60.0, 2),  # the deploy/README example: 20 jobs per worker
        (189, 0, 0.7, 90.0, 3),  # 189 / (0.7 * 90) is 3.0000000000000004 in floats
    ],
)
def test_formula_on_a_prepared_backlog(
    ready: int, running: int, rate: float, target_drain_s: float, expected: int
) -> None:
    """desired = ceil((ready + running) / (rate x target_drain_s)) when inside the bounds."""
    decision = decide(_input(ready, running, rate, target_drain_s))
    assert decision.desired == expected
    assert decision.unclamped == expected
    assert decision.service_rate_per_worker == rate


@pytest.mark.parametrize(
    ("ready", "min_workers", "max_workers", "unclamped", "desired", "bound"),
    [
        (1000, 0, 20, 34, 20, "max_workers=20"),
        (10, 3, 20, 1, 3, "min_workers=3"),
        (60, 2, 2, 2, 2, None),
    ],
)
def test_clamps_to_min_and_max(
    ready: int, min_workers: int, max_workers: int, unclamped: int, desired: int, bound: str | None
) -> None:
    """The answer stays within [min, max]; the reason names the bound that applied."""
    decision = decide(_input(ready, rate=0.5, min_workers=min_workers, max_workers=max_workers))
    assert (decision.unclamped, decision.desired) == (unclamped, desired)
    if bound is None:
        assert "clamped" not in decision.reason
    else:
        assert decision.reason.endswith(f"clamped to {bound}")


@pytest.mark.parametrize("min_workers", [0, 1, 4])
def test_zero_backlog_gives_min(min_workers: int) -> None:
    """No ready and no running job gives min_workers, which may be 0 (scale to zero)."""
    decision = decide(_input(0, 0, min_workers=min_workers))
    assert decision.desired == min_workers
    assert decision.reason == f"no backlog: min_workers={min_workers}"


@pytest.mark.parametrize("observed", [None, 0.0, -1.0, math.nan, math.inf])
def test_unknown_rate_uses_the_default(observed: float | None) -> None:
    """An unknown, non-positive or non-finite rate is replaced by the configured default."""
    decision = decide(_input(ready=120, running=8, rate=observed))
    assert decision.service_rate_per_worker == DEFAULT_RATE
    assert decision.desired == math.ceil(128 / (DEFAULT_RATE * 60))  # 7
    assert f"default {DEFAULT_RATE:g} jobs/s/worker" in decision.reason


def test_decision_serialises_to_json() -> None:
    """as_dict() carries desired, the rate used, every input and the reason, as plain JSON."""
    decision = decide(_input(ready=120, running=8))
    document = json.loads(json.dumps(decision.as_dict()))
    assert document["desired"] == 5
    assert document["service_rate_per_worker"] == 0.5
    assert document["inputs"] == {
        "ready": 120,
        "running": 8,
        "service_rate_per_worker": 0.5,
        "target_drain_s": 60.0,
        "min_workers": 0,
        "max_workers": 20,
        "default_service_rate_per_worker": DEFAULT_RATE,
    }
    assert document["reason"] == (
        "backlog 128 (ready 120 + running 8) / (0.5 jobs/s/worker x 60 s = 30 jobs/worker) -> 5"
    )
    assert "\n" not in decision.reason


def test_decision_is_frozen() -> None:
    """Decisions and inputs are values: assigning to a field raises."""
    decision = decide(_input(ready=1))
    assert isinstance(decision, AutoscaleDecision)
    with pytest.raises(dataclasses.FrozenInstanceError):
        decision.desired = 9  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        decision.inputs.ready = 9  # type: ignore[misc]


@pytest.mark.parametrize(
    "changes",
    [
        {"ready": -1},
        {"running": -1},
        {"target_drain_s": 0.0},
        {"target_drain_s": math.inf},
        {"min_workers": -1},
        {"min_workers": 5, "max_workers": 4},
        {"default_service_rate_per_worker": 0.0},
        {"default_service_rate_per_worker": math.nan},
    ],
)
def test_invalid_inputs_are_refused(changes: dict[str, Any]) -> None:
    """Negative counts, a non-positive target or default rate, and min > max raise ValueError."""
    with pytest.raises(ValueError, match=r"must|need"):
        dataclasses.replace(_input(), **changes)


# The service rate (one formula: production's inputs, the simulation and these tests)


@pytest.mark.parametrize(
    ("jobs", "busy_slot_s", "concurrency", "expected"),
    [
        (60, 240.0, 2, 0.5),  # 2 slots, each busy 120 s for 30 jobs: 0.25 jobs/s a slot
        (36, 120.0, 1, 0.3),
        (1, 10.0, 1, 0.1),
        (100, 400.0, 2, 0.5),  # test_monitoring's prepared service bucket
    ],
)
def test_rate_is_jobs_per_busy_slot_second_times_the_slots(
    jobs: int, busy_slot_s: float, concurrency: int, expected: float
) -> None:
    """The rate is concurrency x jobs / busy slot-seconds: idle time does not dilute it."""
    assert service_rate(jobs, busy_slot_s, concurrency) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("jobs", "busy_slot_s", "concurrency"),
    [
        (0, 240.0, 2),  # no job finished: nothing observed
        (-1, 240.0, 2),  # a damaged counter is no observation either
        (10, 0.0, 2),  # no busy time
        (10, math.nan, 2),
        (10, math.inf, 2),
        (10, 60.0, 0),
    ],
)
def test_rate_without_data_is_none_and_decide_uses_the_default(
    jobs: int, busy_slot_s: float, concurrency: int
) -> None:
    """With nothing usable measured there is no rate, and the formula takes the default."""
    assert service_rate(jobs, busy_slot_s, concurrency) is None
    decision = decide(_input(ready=10, rate=service_rate(jobs, busy_slot_s, concurrency)))
    assert decision.service_rate_per_worker == DEFAULT_RATE


def test_rate_from_counts_feeds_the_formula() -> None:
    """Production's path: Redis' counts through decide_from_counts give the same decision
    as service_rate then decide (the simulation's path)."""
    from loadwarden.worker.config import Settings
    from loadwarden.worker.ops.autoscale_inputs import decide_from_counts

    settings = Settings(concurrency=2)
    counts = {"ready": 120.0, "running": 8.0, "served_jobs": 60.0, "served_seconds": 240.0}
    direct = decide(
        dataclasses.replace(
            _input(ready=120, running=8, rate=service_rate(60, 240.0, 2)),
            target_drain_s=settings.autoscale.target_drain_s,
            min_workers=settings.autoscale.min_workers,
            max_workers=settings.autoscale.max_workers,
            default_service_rate_per_worker=settings.autoscale.default_service_rate_per_worker,
        )
    )
    assert decide_from_counts(counts, settings) == direct
    assert direct.service_rate_per_worker == 0.5
