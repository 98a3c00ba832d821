"""How a load ended and what it read (``Outcome``, ``ModelFormat``): plain enums, no pydantic.

The contract (``loadwarden.producer.contract``) re-exports both; they live here so that
what needs only these names (the command line's options and ``--help``) does not pay for
importing pydantic and building the contract's models.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["ModelFormat", "Outcome"]


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
