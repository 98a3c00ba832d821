"""What comes back: the LoadReport of one job, with the model, limits and resources."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field

from loadwarden.producer.contract._base import (
    WIRE_VERSION,
    NonNegFloat,
    NonNegInt,
    PositiveSeconds,
    Sha256,
    _Model,
)
from loadwarden.producer.contract.status import FailingModel
from loadwarden.producer.errors import LoadError, error_class_for
from loadwarden.producer.outcomes import ModelFormat, Outcome


class Derivation(StrEnum):
    """Where a limit's value came from."""

    DECLARED_SIZE = "declared_size"
    HISTORY = "history"
    OVERRIDE = "override"
    #: The request asked for more than the worker's ceiling: the ceiling was used instead.
    OVERRIDE_CLAMPED = "override_clamped"
    DEFAULT = "default"


class LimitDerivation(_Model):
    """For each limit, where its value came from."""

    memory_bytes: Derivation
    cpu_seconds: Derivation
    timeout_seconds: Derivation


class Limits(_Model):
    """The limits one load ran under, and how each was derived."""

    memory_bytes: Annotated[int, Field(gt=0)]
    cpu_seconds: PositiveSeconds
    timeout_seconds: PositiveSeconds
    derivation: LimitDerivation


class TensorInfo(_Model):
    """One tensor of a model's manifest."""

    name: str
    dtype: str
    shape: list[NonNegInt]
    bytes: NonNegInt


class ShardInfo(_Model):
    """One file of a sharded checkpoint, as loaded."""

    file: str = Field(description="file name in the checkpoint's folder (or snapshot)")
    file_bytes: NonNegInt
    bytes: NonNegInt = Field(description="bytes of tensor data")
    tensors: NonNegInt
    sha256: Sha256 | None = Field(default=None, description="set when the loader hashed it")


class ModelSummary(_Model):
    """What a model file holds, as read from its header (and confirmed by the loader)."""

    format: ModelFormat
    file_bytes: NonNegInt
    bytes: NonNegInt = Field(description="bytes of tensor data")
    parameters: NonNegInt
    dtypes: dict[str, NonNegInt] = Field(description="parameter count per dtype")
    tensors: list[TensorInfo] = Field(
        description="the tensors, in file order; a report lists at most its worker's "
        "report_max_tensors of them (see tensor_count and tensors_truncated)"
    )
    tensor_count: NonNegInt | None = Field(
        default=None, description="how many tensors the model has (None: len(tensors))"
    )
    tensors_truncated: bool = Field(
        default=False, description="true when ``tensors`` lists only the first of them"
    )
    metadata: dict[str, str] = Field(default={})
    sha256: Sha256 | None = Field(
        default=None,
        description="set when the loader hashed the file; for a checkpoint, the sha256 of "
        "its shards' `sha256sum` lines (`<sha256>  <file>\\n`, sorted by file name)",
    )
    shards: list[ShardInfo] | None = Field(
        default=None,
        description="the files of a checkpoint (a folder, an index or an hf:// source); "
        "the other fields sum them",
    )

    def capped(self, max_tensors: int) -> ModelSummary:
        """This summary with at most ``max_tensors`` tensors listed (totals always kept).

        ``shards`` stays whole: it is already bounded by ``inspection.max_shards``, and a
        checkpoint's digest is defined over every shard's line.
        """
        count = self.tensor_count if self.tensor_count is not None else len(self.tensors)
        if len(self.tensors) <= max_tensors:
            return self.model_copy(update={"tensor_count": count})
        return self.model_copy(
            update={
                "tensors": self.tensors[:max_tensors],
                "tensor_count": count,
                "tensors_truncated": True,
            }
        )


class SignatureInfo(_Model):
    """The signature a load was checked against (OpenSSF model signing, a Sigstore bundle)."""

    file: str = Field(description="the signature file's name (model.sig, or FILE.sig)")
    sha256: Sha256 = Field(description="sha256 of the signature file's bytes")
    signer: str | None = Field(
        default=None, description="the trusted signer it verified under (None: it did not)"
    )
    key_sha256: Sha256 | None = Field(
        default=None,
        description="the bundle's key hint: sha256 of the signer's PEM public key",
    )
    model_sha256: Sha256 | None = Field(
        default=None, description="the signed manifest's root digest (its in-toto subject)"
    )
    files: NonNegInt = Field(default=0, description="files the signed manifest covers")
    verified: bool = Field(
        default=False,
        description="true once the signature verified and every loaded file matched the manifest",
    )


class ErrorInfo(_Model):
    """Why a load did not end ``ok``: the error class, a stable code and a message."""

    type: str
    code: str
    message: str
    traceback: str | None = None
    failure_memory: FailingModel | None = Field(
        default=None,
        description="set when the load was refused as repeatedly failing: the failures "
        "remembered and when the memory expires",
    )

    @classmethod
    def from_error(
        cls,
        error: LoadError,
        traceback: str | None = None,
        failure_memory: FailingModel | None = None,
    ) -> ErrorInfo:
        return cls(
            type=type(error).__name__,
            code=error.code,
            message=error.message,
            traceback=traceback,
            failure_memory=failure_memory,
        )


class Sample(_Model):
    """One psutil sample of a running load, ``t_s`` seconds after its first."""

    t_s: NonNegFloat
    rss_bytes: NonNegInt
    cpu_s: NonNegFloat


class Resources(_Model):
    """What a load cost, measured (never assumed)."""

    wall_seconds: NonNegFloat
    cpu_user_seconds: NonNegFloat
    cpu_system_seconds: NonNegFloat
    peak_rss_bytes: NonNegInt
    read_bytes: NonNegInt
    samples: NonNegInt
    cgroup_peak_bytes: NonNegInt | None = Field(
        default=None, description="peak of the load's cgroup (memory and page cache it charged)"
    )
    series: list[Sample] = Field(default=[], description="at most 120 samples, evenly thinned")


class Attempt(_Model):
    """One run of a job."""

    number: Annotated[int, Field(ge=1)]
    outcome: Outcome
    error_code: str | None = None
    worker: str
    started_at: datetime
    finished_at: datetime
    delay_s: NonNegFloat | None = Field(
        default=None, description="the backoff chosen before the next attempt, if one followed"
    )


class WorkerInfo(_Model):
    """The worker that produced a report."""

    id: str
    hostname: str
    pid: int
    version: str


class LoadReport(_Model):
    """The result of one load job: outcome, model, limits, resources, attempts."""

    wire_version: Literal[1] = WIRE_VERSION
    job_id: str
    source: str
    outcome: Outcome
    error: ErrorInfo | None = None
    attempts: list[Attempt]
    model: ModelSummary | None = None
    signature: SignatureInfo | None = Field(
        default=None, description="set when a signature was required and read"
    )
    limits: Limits | None = None
    resources: Resources | None = None
    confinement: list[str] = Field(default=[], description="mechanisms that confined the load")
    worker: WorkerInfo
    labels: dict[str, str] = Field(default={})
    enqueued_at: datetime | None = None
    started_at: datetime
    finished_at: datetime

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK

    def raise_for_outcome(self) -> LoadReport:
        """Return self when ``ok``; otherwise raise the outcome's ``LoadError`` with this report."""
        if self.ok:
            return self
        cls = error_class_for(self.outcome)
        err = self.error
        raise cls(
            err.message if err else str(self.outcome), code=err.code if err else "", report=self
        )
