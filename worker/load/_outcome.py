"""Every outcome decided in one place: ``decide`` names how a run or a job ended (pure).

A child run ends as a ``RunEnd`` (what the child said, how it exited, whether
we stopped it and why, what the cgroup saw); a job that ends with no child
answer to judge (cancelled or out of time before a child, a stage that failed,
a payload the queue refused) ends as an ``EarlyEnd``. ``decide`` turns either
into the outcome and its error; ``tests/test_outcome.py`` holds the table.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from loadwarden.producer.contract import Limits, Outcome
from loadwarden.producer.errors import (
    ChildCrashed,
    CpuExceeded,
    InvalidModel,
    LoadCancelled,
    LoadError,
    LoadTimeout,
    MemoryExceeded,
    SourceRefused,
    error_class_for,
)

if TYPE_CHECKING:  # a type only: `inspect` reads this module and starts no child
    from loadwarden.worker.sandbox.children import ChildExit

Count = Annotated[int, Field(ge=0)]
Text = Annotated[str, Field(max_length=16_384)]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Ready(_Message):
    """The child is confined and about to load."""

    kind: Literal["ready"]
    pid: int
    confinement: Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=32)]
    baseline_vsz: Count
    baseline_rss: Count
    address_space: Count


class LoadedFile(_Message):
    """One file of a checkpoint, as the child loaded it (its digest is the supervisor's)."""

    name: Annotated[str, Field(max_length=255)]
    tensors: Count
    bytes: Count


class LoadedModel(_Message):
    tensors: Count
    bytes: Count
    manifest_digest: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None
    files: Annotated[list[LoadedFile], Field(max_length=4096)] | None = None


class Loaded(_Message):
    """The loader returned every tensor."""

    kind: Literal["ok"]
    result: LoadedModel
    rchar: Count


class Raised(_Message):
    """The loader raised; the exception's class, message and traceback as text."""

    kind: Literal["raised"]
    type: Annotated[str, Field(max_length=256)]
    module: Annotated[str, Field(max_length=256)]
    message: Text
    traceback: Text
    rchar: Count


ChildMessage = Ready | Loaded | Raised
_adapter: TypeAdapter[ChildMessage] = TypeAdapter(
    Annotated[ChildMessage, Field(discriminator="kind")]
)


class ProtocolViolation(Exception):
    """The child broke the protocol (a bad or out-of-order message); decide() names it."""


def parse_message(raw: dict[str, object]) -> ChildMessage:
    """Validate a message from a child strictly; a bad one is a protocol violation."""
    try:
        return _adapter.validate_python(raw)
    except ValidationError as exc:
        raise ProtocolViolation(
            f"the child broke the protocol: {exc.error_count()} invalid field(s)"
        ) from None


class Stop(StrEnum):
    """Why we stopped a child before it ended on its own."""

    DEADLINE = "deadline"
    CANCEL = "cancel"


@dataclass(frozen=True, slots=True)
class RunEnd:
    """How one child run ended: everything ``decide`` needs, nothing it must look up."""

    limits: Limits
    exit: ChildExit
    #: The manifest digest of the inspected header, which an ``ok`` answer must repeat.
    expected_manifest: str
    final: Loaded | Raised | None = None
    stopped: Stop | None = None
    #: How the child broke the protocol, or how we lost contact with it.
    protocol_error: str | None = None
    #: The kernel's OOM killer fired in the load's own cgroup.
    cgroup_oom: bool = False
    peak_rss_bytes: int = 0
    #: What the supervisor's own checks of the loaded bytes found (digests, signature).
    checked: LoadError | None = None


class Early(StrEnum):
    """A job that ended with no child answer to judge; each value is the error's code."""

    CANCELLED = "cancelled"
    DEADLINE = "deadline"
    SOURCE_ERROR = "source_error"
    SIGNATURE_INVALID = "signature_invalid"
    INSPECTION_ERROR = "inspection_error"
    SANDBOX = "sandbox"
    CGROUP_FAILED = "cgroup_failed"
    INTERNAL_ERROR = "internal_error"
    BAD_PAYLOAD = "bad_payload"
    BAD_REQUEST = "bad_request"
    ATTEMPTS_EXHAUSTED = "attempts_exhausted"
    JOB_EXPIRED = "job_expired"
    JOB_TIMEOUT = "job_timeout"
    WORKER_LOST = "worker_lost"


#: The outcome of each early end (see README "When things break").
EARLY_OUTCOMES: Mapping[Early, Outcome] = {
    Early.CANCELLED: Outcome.CANCELLED,
    # The job's own deadline passed before a child answered (opening, inspecting, hashing).
    Early.DEADLINE: Outcome.TIMEOUT,
    # The source could not be opened for a reason the opener did not name: worth a retry.
    Early.SOURCE_ERROR: Outcome.UNAVAILABLE,
    # Fail closed: a signature we could not check is one we do not accept.
    Early.SIGNATURE_INVALID: Outcome.REFUSED,
    # The file made the inspector fail: a verdict on the content, not retried.
    Early.INSPECTION_ERROR: Outcome.INVALID,
    # The sandbox machinery failed, not the file: worth a retry.
    Early.SANDBOX: Outcome.CRASHED,
    Early.CGROUP_FAILED: Outcome.CRASHED,
    Early.INTERNAL_ERROR: Outcome.CRASHED,
    # A payload that is not a LoadRequest will never become one: not retried.
    Early.BAD_PAYLOAD: Outcome.INVALID,
    Early.BAD_REQUEST: Outcome.INVALID,
    Early.ATTEMPTS_EXHAUSTED: Outcome.CRASHED,
    Early.JOB_EXPIRED: Outcome.INVALID,
    # arq's own timeout around the job (it never fires before our deadline).
    Early.JOB_TIMEOUT: Outcome.TIMEOUT,
    # The worker died mid-load (its attempt's placeholder outlived it): the next run counts it.
    Early.WORKER_LOST: Outcome.CRASHED,
}

#: What an exception nobody expected becomes, by the stage of the load it escaped from
#: (every path of a load ends in a report).
STAGE_ENDS: Mapping[str, Early] = {
    "source": Early.SOURCE_ERROR,
    "signature": Early.SIGNATURE_INVALID,
    "inspect": Early.INSPECTION_ERROR,
    "limits": Early.INTERNAL_ERROR,
    "admit": Early.INTERNAL_ERROR,
    "child": Early.SANDBOX,
    "classify": Early.INTERNAL_ERROR,
}


@dataclass(frozen=True, slots=True)
class EarlyEnd:
    """A job that ended with no child answer to judge: why, and what happened in words."""

    why: Early
    detail: str


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of a run or a job, and its error (None exactly when ``ok``)."""

    outcome: Outcome
    error: LoadError | None


def decide(end: RunEnd | EarlyEnd) -> Decision:
    """The one function that names how a load or a job ended."""
    error = _early(end) if isinstance(end, EarlyEnd) else _run(end)
    return Decision(error.outcome if error is not None else Outcome.OK, error)


def failure(why: Early, detail: str) -> LoadError:
    """``decide`` for an early end, as the error to raise or report (never ``ok``)."""
    error = decide(EarlyEnd(why, detail)).error
    assert error is not None  # an early end always has one
    return error


def _early(end: EarlyEnd) -> LoadError:
    return error_class_for(EARLY_OUTCOMES[end.why])(end.detail, code=str(end.why))


# Exceptions a loader raises, by class name, that say the file itself is at fault.
_INVALID_BY_TYPE = {
    "ManifestMismatch": "manifest_mismatch",
    "FileChanged": "file_changed",
    "SafetensorError": "loader_rejected",
}
_ALLOCATION_WORDS = ("alloc", "memory", "capacity overflow")


def _run(end: RunEnd) -> LoadError | None:
    """Precedence: a cancel; the cgroup's OOM killer (unless our deadline came first or the
    child answered); a broken protocol; our own deadline (a timeout is never reported as
    anything else); what the child said; how it died."""
    limits = end.limits
    if end.stopped is Stop.CANCEL:
        return LoadCancelled("cancelled while loading; the child was killed", code="cancelled")
    timed_out = end.stopped is Stop.DEADLINE
    if end.cgroup_oom and not timed_out and not isinstance(end.final, Loaded):
        return MemoryExceeded(
            f"the kernel's OOM killer stopped the load at its cgroup's "
            f"{limits.memory_bytes}-byte limit",
            code="cgroup_oom",
        )
    if end.protocol_error is not None:
        return ChildCrashed(end.protocol_error, code="protocol_violation")
    if timed_out:
        return LoadTimeout(
            f"no answer within the {limits.timeout_seconds:g} s deadline; "
            "the child's process group was killed",
            code="deadline",
        )
    if isinstance(end.final, Loaded):
        if end.final.result.manifest_digest != end.expected_manifest:
            return InvalidModel(
                "the loader returned other tensors than the header declares",
                code="manifest_mismatch",
            )
        return end.checked
    if isinstance(end.final, Raised):
        return _from_raised(end.final)
    return _from_exit(end.exit, limits, end.peak_rss_bytes)


#: The child's own exception for a confinement it could not put in place (``_child``).
_SANDBOX_FAILED = ("SandboxFailed", "loadwarden.worker.sandbox._child")


def _from_raised(raised: Raised) -> LoadError:
    if (raised.type, raised.module) == _SANDBOX_FAILED:  # before the loader touched the file
        return ChildCrashed(
            f"the child could not confine itself: {raised.message[:300]}", code=str(Early.SANDBOX)
        )
    if raised.type == "MemoryError" or (
        raised.type == "PanicException"
        and any(w in raised.message.lower() for w in _ALLOCATION_WORDS)
    ):
        return MemoryExceeded(
            f"the loader ran out of its memory limit ({raised.type}: {raised.message[:200]})",
            code="memory_limit",
        )
    if raised.type == "PermissionError":
        return SourceRefused(
            f"the loader tried something the sandbox forbids: {raised.message[:300]}",
            code="sandbox_denied",
        )
    if raised.type in _INVALID_BY_TYPE:
        return InvalidModel(raised.message, code=_INVALID_BY_TYPE[raised.type])
    return ChildCrashed(
        f"the loader raised {raised.type}: {raised.message[:500]}", code="loader_error"
    )


def _from_exit(ended: ChildExit, limits: Limits, peak_rss_bytes: int) -> LoadError:
    cpu_s = ended.cpu_user_s + ended.cpu_system_s
    if ended.signal == signal.SIGXCPU or (
        ended.signal == signal.SIGKILL and cpu_s >= limits.cpu_seconds
    ):
        return CpuExceeded(
            f"the load used its {limits.cpu_seconds:g} s of CPU time "
            f"({cpu_s:.2f} s) and was stopped",
            code="cpu_limit",
        )
    if ended.signal == signal.SIGKILL and peak_rss_bytes >= 0.9 * limits.memory_bytes:
        return MemoryExceeded(
            f"the child was killed with SIGKILL at {peak_rss_bytes} bytes resident, "
            f"near its {limits.memory_bytes}-byte limit (OOM killer)",
            code="oom_killed",
        )
    if ended.signal is not None:
        return ChildCrashed(
            f"the child died of {ended.signal_name} without answering", code="signal"
        )
    return ChildCrashed(
        f"the child exited with status {ended.exit_code} without answering", code="exited"
    )
