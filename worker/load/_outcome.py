"""Turn what a child said and how it ended into one outcome (pure; tested without processes)."""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from loadwarden.producer.contract import Limits
from loadwarden.producer.errors import (
    ChildCrashed,
    CpuExceeded,
    InvalidModel,
    LoadError,
    LoadTimeout,
    MemoryExceeded,
    SourceRefused,
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


def parse_message(raw: dict[str, object]) -> ChildMessage:
    """Validate a message from a child strictly; a bad one is a protocol violation."""
    try:
        return _adapter.validate_python(raw)
    except ValidationError as exc:
        raise ChildCrashed(
            f"the child broke the protocol: {exc.error_count()} invalid field(s)",
            code="protocol_violation",
        ) from None


# Exceptions a loader raises, by class name, that say the file itself is at fault.
_INVALID_BY_TYPE = {
    "ManifestMismatch": "manifest_mismatch",
    "FileChanged": "file_changed",
    "SafetensorError": "loader_rejected",
}
_ALLOCATION_WORDS = ("alloc", "memory", "capacity overflow")


def _from_raised(raised: Raised) -> LoadError:
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


def classify(
    final: Loaded | Raised | None,
    ended: ChildExit,
    limits: Limits,
    *,
    timed_out: bool,
    peak_rss_bytes: int,
    expected_manifest: str,
) -> LoadError | None:
    """The error for a finished child, or None when the load is ``ok``.

    Precedence: our own deadline first (a timeout is never reported as anything
    else), then what the child said, then how it died.
    """
    if timed_out:
        return LoadTimeout(
            f"no answer within the {limits.timeout_seconds:g} s deadline; "
            "the child's process group was killed",
            code="deadline",
        )
    if isinstance(final, Loaded):
        if final.result.manifest_digest != expected_manifest:
            return InvalidModel(
                "the loader returned other tensors than the header declares",
                code="manifest_mismatch",
            )
        return None
    if isinstance(final, Raised):
        return _from_raised(final)
    return _from_exit(ended, limits, peak_rss_bytes)
