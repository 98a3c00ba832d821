"""The autoscaler's inputs as this deployment measures them: queue counts and service counters."""

from __future__ import annotations

from loadwarden.worker.config import Settings
from loadwarden.worker.ops.autoscale import AutoscaleDecision, AutoscaleInput, decide, service_rate


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
