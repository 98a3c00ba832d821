"""The worker's configuration: its settings and the policies they group (one validated object).

It imports only the producer (whose settings it extends), pydantic and the stdlib, so that
every folder of the worker can import it.

Names are imported lazily (PEP 562), like ``loadwarden.worker``'s: a policy (the formats'
``InspectionCaps``) imports its own module, not ``Settings``, whose pydantic-settings
(~15 ms) only a command that reads the settings needs (``loadwarden inspect`` on no
``LOADWARDEN_*`` variable does not: ``cli._common.local_policies``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loadwarden.worker.config.policies import (
        AutoscalePolicy,
        FailureMemoryPolicy,
        InspectionCaps,
        LimitPolicy,
    )
    from loadwarden.worker.config.settings import (
        CONCURRENCY_PER_CPU,
        Settings,
        default_concurrency,
        usable_cpus,
    )
    from loadwarden.worker.config.trust import SigningPolicy, SourcePolicy, TrustedSigner

_WHERE = {
    "AutoscalePolicy": "policies",
    "CONCURRENCY_PER_CPU": "settings",
    "FailureMemoryPolicy": "policies",
    "InspectionCaps": "policies",
    "LimitPolicy": "policies",
    "Settings": "settings",
    "SigningPolicy": "trust",
    "SourcePolicy": "trust",
    "TrustedSigner": "trust",
    "default_concurrency": "settings",
    "usable_cpus": "settings",
}

__all__ = [
    "CONCURRENCY_PER_CPU",
    "AutoscalePolicy",
    "FailureMemoryPolicy",
    "InspectionCaps",
    "LimitPolicy",
    "Settings",
    "SigningPolicy",
    "SourcePolicy",
    "TrustedSigner",
    "default_concurrency",
    "usable_cpus",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'loadwarden.worker.config' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
