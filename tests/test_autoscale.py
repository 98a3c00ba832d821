"""The autoscaling formula: pure functions, tested without sleeping or Redis."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import pytest

from loadwarden.worker.autoscale import (
    AutoscaleDecision,
    AutoscaleInput,
    decide,
    estimate_service_rate,
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


# Service rate estimation


@pytest.mark.parametrize(
    ("completions", "window_s", "mean_workers", "expected"),
    [
        (60, 60.0, 2.0, 0.5),
        (36, 300.0, 0.4, 0.3),
        (1, 10.0, 1.0, 0.1),
    ],
)
def test_rate_is_completions_per_second_per_worker(
    completions: int, window_s: float, mean_workers: float, expected: float
) -> None:
    """The rate is completions / window_s / mean_workers."""
    rate = estimate_service_rate(completions, window_s, mean_workers, DEFAULT_RATE)
    assert rate == pytest.approx(expected)


@pytest.mark.parametrize(
    ("completions", "window_s", "mean_workers"),
    [
        (0, 60.0, 2.0),  # no completion: nothing observed
        (10, 0.0, 2.0),  # empty window
        (10, 60.0, 0.0),  # no worker ran
        (10, math.nan, 2.0),
        (10, 60.0, math.inf),
    ],
)
def test_rate_without_data_is_the_default(
    completions: int, window_s: float, mean_workers: float
) -> None:
    """With no completions, no window or no workers, the estimate is the default."""
    assert estimate_service_rate(completions, window_s, mean_workers, DEFAULT_RATE) == DEFAULT_RATE


def test_negative_completions_are_refused() -> None:
    """A negative completion count is a caller's bug, not missing data."""
    with pytest.raises(ValueError, match="completions_in_window"):
        estimate_service_rate(-1, 60.0, 1.0, DEFAULT_RATE)


def test_estimate_feeds_the_formula() -> None:
    """An estimate from a window feeds decide(): 60 jobs in 60 s by 2 workers is 0.5 jobs/s."""
    rate = estimate_service_rate(60, 60.0, 2.0, DEFAULT_RATE)
    assert decide(_input(ready=120, running=8, rate=rate)).desired == 5
