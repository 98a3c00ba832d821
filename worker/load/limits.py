"""Derive a load's limits from the model's declared size, its history and the request: pure."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from loadwarden.producer.contract import Derivation, LimitDerivation, LimitOverrides, Limits
from loadwarden.worker.config import LimitPolicy


@dataclass(frozen=True, slots=True)
class HistoryStats:
    """p95 of a model's recent successful loads."""

    samples: int
    wall_p95_s: float
    cpu_p95_s: float
    peak_rss_p95_bytes: int


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile (``q`` in 0..100) of a non-empty sequence."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def stats_of(samples: Sequence[tuple[float, float, int]]) -> HistoryStats | None:
    """p95 figures of (wall s, cpu s, peak RSS bytes) samples, or None for no samples."""
    if not samples:
        return None
    return HistoryStats(
        samples=len(samples),
        wall_p95_s=percentile([s[0] for s in samples], 95),
        cpu_p95_s=percentile([s[1] for s in samples], 95),
        peak_rss_p95_bytes=int(percentile([s[2] for s in samples], 95)),
    )


def _clamp(value: float, floor: float, ceiling: float) -> float:
    return max(floor, min(value, ceiling))


def _pick(
    derived: float, source: Derivation, override: float | None, floor: float, ceiling: float
) -> tuple[float, Derivation]:
    if override is not None:
        if override > ceiling:
            return ceiling, Derivation.OVERRIDE_CLAMPED
        return override, Derivation.OVERRIDE
    value = _clamp(derived, floor, ceiling)
    # A value held at a configured floor or ceiling comes from configuration, not the model.
    return value, source if value == derived else Derivation.DEFAULT


def derive_limits(
    tensor_bytes: int,
    overrides: LimitOverrides,
    policy: LimitPolicy,
    history: HistoryStats | None = None,
    tensor_count: int = 0,
) -> Limits:
    """Limits for a model of ``tensor_bytes`` declared bytes in ``tensor_count`` tensors.

    From the declared size:
        memory  = baseline + tensor_bytes x (loader factor + slack fraction) + slack
                  + tensor_count x per-tensor memory
        cpu     = startup + tensor_bytes / minimum bandwidth + tensor_count x per-tensor time
        timeout = the same as cpu
    With at least ``history_min_samples`` recent loads of the same model:
        cpu, timeout = p95 of its history x time margin (so a model that always
                       takes 40 s is not killed at 30 s, and a 10x regression is)
        memory       = max(declared-size figure, p95 peak x memory margin)
    Each is clamped to its floor and ceiling; a request's override wins, but never
    beyond the ceiling (a producer cannot lift the worker's own bounds).
    """
    memory: float = policy.baseline_memory_bytes + tensor_bytes * policy.loader_memory_factor
    memory += policy.memory_slack_bytes + tensor_bytes * policy.memory_slack_fraction
    memory += tensor_count * policy.per_tensor_memory_bytes
    memory_from = cpu_from = timeout_from = Derivation.DECLARED_SIZE
    cpu = wall = (
        policy.startup_s
        + tensor_bytes / policy.min_bandwidth_bytes_per_s
        + tensor_count * policy.per_tensor_s
    )
    if history is not None and history.samples >= policy.history_min_samples:
        cpu, cpu_from = history.cpu_p95_s * policy.history_time_margin, Derivation.HISTORY
        wall, timeout_from = history.wall_p95_s * policy.history_time_margin, Derivation.HISTORY
        from_history = history.peak_rss_p95_bytes * policy.history_memory_margin
        if from_history > memory:
            memory, memory_from = from_history, Derivation.HISTORY
    memory_bytes, memory_from = _pick(
        memory,
        memory_from,
        overrides.memory_bytes,
        policy.memory_floor_bytes,
        policy.memory_ceiling_bytes,
    )
    cpu_s, cpu_from = _pick(
        cpu, cpu_from, overrides.cpu_seconds, policy.cpu_floor_s, policy.cpu_ceiling_s
    )
    timeout_s, timeout_from = _pick(
        wall,
        timeout_from,
        overrides.timeout_seconds,
        policy.timeout_floor_s,
        policy.timeout_ceiling_s,
    )
    return Limits(
        memory_bytes=int(memory_bytes),
        cpu_seconds=round(cpu_s, 3),
        timeout_seconds=round(timeout_s, 3),
        derivation=LimitDerivation(
            memory_bytes=memory_from, cpu_seconds=cpu_from, timeout_seconds=timeout_from
        ),
    )


def expected_memory_bytes(
    tensor_bytes: int, policy: LimitPolicy, history: HistoryStats | None = None
) -> int:
    """What a healthy load of this model holds at its peak: the memory limit without its slack.

    The baseline plus the loader's copy of the tensors, or the model's own p95 peak
    once it has enough history; the limit adds headroom on top of this.
    """
    expected = policy.baseline_memory_bytes + tensor_bytes * policy.loader_memory_factor
    if history is not None and history.samples >= policy.history_min_samples:
        expected = max(expected, history.peak_rss_p95_bytes)
    return int(expected)


def near_thresholds(limits: Limits, expected_memory: int, fraction: float) -> dict[str, float]:
    """Where each limit counts as *near*: the values at which a load_threshold_crossed warns.

    Memory: a healthy load is expected to sit at ``expected_memory``, its limit being that
    plus headroom, so "near" means having used ``fraction`` of the headroom, not of the
    limit (at 0.8 of the limit, every healthy multi-GiB load would warn: it holds 0.9).
    CPU and deadline carry no such expectation: ``fraction`` of the limit.
    """
    headroom = limits.memory_bytes - expected_memory
    memory = (
        expected_memory + fraction * headroom if headroom > 0 else fraction * limits.memory_bytes
    )
    return {
        "memory": memory,
        "cpu": fraction * limits.cpu_seconds,
        "deadline": fraction * limits.timeout_seconds,
    }


def job_budget_s(asked: LimitOverrides, policy: LimitPolicy) -> float:
    """The whole job's deadline (source, inspection, load): the request's, capped."""
    ceiling = policy.timeout_ceiling_s
    wanted = asked.timeout_seconds
    return ceiling if wanted is None else min(wanted, ceiling)


def tensor_budget_bytes(policy: LimitPolicy, budget_bytes: int) -> int:
    """The most tensor bytes a load could hold: derive_limits' memory formula, inverted, at
    the lower of the memory ceiling and the worker's whole budget."""
    room = min(policy.memory_ceiling_bytes, budget_bytes)
    room -= policy.baseline_memory_bytes + policy.memory_slack_bytes
    return max(0, int(room / (policy.loader_memory_factor + policy.memory_slack_fraction)))
