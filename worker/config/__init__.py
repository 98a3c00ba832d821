"""The worker's configuration: its settings and the policies they group (one validated object).

It imports only the producer (whose settings it extends), pydantic and the stdlib, so that
every folder of the worker can import it.
"""

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
