"""The failure memory: a model whose loads keep failing is refused at once, with no child.

Which failures count is a verdict on the model, not on us (``counts_against``): only a
load child that ran the model and ended in

- ``timeout`` by its own deadline (``deadline`` with the child killed at it; a deadline
  that passed while downloading, inspecting, waiting for memory or hashing is not the
  model's doing, nor is one cut short by such waits: over ``_deadline.WAITED_SHARE`` of
  the child's limit),
- ``memory_exceeded`` (``memory_limit``, ``oom_killed``, ``cgroup_oom``),
- ``cpu_exceeded`` (``cpu_limit``),
- ``crashed`` by a signal, an exit or an exception of the loader (``signal``, ``exited``,
  ``loader_error``).

Not counted: our machinery failing (``sandbox``, ``cgroup_failed``, ``internal_error``,
``protocol_violation``: lost contact may be ours as well as the child's), a lost worker
(``worker_lost``: a rollout looks the same as a model that took a node down, and only a
child that ran to its end is evidence), ``invalid`` (already refused cheaply at
inspection), cancellations, and the memory's own refusals. Codes are allowed by name, so a
new code of our machinery never blames a model by default.

Retries: a job's failed attempts count once (the memory keeps one entry per job id), so
a single job with ``max_attempts=3`` never trips it alone; three jobs do. The refusal
(``refused`` / ``repeatedly_failing``) is not retried by the default retry policy.

Redis trouble never fails a load: it costs the memory, as it costs the history.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from structlog.typing import FilteringBoundLogger

from loadwarden.producer import failures as store
from loadwarden.producer.contract import FailingModel, Outcome
from loadwarden.producer.errors import LoadError, SourceRefused, describe
from loadwarden.worker.config import FailureMemoryPolicy

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from loadwarden.worker.load._report import LoadState

#: The error code of a refusal by the memory.
REFUSED_CODE = "repeatedly_failing"

#: The failures that count against a model, by outcome: the codes a load child produces
#: when the model itself made it fail (see the module docstring).
COUNTED: dict[Outcome, frozenset[str]] = {
    Outcome.TIMEOUT: frozenset({"deadline"}),
    Outcome.MEMORY_EXCEEDED: frozenset({"memory_limit", "oom_killed", "cgroup_oom"}),
    Outcome.CPU_EXCEEDED: frozenset({"cpu_limit"}),
    Outcome.CRASHED: frozenset({"signal", "exited", "loader_error"}),
}


def counts_against(
    error: LoadError | None, *, child_ran: bool, child_timed_out: bool, limit_cut: bool = False
) -> bool:
    """Whether this load's end counts against its model (pure: see the module docstring)."""
    if error is None or not child_ran:
        return False
    if error.outcome is Outcome.TIMEOUT and (not child_timed_out or limit_cut):
        # the job's deadline passed outside the child (hashing, after it ran), or the child
        # had only what waiting (admission, a fork server's restart) left of the job's
        return False
    return error.code in COUNTED.get(error.outcome, frozenset())


class RepeatedlyFailing(SourceRefused):
    """``refused`` / ``repeatedly_failing``: what the memory holds rides along to the report."""

    def __init__(
        self, message: str, *, code: str = REFUSED_CODE, remembered: FailingModel | None = None
    ) -> None:
        super().__init__(message, code=code)
        self.remembered = remembered


def refusal(model: FailingModel, policy: FailureMemoryPolicy) -> RepeatedlyFailing:
    """The error of a load refused by the memory: how many failures, which, until when."""
    kinds = sorted({f"{f.outcome}/{f.error_code}" for f in model.failures})
    left_s = max(0, round((model.expires_at - datetime.now(UTC)).total_seconds()))
    return RepeatedlyFailing(
        f"this model failed {len(model.failures)} time(s) within "
        f"{policy.window_s:g} s ({', '.join(kinds)}); it is refused until "
        f"{model.expires_at.isoformat(timespec='seconds')} (in {left_s} s), unless an "
        f"operator clears it sooner (`loadwarden failures clear {model.identity}`)",
        remembered=model,
    )


class FailureMemory:
    """The worker's view of the failure memory: check before a load, record after it."""

    def __init__(self, redis: Redis, policy: FailureMemoryPolicy) -> None:
        self.redis = redis
        self.policy = policy

    async def admit(self, identity: str, log: FilteringBoundLogger) -> FailingModel | None:
        """What the memory holds for this model (None: nothing, or Redis cannot say);
        raises ``RepeatedlyFailing`` when it is refused."""
        from redis.exceptions import RedisError  # loaded with our client: no cost here

        try:
            found = await store.read(self.redis, identity, self.policy.threshold)
        except (RedisError, OSError) as exc:
            log.warning("failure_memory_unavailable", error=describe(exc))
            return None
        return self.judge(found)

    def judge(self, found: FailingModel | None) -> FailingModel | None:
        """``admit``'s verdict on what the memory holds: raises ``RepeatedlyFailing``."""
        if found is not None and found.refused:
            raise refusal(found, self.policy)
        return found

    async def settle(
        self,
        state: LoadState,
        job_id: str,
        source: str,
        error: LoadError | None,
        log: FilteringBoundLogger,
    ) -> None:
        """How a load ended: a success forgets the model's failures (when there were any:
        no round trip otherwise), a failure of the model's own making is remembered."""
        identity, run = state.identity, state.run
        if identity is None:  # the source never opened: no model to judge
            return
        if error is None:
            if state.remembered is not None:
                await self.forget(identity, log)
        elif counts_against(
            error,
            child_ran=run is not None and not run.cancelled,
            child_timed_out=run is not None and run.timed_out,
            limit_cut=state.limit_cut,
        ):
            await self.record(identity, job_id=job_id, source=source, error=error, log=log)

    async def record(
        self,
        identity: str,
        *,
        job_id: str,
        source: str,
        error: LoadError,
        log: FilteringBoundLogger,
    ) -> None:
        """Remember a failure that counts against the model."""
        from redis.exceptions import RedisError  # loaded with our client: no cost here

        try:
            count = await store.record(
                self.redis,
                identity,
                job_id=job_id,
                source=source,
                outcome=str(error.outcome),
                error_code=error.code,
                threshold=self.policy.threshold,
                window_s=self.policy.window_s,
            )
        except (RedisError, OSError) as exc:
            log.warning("failure_memory_unavailable", error=describe(exc))
            return
        log.info(
            "failure_remembered",
            identity=identity,
            failures=count,
            threshold=self.policy.threshold,
            refused_from_now=count >= self.policy.threshold,
        )

    async def forget(self, identity: str, log: FilteringBoundLogger) -> None:
        """A successful load: the model's failures are forgotten."""
        from redis.exceptions import RedisError  # loaded with our client: no cost here

        try:
            await store.forget(self.redis, [identity])
        except (RedisError, OSError) as exc:
            log.warning("failure_memory_unavailable", error=describe(exc))
            return
        log.info("failures_forgotten", identity=identity, reason="loaded")
