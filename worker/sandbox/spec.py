"""The job a load child is handed: one typed value on both sides, validated where it lands.

Stdlib only (the child imports it). The supervisor builds a ``ChildSpec`` and sends
its JSON; the child rebuilds it with ``ChildSpec.from_json``, which refuses a missing,
unknown or mistyped field (``SpecError``), so the child and its loaders read typed
attributes, never a dict's keys.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


class SpecError(ValueError):
    """The spec a child received is not one the supervisor could have sent."""


@dataclass(frozen=True, slots=True)
class FileIdentity:
    """What the file handed over must still be: its device, inode and size at inspection."""

    dev: int
    ino: int
    size: int


@dataclass(frozen=True, slots=True)
class SpecFile:
    """One shard of a checkpoint: its name (for the report) and its identity."""

    name: str
    expect: FileIdentity


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """One load: the loader, the limits the child sets on itself, and what it is handed
    (one file's identity, or a checkpoint's shards); never a digest (the supervisor hashes)."""

    loader: str
    memory_bytes: int
    cpu_seconds: float
    max_fds: int
    address_space_limit: bool
    landlock: bool
    manifest_digest: str | None
    expect: FileIdentity | None = None
    files: tuple[SpecFile, ...] | None = None

    def __post_init__(self) -> None:
        if (self.expect is None) == (self.files is None):
            raise SpecError("a spec names one file (expect) or a checkpoint's files, not both")

    @property
    def identities(self) -> list[FileIdentity]:
        """The identity of each descriptor handed over, in order."""
        return [self.expect] if self.expect is not None else [f.expect for f in self.files or ()]

    def to_json(self) -> dict[str, Any]:
        """The spec as JSON values (the packet the child receives)."""
        return {k: v for k, v in asdict(self).items() if v is not None or k == "manifest_digest"}

    @classmethod
    def from_json(cls, data: object) -> ChildSpec:
        """The spec ``to_json`` wrote, checked field by field; ``SpecError`` otherwise."""
        fields = _object(data, "spec", required=_REQUIRED, optional={"expect", "files"})
        digest = fields["manifest_digest"]
        if digest is not None and not isinstance(digest, str):
            raise SpecError("spec: manifest_digest must be a string or null")
        files = fields.get("files")
        if files is not None and (not isinstance(files, list) or not files):
            raise SpecError("spec: files must be a non-empty list")
        return cls(
            loader=_typed(fields, "loader", str),
            memory_bytes=_count(fields, "memory_bytes", minimum=1),
            cpu_seconds=_seconds(fields, "cpu_seconds"),
            max_fds=_count(fields, "max_fds"),
            address_space_limit=_typed(fields, "address_space_limit", bool),
            landlock=_typed(fields, "landlock", bool),
            manifest_digest=digest,
            expect=_identity(fields["expect"]) if "expect" in fields else None,
            files=None if files is None else tuple(_file(f) for f in files),
        )


_REQUIRED = frozenset(
    {
        "loader",
        "memory_bytes",
        "cpu_seconds",
        "max_fds",
        "address_space_limit",
        "landlock",
        "manifest_digest",
    }
)


def _object(
    data: object, what: str, *, required: frozenset[str], optional: set[str] | None = None
) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise SpecError(f"{what} must be an object")
    keys = set(data)
    if missing := required - keys:
        raise SpecError(f"{what}: missing {sorted(missing)}")
    if unknown := keys - required - (optional or set()):
        raise SpecError(f"{what}: unknown {sorted(unknown)}")
    return data


def _typed(fields: dict[str, Any], key: str, kind: type[Any]) -> Any:
    value = fields[key]
    if type(value) is not kind:  # exactly: a bool is not an int here, nor an int a bool
        raise SpecError(f"spec: {key} must be a {kind.__name__}")
    return value


def _count(fields: dict[str, Any], key: str, minimum: int = 0) -> int:
    value: int = _typed(fields, key, int)
    if value < minimum:
        raise SpecError(f"spec: {key} must be at least {minimum}")
    return value


def _seconds(fields: dict[str, Any], key: str) -> float:
    value = fields[key]
    if type(value) not in (int, float) or not (math.isfinite(value) and value > 0):
        raise SpecError(f"spec: {key} must be a positive number")
    return float(value)


def _identity(data: object) -> FileIdentity:
    fields = _object(data, "expect", required=frozenset({"dev", "ino", "size"}))
    return FileIdentity(*(_count(fields, key) for key in ("dev", "ino", "size")))


def _file(data: object) -> SpecFile:
    fields = _object(data, "file", required=frozenset({"name", "expect"}))
    return SpecFile(_typed(fields, "name", str), _identity(fields["expect"]))
