"""The autoscaling formula: how many workers the queue needs (pure functions, no I/O).

As ``deploy/README.md`` documents it::

    desired = clamp(ceil((ready + running) / (service_rate_per_worker × target_drain_s)), min, max)

- ``ready``: jobs whose time has come and that no worker holds; ``running``: jobs a worker
  is running. Deferred jobs (retry backoff, scheduled) do not count until they are due.
- ``service_rate_per_worker``: jobs per second one worker completes, observed
  (:func:`service_rate`: production, ``bench/autoscale_sim.py`` and the tests all use
  it); ``target_drain_s``: how long a backlog may take to drain.
- ``min``, ``max``: bounds on the pool.

So one worker is worth ``service_rate_per_worker × target_drain_s`` jobs of backlog.

Refinements, each tested in ``tests/test_autoscale.py``:

- **Zero backlog gives** ``min``, which may be 0 (scale to zero). This is what the formula
  yields anyway (``ceil(0) = 0``, clamped up to ``min``); the decision only names it.
  Conversely any backlog gives at least one worker when ``max >= 1``, so running jobs
  are never scaled away.
- **An unknown rate** (``None``), or one that is ``<= 0`` or not finite, is replaced by
  the configured default rate: a rate of 0 would divide by zero, and an infinite one
  would ask for no workers at all while jobs wait.
- **Exact quotients are not rounded up by float error**: 189 jobs at 0.7 jobs/s for
  90 s need 3 workers, although ``189 / (0.7 * 90)`` is ``3.0000000000000004``.
- **No scale-down damping** (stabilisation windows, cooldowns, step limits): KEDA and
  the HPA already apply them to whatever this answers, and doing it twice would make
  the pool slower to shrink than the operator configured. The answer is a function of
  the present inputs only.
"""

# The docstring quotes deploy/README.md's formula as written there, multiplication sign included.
# ruff: noqa: RUF002

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

#: Relative tolerance under which a quotient counts as a whole number of workers.
_WHOLE_REL_TOL = 1e-9


@dataclass(frozen=True, slots=True)
class AutoscaleInput:
    """What one decision is computed from: the queue, the observed rate, and the settings."""

    ready: int
    running: int
    #: Observed jobs/s per worker; ``None`` when there is no observation yet.
    service_rate_per_worker: float | None
    target_drain_s: float
    min_workers: int
    max_workers: int
    default_service_rate_per_worker: float

    def __post_init__(self) -> None:
        if self.ready < 0 or self.running < 0:
            raise ValueError(
                f"job counts must be >= 0, got ready={self.ready} running={self.running}"
            )
        if not (math.isfinite(self.target_drain_s) and self.target_drain_s > 0):
            raise ValueError(f"target_drain_s must be > 0, got {self.target_drain_s}")
        if not 0 <= self.min_workers <= self.max_workers:
            raise ValueError(
                f"need 0 <= min_workers <= max_workers, got {self.min_workers}, {self.max_workers}"
            )
        if not _usable_rate(self.default_service_rate_per_worker):
            raise ValueError(
                "default_service_rate_per_worker must be > 0 and finite, "
                f"got {self.default_service_rate_per_worker}"
            )

    @property
    def backlog(self) -> int:
        """The jobs the pool is sized for: ready plus running."""
        return self.ready + self.running


@dataclass(frozen=True, slots=True)
class AutoscaleDecision:
    """The desired worker count, what it came from, and why, in one line."""

    desired: int
    #: The formula's answer before the clamp to [min, max].
    unclamped: int
    #: The rate the formula used: the observed one, or the default in its place.
    service_rate_per_worker: float
    inputs: AutoscaleInput
    reason: str

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (for ``loadwarden autoscale --json``)."""
        return asdict(self)


def _usable_rate(rate: float | None) -> bool:
    return rate is not None and math.isfinite(rate) and rate > 0


def _ceil_workers(quotient: float) -> int:
    """``ceil(quotient)``, except that a float error just above a whole number is not rounded up."""
    nearest = round(quotient)
    if nearest >= 1 and math.isclose(quotient, nearest, rel_tol=_WHOLE_REL_TOL):
        return nearest
    return math.ceil(quotient)


def decide(inputs: AutoscaleInput) -> AutoscaleDecision:
    """The desired worker count for ``inputs``, with the rate it used and a one-line reason."""
    observed = inputs.service_rate_per_worker
    if observed is not None and _usable_rate(observed):
        rate = observed
        rate_note = f"{rate:g} jobs/s/worker"
    else:
        rate = inputs.default_service_rate_per_worker
        rate_note = f"default {rate:g} jobs/s/worker (observed {observed} not usable)"
    per_worker = rate * inputs.target_drain_s
    unclamped = _ceil_workers(inputs.backlog / per_worker)
    desired = max(inputs.min_workers, min(inputs.max_workers, unclamped))

    if inputs.backlog == 0:
        reason = f"no backlog: min_workers={inputs.min_workers}"
    else:
        reason = (
            f"backlog {inputs.backlog} (ready {inputs.ready} + running {inputs.running}) "
            f"/ ({rate_note} x {inputs.target_drain_s:g} s = {per_worker:g} jobs/worker) "
            f"-> {unclamped}"
        )
        if desired != unclamped:
            bound = "max_workers" if unclamped > inputs.max_workers else "min_workers"
            reason += f", clamped to {bound}={desired}"
    return AutoscaleDecision(
        desired=desired,
        unclamped=unclamped,
        service_rate_per_worker=rate,
        inputs=inputs,
        reason=reason,
    )


def service_rate(served_jobs: float, busy_slot_s: float, concurrency: int) -> float | None:
    """Jobs per second one worker completes: ``concurrency x served_jobs / busy_slot_s``.

    ``busy_slot_s`` counts every second a job held one of a worker's ``concurrency``
    slots (queue bookkeeping, header inspection, waiting for memory, the load, and runs
    that ended in a retry), so a slot's rate is its jobs over its busy time and idle
    workers do not dilute it: a throughput divided by idle workers too measures the
    arrivals, not what a worker can do, and would size the pool past the backlog.
    None when nothing usable was measured (no job, no busy time, non-finite figures):
    ``decide`` then uses the configured default rate.
    """
    if not (served_jobs > 0 and concurrency > 0 and 0 < busy_slot_s < math.inf):
        return None
    rate = concurrency * served_jobs / busy_slot_s
    return rate if _usable_rate(rate) else None
