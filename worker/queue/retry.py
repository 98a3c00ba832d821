"""Retry policy: which outcomes are retried, and after how long (pure functions, no sleeping)."""

from __future__ import annotations

import random
from collections.abc import Callable, Collection

from loadwarden.producer.contract import Outcome, RetryPolicy

#: What is worth retrying when neither the request nor the worker says: failures of
#: the moment (a deadline on a busy node, a crash, a source that did not answer),
#: not verdicts on the file (invalid, refused) nor limits it will hit again.
DEFAULT_RETRY_ON: frozenset[Outcome] = frozenset(
    {Outcome.TIMEOUT, Outcome.CRASHED, Outcome.UNAVAILABLE}
)


def retry_on(
    request_policy: RetryPolicy, request_set: bool, worker_retry_on: Collection[Outcome] | None
) -> frozenset[Outcome]:
    """The outcomes to retry, by precedence: the request's, else the worker's, else the default."""
    if request_set:
        return frozenset(request_policy.retry_on)
    if worker_retry_on is not None:
        return frozenset(worker_retry_on)
    return DEFAULT_RETRY_ON


def backoff_s(
    attempt: int, policy: RetryPolicy, rand: Callable[[], float] = random.random
) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(max_s, base_s x 2^(attempt-1))).

    ``attempt`` is the number of the attempt that just failed (1 for the first);
    ``rand`` returns a float in [0, 1) and is injectable for tests.
    """
    ceiling = min(policy.max_s, policy.base_s * 2.0 ** (attempt - 1))
    return ceiling * rand()


def should_retry(
    outcome: Outcome, attempt: int, policy: RetryPolicy, retryable: frozenset[Outcome]
) -> bool:
    """Whether an attempt that ended in ``outcome`` gets another try."""
    return outcome in retryable and attempt < policy.max_attempts
