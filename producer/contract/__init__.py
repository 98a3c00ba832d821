"""The job contract: what a producer asks for (LoadRequest) and what comes back (LoadReport).

These models are the wire format. They are validated on both ends, serialized as
JSON only, and exported as JSON Schema (``producer/schemas/``) so services in
other languages can enqueue loads and read reports. One module per side: the
request (``request``), the report (``report``), and what Redis says about now
(``status``: the failure memory's models, workers' heartbeats), on a shared
vocabulary (``_base``: the wire version and value types; ``loadwarden.producer.outcomes``:
outcomes and formats, plain enums that need no pydantic).
"""

from loadwarden.producer.contract._base import (
    WIRE_VERSION,
    NonNegFloat,
    NonNegInt,
    PositiveSeconds,
    Sha256,
    SignedBy,
    SignerName,
)
from loadwarden.producer.contract.report import (
    Attempt,
    Derivation,
    ErrorInfo,
    LimitDerivation,
    Limits,
    LoadReport,
    ModelSummary,
    Resources,
    Sample,
    ShardInfo,
    SignatureInfo,
    TensorInfo,
    WorkerInfo,
)
from loadwarden.producer.contract.request import LimitOverrides, LoadRequest, RetryPolicy
from loadwarden.producer.contract.status import (
    FailingModel,
    JobPhase,
    RememberedFailure,
    RunningJob,
    WorkerStatus,
)
from loadwarden.producer.outcomes import ModelFormat, Outcome

__all__ = [
    "WIRE_VERSION",
    "Attempt",
    "Derivation",
    "ErrorInfo",
    "FailingModel",
    "JobPhase",
    "LimitDerivation",
    "LimitOverrides",
    "Limits",
    "LoadReport",
    "LoadRequest",
    "ModelFormat",
    "ModelSummary",
    "NonNegFloat",
    "NonNegInt",
    "Outcome",
    "PositiveSeconds",
    "RememberedFailure",
    "Resources",
    "RetryPolicy",
    "RunningJob",
    "Sample",
    "Sha256",
    "ShardInfo",
    "SignatureInfo",
    "SignedBy",
    "SignerName",
    "TensorInfo",
    "WorkerInfo",
    "WorkerStatus",
]
