"""Pure policy: limits derived from a model's size (outcomes: tests/test_outcome.py)."""

from __future__ import annotations

import pytest

from loadwarden.producer.contract import Derivation, LimitOverrides
from loadwarden.worker.config import LimitPolicy
from loadwarden.worker.load.limits import derive_limits

MiB = 1024 * 1024
POLICY = LimitPolicy()


def test_memory_limit_follows_the_declared_size() -> None:
    """A 100 MB model gets baseline + its bytes + slack, derived from its declared size."""
    limits = derive_limits(100 * MiB, LimitOverrides(), POLICY)
    slack = POLICY.memory_slack_bytes + 100 * MiB * POLICY.memory_slack_fraction
    assert limits.memory_bytes == int(POLICY.baseline_memory_bytes + 100 * MiB + slack)
    assert limits.derivation.memory_bytes is Derivation.DECLARED_SIZE


def test_small_models_get_the_floors() -> None:
    """A tiny model is held at the configured floors, and says so."""
    limits = derive_limits(10, LimitOverrides(), POLICY)
    assert limits.timeout_seconds == POLICY.timeout_floor_s
    assert limits.derivation.timeout_seconds is Derivation.DEFAULT


def test_overrides_win_but_not_past_the_ceiling() -> None:
    """An override wins over the derived value; one past the ceiling is reported clamped."""
    limits = derive_limits(MiB, LimitOverrides(memory_bytes=10**15, timeout_seconds=3), POLICY)
    assert limits.memory_bytes == POLICY.memory_ceiling_bytes
    assert limits.timeout_seconds == 3
    assert limits.derivation.memory_bytes is Derivation.OVERRIDE_CLAMPED
    assert limits.derivation.timeout_seconds is Derivation.OVERRIDE


def test_deadline_grows_with_size() -> None:
    """A 10 GB model gets startup + size / minimum bandwidth as its deadline."""
    size = 10_000 * MiB
    limits = derive_limits(size, LimitOverrides(), POLICY)
    assert limits.timeout_seconds == pytest.approx(
        POLICY.startup_s + size / POLICY.min_bandwidth_bytes_per_s, rel=1e-3
    )


def test_percentile_is_nearest_rank() -> None:
    """p95 of 20 samples is the 19th smallest; of 3 samples, the largest."""
    from loadwarden.worker.load.limits import percentile, stats_of

    assert percentile(list(range(1, 21)), 95) == 19
    assert percentile([3.0, 1.0, 2.0], 95) == 3.0
    stats = stats_of([(1.0, 0.5, 100), (2.0, 0.7, 300), (1.5, 0.6, 200)])
    assert stats is not None
    assert (stats.samples, stats.wall_p95_s, stats.cpu_p95_s, stats.peak_rss_p95_bytes) == (
        3,
        2.0,
        0.7,
        300,
    )
    assert stats_of([]) is None


def test_history_sets_deadline_and_keeps_memory_at_least_declared() -> None:
    """With enough history, time limits are p95 x margin; memory stays at least the size figure."""
    from loadwarden.worker.load.limits import HistoryStats

    declared = derive_limits(100 * MiB, LimitOverrides(), POLICY)
    slow = HistoryStats(samples=5, wall_p95_s=40.0, cpu_p95_s=30.0, peak_rss_p95_bytes=10 * MiB)
    limits = derive_limits(100 * MiB, LimitOverrides(), POLICY, slow)
    assert limits.timeout_seconds == 40.0 * POLICY.history_time_margin
    assert limits.cpu_seconds == 30.0 * POLICY.history_time_margin
    assert limits.memory_bytes == declared.memory_bytes
    assert limits.derivation.timeout_seconds is Derivation.HISTORY
    assert limits.derivation.memory_bytes is Derivation.DECLARED_SIZE
    few = HistoryStats(samples=1, wall_p95_s=40.0, cpu_p95_s=30.0, peak_rss_p95_bytes=10 * MiB)
    assert derive_limits(100 * MiB, LimitOverrides(), POLICY, few) == declared


def test_every_tensor_costs_memory_and_time_whatever_its_size() -> None:
    """200,000 zero-size tensors raise the memory and time limits by their per-tensor cost."""
    empty = derive_limits(0, LimitOverrides(), POLICY)
    many = derive_limits(0, LimitOverrides(), POLICY, tensor_count=200_000)
    extra = 200_000 * POLICY.per_tensor_memory_bytes
    assert many.memory_bytes == POLICY.baseline_memory_bytes + POLICY.memory_slack_bytes + extra
    assert many.memory_bytes > empty.memory_bytes
    assert many.cpu_seconds == pytest.approx(POLICY.startup_s + 200_000 * POLICY.per_tensor_s)
    assert many.timeout_seconds > empty.timeout_seconds
