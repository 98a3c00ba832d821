"""The checks around a child run: the signature before it, the model's history after it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from structlog.typing import FilteringBoundLogger

from loadwarden.producer.contract import Derivation, Limits, LoadRequest
from loadwarden.producer.errors import SourceRefused, describe
from loadwarden.worker._files import OpenedModel
from loadwarden.worker._tasks import in_thread
from loadwarden.worker.config import Settings, SigningPolicy
from loadwarden.worker.load._child_run import ChildRun
from loadwarden.worker.load._deadline import JobDeadline
from loadwarden.worker.load._report import LoadState
from loadwarden.worker.load.history import History
from loadwarden.worker.load.limits import HistoryStats
from loadwarden.worker.load.signing import (
    SignatureCheck,
    Trust,
    TrustError,
    check_signature,
    may_require,
    required_signers,
)
from loadwarden.worker.ops.metrics import Metrics


async def verify_signature(
    policy: SigningPolicy,
    trusted: Callable[[], Awaitable[Trust | None]],
    opened: OpenedModel,
    request: LoadRequest,
    state: LoadState,
    deadline: JobDeadline,
) -> None:
    """Refuse the load unless a signature every rule accepts covers its files; before any
    child, the inspector's included (``loadwarden.worker.load.signing``)."""
    if not may_require(policy, request):  # no thread hop for a load no rule can ask
        return
    # In a thread: a roots rule may stat the folders on the files' way (a network share).
    requirement = await in_thread(lambda: required_signers(policy, request, opened))
    if requirement is None:
        return
    state.signature = signed = SignatureCheck()
    try:
        trust = await trusted()
    except TrustError as exc:
        raise SourceRefused(str(exc), code="signing_unavailable") from None
    await deadline.before(
        check_signature(opened, requirement, trust, signed), "verifying the signature"
    )


async def record_history(
    history: History | None, identity: str, run: ChildRun, log: FilteringBoundLogger
) -> None:
    """Add a successful load's figures to the model's history (advice: a failure is logged)."""
    if history is None:
        return
    from redis.exceptions import RedisError  # loaded with the history's client

    assert run.ended is not None
    try:
        await history.record(
            identity,
            run.wall_seconds,
            run.ended.cpu_user_s + run.ended.cpu_system_s,
            run.ended.maxrss_bytes,
        )
    except (RedisError, OSError) as exc:  # history is advice: the load stands
        log.warning("history_unavailable", error=describe(exc))


def check_anomaly(
    run: ChildRun,
    history: HistoryStats,
    settings: Settings,
    metrics: Metrics,
    log: FilteringBoundLogger,
) -> None:
    """Log (and count) a load far beyond its own history, even when it succeeded."""
    s = settings
    assert run.ended is not None
    figures = {
        "wall": (run.wall_seconds, history.wall_p95_s, s.anomaly_min_wall_s),
        "peak_rss": (
            float(run.ended.maxrss_bytes),
            float(history.peak_rss_p95_bytes),
            float(s.anomaly_min_rss_bytes),
        ),
    }
    factor = s.anomaly_factor
    for kind, (value, p95, margin) in figures.items():
        if p95 > 0 and value > factor * p95 and value - p95 > margin:
            log.warning("load_anomaly", kind=kind, value=value, history_p95=p95, factor=factor)
            metrics.anomalies.labels(kind=kind).inc()


def warn_clamped(log: FilteringBoundLogger, request: LoadRequest, limits: Limits) -> None:
    """A request that asked for more than the worker allows is told so, not silently trimmed."""
    asked = request.limits
    for name, wanted, got in (
        ("memory_bytes", asked.memory_bytes, limits.memory_bytes),
        ("cpu_seconds", asked.cpu_seconds, limits.cpu_seconds),
        ("timeout_seconds", asked.timeout_seconds, limits.timeout_seconds),
    ):
        if getattr(limits.derivation, name) is Derivation.OVERRIDE_CLAMPED:
            log.warning("limit_override_clamped", limit=name, requested=wanted, ceiling=got)
