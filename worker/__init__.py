"""loadwarden's worker side: the supervisor, the sandbox, model formats, the arq worker.

Names are imported lazily (PEP 562): the fork server imports
``loadwarden.worker.sandbox._child``, which imports this package first, and every
load child's memory starts from the fork server's. Keep this module free of
eager imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loadwarden.worker.config import (
        AutoscalePolicy,
        FailureMemoryPolicy,
        InspectionCaps,
        LimitPolicy,
        Settings,
        SigningPolicy,
        SourcePolicy,
        TrustedSigner,
    )
    from loadwarden.worker.formats import Inspection, inspect_model
    from loadwarden.worker.formats.safetensors import SafetensorsHeader, inspect_safetensors
    from loadwarden.worker.load.limits import derive_limits
    from loadwarden.worker.load.supervisor import Supervisor
    from loadwarden.worker.ops.logs import configure_logging
    from loadwarden.worker.queue.arq_adapter import create_worker
    from loadwarden.worker.queue.runner import run_worker
    from loadwarden.worker.sandbox.children import ChildExit, SandboxError, stop_child
    from loadwarden.worker.sandbox.forkserver import ForkServer
    from loadwarden.worker.sources import open_model, open_source

_WHERE = {
    "AutoscalePolicy": "loadwarden.worker.config",
    "ChildExit": "loadwarden.worker.sandbox.children",
    "FailureMemoryPolicy": "loadwarden.worker.config",
    "ForkServer": "loadwarden.worker.sandbox.forkserver",
    "Inspection": "loadwarden.worker.formats",
    "InspectionCaps": "loadwarden.worker.config",
    "LimitPolicy": "loadwarden.worker.config",
    "SafetensorsHeader": "loadwarden.worker.formats.safetensors",
    "SandboxError": "loadwarden.worker.sandbox.children",
    "Settings": "loadwarden.worker.config",
    "SigningPolicy": "loadwarden.worker.config",
    "SourcePolicy": "loadwarden.worker.config",
    "Supervisor": "loadwarden.worker.load.supervisor",
    "TrustedSigner": "loadwarden.worker.config",
    "configure_logging": "loadwarden.worker.ops.logs",
    "create_worker": "loadwarden.worker.queue.arq_adapter",
    "derive_limits": "loadwarden.worker.load.limits",
    "inspect_model": "loadwarden.worker.formats",
    "inspect_safetensors": "loadwarden.worker.formats.safetensors",
    "open_model": "loadwarden.worker.sources",
    "open_source": "loadwarden.worker.sources",
    "run_worker": "loadwarden.worker.queue.runner",
    "stop_child": "loadwarden.worker.sandbox.children",
}

__all__ = [
    "AutoscalePolicy",
    "ChildExit",
    "FailureMemoryPolicy",
    "ForkServer",
    "Inspection",
    "InspectionCaps",
    "LimitPolicy",
    "SafetensorsHeader",
    "SandboxError",
    "Settings",
    "SigningPolicy",
    "SourcePolicy",
    "Supervisor",
    "TrustedSigner",
    "configure_logging",
    "create_worker",
    "derive_limits",
    "inspect_model",
    "inspect_safetensors",
    "open_model",
    "open_source",
    "run_worker",
    "stop_child",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'loadwarden.worker' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
