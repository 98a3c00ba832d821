"""The autoscaler's inputs as this deployment measures them: queue counts and service counters."""

from __future__ import annotations

from loadwarden.producer.settings import Settings
from loadwarden.worker.autoscale import AutoscaleDecision, AutoscaleInput, decide


def service_rate(served_jobs: float, served_seconds: float, concurrency: int) -> float | None:
    """Jobs per second one worker completes, from the last hour's jobs: its slots / mean job time.

    Measured from busy time: every second a worker held a job (queue bookkeeping, header
    inspection, waiting for memory, the load, and runs that ended in a retry), so idle
    workers do not dilute it and slow inspection is not missed; None when nothing has
    been measured yet (the default rate applies).
    """
    if served_jobs <= 0 or served_seconds <= 0:
        return None
    return concurrency * served_jobs / served_seconds


def decide_from_counts(counts: dict[str, float], settings: Settings) -> AutoscaleDecision:
    policy = settings.autoscale
    return decide(
        AutoscaleInput(
            ready=int(counts["ready"]),
            running=int(counts["running"]),
            service_rate_per_worker=service_rate(
                counts["served_jobs"], counts["served_seconds"], settings.concurrency
            ),
            target_drain_s=policy.target_drain_s,
            min_workers=policy.min_workers,
            max_workers=policy.max_workers,
            default_service_rate_per_worker=policy.default_service_rate_per_worker,
        )
    )


def desired_from_counts(counts: dict[str, float], settings: Settings) -> int:
    return decide_from_counts(counts, settings).desired
