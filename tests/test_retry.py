"""The retry policy: pure functions, tested without sleeping or Redis."""

from __future__ import annotations

import random

import pytest

from loadwarden.producer.contract import LoadRequest, Outcome, RetryPolicy
from loadwarden.worker.queue.retry import DEFAULT_RETRY_ON, backoff_s, retry_on, should_retry


def test_backoff_is_full_jitter_exponential_for_a_fixed_seed() -> None:
    """Delays are uniform below min(max_s, base_s x 2^(n-1)); a fixed seed gives fixed values."""
    policy = RetryPolicy(base_s=1.0, max_s=10.0, max_attempts=10)
    rng = random.Random(42)
    delays = [round(backoff_s(n, policy, rng.random), 4) for n in range(1, 7)]
    assert delays == [0.6394, 0.05, 1.1001, 1.7857, 7.3647, 6.767]
    rng = random.Random(42)
    again = [round(backoff_s(n, policy, rng.random), 4) for n in range(1, 7)]
    assert delays == again
    for n, delay in enumerate(delays, start=1):
        assert 0 <= delay < min(10.0, 2 ** (n - 1))


@pytest.mark.parametrize(
    ("rand", "attempt", "expected"), [(0.5, 1, 0.5), (0.5, 3, 2.0), (0.999, 10, 9.99)]
)
def test_backoff_ceiling(rand: float, attempt: int, expected: float) -> None:
    """The n-th delay is rand x min(max_s, base_s x 2^(n-1))."""
    policy = RetryPolicy(base_s=1.0, max_s=10.0)
    assert backoff_s(attempt, policy, lambda: rand) == pytest.approx(expected)


def test_precedence_request_then_worker_then_default() -> None:
    """A request's retry_on wins over the worker's setting, which wins over the default."""
    own = LoadRequest(source="/m", retry=RetryPolicy(retry_on=(Outcome.INVALID,)))
    plain = LoadRequest(source="/m")
    worker = (Outcome.MEMORY_EXCEEDED,)
    assert retry_on(own.retry, "retry_on" in own.retry.model_fields_set, worker) == {
        Outcome.INVALID
    }
    assert retry_on(plain.retry, "retry_on" in plain.retry.model_fields_set, worker) == set(worker)
    assert retry_on(plain.retry, False, None) == DEFAULT_RETRY_ON


def test_request_choice_survives_the_wire() -> None:
    """Only set fields travel, so the worker can still tell a request's own choice from defaults."""
    sent = LoadRequest(source="/m", retry=RetryPolicy(max_attempts=5)).model_dump(
        mode="json", exclude_unset=True
    )
    received = LoadRequest.model_validate(sent)
    assert "retry_on" not in received.retry.model_fields_set
    assert received.retry.max_attempts == 5


@pytest.mark.parametrize(
    ("outcome", "attempt", "expected"),
    [
        (Outcome.TIMEOUT, 1, True),
        (Outcome.CRASHED, 2, True),
        (Outcome.UNAVAILABLE, 3, False),  # the third of three attempts was the last
        (Outcome.INVALID, 1, False),
        (Outcome.REFUSED, 1, False),
        (Outcome.MEMORY_EXCEEDED, 1, False),
        (Outcome.CPU_EXCEEDED, 1, False),
        (Outcome.OK, 1, False),
    ],
)
def test_should_retry_by_default(outcome: Outcome, attempt: int, expected: bool) -> None:
    """By default timeout, crashed and unavailable are retried within max_attempts; nothing else."""
    assert should_retry(outcome, attempt, RetryPolicy(max_attempts=3), DEFAULT_RETRY_ON) is expected
