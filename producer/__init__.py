"""loadwarden's producer side: the job contract, the JSON wire format, the client and settings.

The worker imports this package; this package never imports the worker, and needs
nothing beyond arq, redis, pydantic and pydantic-settings (``pip install loadwarden``).

Names are imported lazily (PEP 562): a caller that needs one module (the
contract, say) does not pay for the client, arq and Redis; ``loadwarden --help``
and a load child start faster.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loadwarden.producer.catalog import (
        Catalog,
        CatalogDefaults,
        CatalogEntry,
        load_catalog,
        parse_catalog,
    )
    from loadwarden.producer.client import (
        BlockingClient,
        BlockingJobHandle,
        Client,
        JobHandle,
        JobState,
        QueueStatus,
    )
    from loadwarden.producer.contract import (
        WIRE_VERSION,
        Attempt,
        Derivation,
        ErrorInfo,
        FailingModel,
        LimitDerivation,
        LimitOverrides,
        Limits,
        LoadReport,
        LoadRequest,
        ModelFormat,
        ModelSummary,
        Outcome,
        RememberedFailure,
        Resources,
        RetryPolicy,
        ShardInfo,
        SignatureInfo,
        TensorInfo,
        WorkerInfo,
        WorkerStatus,
    )
    from loadwarden.producer.errors import (
        CatalogError,
        ChildCrashed,
        ClientError,
        ContractError,
        CpuExceeded,
        EmbeddedWorkerDied,
        InvalidModel,
        JobNotFound,
        LoadCancelled,
        LoadError,
        LoadTimeout,
        LoadwardenError,
        MemoryExceeded,
        RedisUnavailable,
        ReportTimeout,
        SourceRefused,
        SourceUnavailable,
        error_class_for,
    )
    from loadwarden.producer.settings import (
        RedisOptions,
        Settings,
    )

_WHERE = {
    "Attempt": "loadwarden.producer.contract",
    "BlockingClient": "loadwarden.producer.client",
    "BlockingJobHandle": "loadwarden.producer.client",
    "Catalog": "loadwarden.producer.catalog",
    "CatalogDefaults": "loadwarden.producer.catalog",
    "CatalogEntry": "loadwarden.producer.catalog",
    "CatalogError": "loadwarden.producer.errors",
    "ChildCrashed": "loadwarden.producer.errors",
    "Client": "loadwarden.producer.client",
    "ClientError": "loadwarden.producer.errors",
    "ContractError": "loadwarden.producer.errors",
    "CpuExceeded": "loadwarden.producer.errors",
    "Derivation": "loadwarden.producer.contract",
    "EmbeddedWorkerDied": "loadwarden.producer.errors",
    "ErrorInfo": "loadwarden.producer.contract",
    "FailingModel": "loadwarden.producer.contract",
    "InvalidModel": "loadwarden.producer.errors",
    "JobHandle": "loadwarden.producer.client",
    "JobNotFound": "loadwarden.producer.errors",
    "JobState": "loadwarden.producer.client",
    "LimitDerivation": "loadwarden.producer.contract",
    "LimitOverrides": "loadwarden.producer.contract",
    "Limits": "loadwarden.producer.contract",
    "LoadCancelled": "loadwarden.producer.errors",
    "LoadError": "loadwarden.producer.errors",
    "LoadReport": "loadwarden.producer.contract",
    "LoadRequest": "loadwarden.producer.contract",
    "LoadTimeout": "loadwarden.producer.errors",
    "LoadwardenError": "loadwarden.producer.errors",
    "MemoryExceeded": "loadwarden.producer.errors",
    "ModelFormat": "loadwarden.producer.outcomes",
    "ModelSummary": "loadwarden.producer.contract",
    "Outcome": "loadwarden.producer.outcomes",
    "QueueStatus": "loadwarden.producer.client",
    "RedisOptions": "loadwarden.producer.settings",
    "RedisUnavailable": "loadwarden.producer.errors",
    "RememberedFailure": "loadwarden.producer.contract",
    "ReportTimeout": "loadwarden.producer.errors",
    "Resources": "loadwarden.producer.contract",
    "RetryPolicy": "loadwarden.producer.contract",
    "Settings": "loadwarden.producer.settings",
    "ShardInfo": "loadwarden.producer.contract",
    "SignatureInfo": "loadwarden.producer.contract",
    "SourceRefused": "loadwarden.producer.errors",
    "SourceUnavailable": "loadwarden.producer.errors",
    "TensorInfo": "loadwarden.producer.contract",
    "WIRE_VERSION": "loadwarden.producer.contract",
    "WorkerInfo": "loadwarden.producer.contract",
    "WorkerStatus": "loadwarden.producer.contract",
    "error_class_for": "loadwarden.producer.errors",
    "load_catalog": "loadwarden.producer.catalog",
    "parse_catalog": "loadwarden.producer.catalog",
}

__all__ = [
    "WIRE_VERSION",
    "Attempt",
    "BlockingClient",
    "BlockingJobHandle",
    "Catalog",
    "CatalogDefaults",
    "CatalogEntry",
    "CatalogError",
    "ChildCrashed",
    "Client",
    "ClientError",
    "ContractError",
    "CpuExceeded",
    "Derivation",
    "EmbeddedWorkerDied",
    "ErrorInfo",
    "FailingModel",
    "InvalidModel",
    "JobHandle",
    "JobNotFound",
    "JobState",
    "LimitDerivation",
    "LimitOverrides",
    "Limits",
    "LoadCancelled",
    "LoadError",
    "LoadReport",
    "LoadRequest",
    "LoadTimeout",
    "LoadwardenError",
    "MemoryExceeded",
    "ModelFormat",
    "ModelSummary",
    "Outcome",
    "QueueStatus",
    "RedisOptions",
    "RedisUnavailable",
    "RememberedFailure",
    "ReportTimeout",
    "Resources",
    "RetryPolicy",
    "Settings",
    "ShardInfo",
    "SignatureInfo",
    "SourceRefused",
    "SourceUnavailable",
    "TensorInfo",
    "WorkerInfo",
    "WorkerStatus",
    "error_class_for",
    "load_catalog",
    "parse_catalog",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
