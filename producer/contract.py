"""The job contract: what a producer asks for (LoadRequest) and what comes back (LoadReport).

These models are the wire format. They are validated on both ends, serialized as
JSON only, and exported as JSON Schema (``producer/schemas/``) so services in
other languages can enqueue loads and read reports.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from loadwarden.producer.errors import LoadError, error_class_for
from loadwarden.producer.sources import is_url

#: Bumped on any incompatible change to LoadRequest or LoadReport.
WIRE_VERSION: Literal[1] = 1

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="lower-case hex sha256")]
NonNegInt = Annotated[int, Field(ge=0)]
NonNegFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
#: A finite, positive duration (JSON has no infinity; neither do our limits).
PositiveSeconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
#: A trusted signer's name in a worker's settings (``signing.signers``), or ``*``: any of them.
SignerName = Annotated[
    str,
    Field(
        pattern=r"^(\*|[A-Za-z0-9][A-Za-z0-9._-]{0,63})$",
        description="a signer the worker trusts, by the name its settings give it; * is any",
    ),
]
#: The signers a model must be signed by, one of them (worker settings, catalog, request).
SignedBy = Annotated[tuple[SignerName, ...], Field(min_length=1, max_length=16)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Outcome(StrEnum):
    """How a load ended. Every value but ``ok`` has one error class in ``errors``."""

    OK = "ok"
    INVALID = "invalid"
    REFUSED = "refused"
    TIMEOUT = "timeout"
    MEMORY_EXCEEDED = "memory_exceeded"
    CPU_EXCEEDED = "cpu_exceeded"
    CRASHED = "crashed"
    UNAVAILABLE = "unavailable"
    CANCELLED = "cancelled"


class ModelFormat(StrEnum):
    """File formats loadwarden knows how to inspect and load."""

    SAFETENSORS = "safetensors"
    NPY = "npy"
    NPZ = "npz"
    GGUF = "gguf"


class Derivation(StrEnum):
    """Where a limit's value came from."""

    DECLARED_SIZE = "declared_size"
    HISTORY = "history"
    OVERRIDE = "override"
    #: The request asked for more than the worker's ceiling: the ceiling was used instead.
    OVERRIDE_CLAMPED = "override_clamped"
    DEFAULT = "default"


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
    ] = {}
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
    metadata: dict[str, str] = {}
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


class RememberedFailure(_Model):
    """One failed load that the failure memory counts against its model."""

    job_id: str
    source: str
    outcome: Outcome
    error_code: str
    at: datetime


class FailingModel(_Model):
    """What the failure memory holds for one model identity."""

    identity: str = Field(
        description="the model's identity: sha256:<digest> when the request named one, else "
        "file:<sha256 of each file's path, size and mtime> (a changed file is a new model)"
    )
    failures: list[RememberedFailure] = Field(
        description="one per job (a job's retries count once), newest first"
    )
    refused: bool = Field(description="true when loads of this model are refused now")
    expires_at: datetime = Field(
        description="when the memory forgets this model (a window after its latest failure)"
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
    labels: dict[str, str] = {}
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


class JobPhase(StrEnum):
    """What a worker is doing with a job right now."""

    INSPECTING = "inspecting"  # opening the source, reading the header, deriving limits
    WAITING = "waiting"  # for room in the worker's memory budget
    LOADING = "loading"  # a confined child is loading it


class RunningJob(_Model):
    """One job a worker holds now, and since when it has been in its current phase."""

    job_id: str
    source: str
    phase: JobPhase
    since: datetime


class WorkerStatus(_Model):
    """A live worker's heartbeat: who it is, what it runs, how much of its memory budget is held."""

    id: str
    hostname: str
    pid: int
    version: str
    queue: str
    concurrency: Annotated[int, Field(ge=1)]
    memory_budget_bytes: NonNegInt
    memory_in_use_bytes: NonNegInt
    running: NonNegInt
    waiting: NonNegInt = Field(description="loads waiting for memory budget")
    in_flight: list[str] = Field(default=[], description="job ids this worker is running")
    jobs: list[RunningJob] = Field(default=[], description="each job held now, with its phase")
    cgroups: str
    landlock_abi: NonNegInt
    started_at: datetime
    seen_at: datetime
