"""What a producer asks for: one load (LoadRequest), its limits and its retries."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from loadwarden.producer.contract._base import (
    WIRE_VERSION,
    PositiveSeconds,
    Sha256,
    SignedBy,
    _Model,
)
from loadwarden.producer.outcomes import ModelFormat, Outcome
from loadwarden.producer.sources import is_url


class LimitOverrides(_Model):
    """Limits a request asks for: each wins over the derived value, within the worker's ceilings."""

    memory_bytes: Annotated[int, Field(gt=0)] | None = None
    cpu_seconds: PositiveSeconds | None = None
    timeout_seconds: PositiveSeconds | None = None


class RetryPolicy(_Model):
    """How a job is retried: which outcomes, how often, with what exponential backoff.

    ``retry_on`` given in a request wins over the worker's setting, which wins over
    the default (timeout, crashed, unavailable). Delays are full-jitter exponential:
    uniform in [0, min(max_s, base_s x 2^(attempt-1))).
    """

    max_attempts: Annotated[int, Field(ge=1, le=100)] = 3
    base_s: PositiveSeconds = 1.0
    max_s: PositiveSeconds = 60.0
    retry_on: tuple[Outcome, ...] = (Outcome.CRASHED, Outcome.TIMEOUT, Outcome.UNAVAILABLE)

    @field_validator("retry_on")
    @classmethod
    def _sorted_unique(cls, value: tuple[Outcome, ...]) -> tuple[Outcome, ...]:
        return tuple(sorted(set(value)))


class LoadRequest(_Model):
    """One model load, as a producer enqueues it."""

    wire_version: Literal[1] = WIRE_VERSION
    source: Annotated[str, Field(min_length=1, max_length=4096)]
    sha256: Sha256 | None = None
    format: ModelFormat | None = None
    limits: LimitOverrides = LimitOverrides()
    retry: RetryPolicy = RetryPolicy()
    # Bounded so that a request, and so a job document, stays small (see envelope.MAX_JOB_BYTES).
    labels: Annotated[
        dict[Annotated[str, Field(max_length=128)], Annotated[str, Field(max_length=256)]],
        Field(max_length=64),
    ] = Field(default={})
    signed_by: SignedBy | None = Field(
        default=None,
        description="require a signature (OpenSSF model signing) by one of these signers, "
        "named as the worker's settings name its trusted keys (* : any of them). It only adds "
        "to the worker's own rules: a request can never bring a key of its own",
    )

    @field_validator("sha256", mode="before")
    @classmethod
    def _lower_digest(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("source")
    @classmethod
    def _no_nul(cls, value: str) -> str:
        if "\0" in value:
            raise ValueError("a source may not hold a NUL byte")
        return value

    @field_validator("source")
    @classmethod
    def _absolute_or_url(cls, value: str) -> str:
        # The worker resolves a path on its own machine, against its own working
        # directory: a relative path would name another file there, or none.
        if not is_url(value) and not value.startswith("/"):
            raise ValueError(
                f"{value!r} is a relative path: the worker resolves paths on its own side, "
                "so give an absolute path (or a URL)"
            )
        return value
