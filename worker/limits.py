"""Derive a load's limits from the model's declared size and the request: pure functions, no I/O."""

from __future__ import annotations

from loadwarden.producer.contract import Derivation, LimitDerivation, LimitOverrides, Limits
from loadwarden.producer.settings import LimitPolicy


def _clamp(value: float, floor: float, ceiling: float) -> float:
    return max(floor, min(value, ceiling))


def derive_limits(tensor_bytes: int, overrides: LimitOverrides, policy: LimitPolicy) -> Limits:
    """Limits for a model of ``tensor_bytes`` declared bytes.

    memory  = baseline + tensor_bytes x loader factor + slack
    cpu     = startup + tensor_bytes / minimum bandwidth
    timeout = startup + tensor_bytes / minimum bandwidth
    each clamped to its floor and ceiling; a request's override wins, but never
    beyond the ceiling (a producer cannot lift the worker's own bounds).
    """
    memory = policy.baseline_memory_bytes + tensor_bytes * policy.loader_memory_factor
    memory += policy.memory_slack_bytes
    seconds = policy.startup_s + tensor_bytes / policy.min_bandwidth_bytes_per_s

    def pick(
        derived: float,
        override: float | None,
        floor: float,
        ceiling: float,
    ) -> tuple[float, Derivation]:
        if override is not None:
            return min(override, ceiling), Derivation.OVERRIDE
        value = _clamp(derived, floor, ceiling)
        # A value held at a configured floor or ceiling comes from configuration, not the model.
        return value, Derivation.DECLARED_SIZE if value == derived else Derivation.DEFAULT

    memory_bytes, memory_from = pick(
        memory, overrides.memory_bytes, policy.memory_floor_bytes, policy.memory_ceiling_bytes
    )
    cpu_s, cpu_from = pick(seconds, overrides.cpu_seconds, policy.cpu_floor_s, policy.cpu_ceiling_s)
    timeout_s, timeout_from = pick(
        seconds, overrides.timeout_seconds, policy.timeout_floor_s, policy.timeout_ceiling_s
    )
    return Limits(
        memory_bytes=int(memory_bytes),
        cpu_seconds=round(cpu_s, 3),
        timeout_seconds=round(timeout_s, 3),
        derivation=LimitDerivation(
            memory_bytes=memory_from, cpu_seconds=cpu_from, timeout_seconds=timeout_from
        ),
    )
