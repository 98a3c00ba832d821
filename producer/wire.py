"""The one JSON serializer/deserializer pair for everything loadwarden puts in Redis.

arq is handed ``dumps``/``loads`` for jobs and results, so no pickle is ever
written or read. Decoding is strict: UTF-8 only, no NaN/Infinity, no duplicate
keys, a top-level object only.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from loadwarden.producer.errors import ContractError

#: Largest document we will parse from Redis; a report with a 100k-tensor manifest fits.
MAX_DOCUMENT_BYTES = 64 * 1024 * 1024


def _default(value: object) -> object:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, BaseException):
        # arq stores the exception of a job that failed outside our load path.
        return {"__error__": {"type": type(value).__name__, "message": str(value)}}
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not part of the loadwarden wire format")


def dumps(document: dict[str, Any]) -> bytes:
    """Serialize a job or result document to compact JSON bytes."""
    return json.dumps(document, default=_default, allow_nan=False, separators=(",", ":")).encode()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ContractError(f"duplicate key {key!r} in a wire document")
        out[key] = value
    return out


def _no_constant(name: str) -> object:
    raise ContractError(f"{name} is not valid JSON")


def loads(data: bytes | bytearray | memoryview | str) -> dict[str, Any]:
    """Parse a wire document; raise ContractError for anything that is not our strict JSON."""
    if isinstance(data, str):
        text = data
    else:
        raw = bytes(data)
        if len(raw) > MAX_DOCUMENT_BYTES:
            raise ContractError(f"wire document of {len(raw)} bytes exceeds {MAX_DOCUMENT_BYTES}")
        try:
            text = raw.decode("utf-8", errors="strict")
        except UnicodeDecodeError as exc:
            raise ContractError(f"wire document is not UTF-8 JSON ({exc.reason})") from None
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise ContractError(f"wire document is not JSON: {exc.msg} at {exc.pos}") from None
    except RecursionError:
        raise ContractError("wire document is nested too deeply") from None
    except ValueError:  # an integer past sys.int_info's digit limit
        raise ContractError("wire document holds a number too long to convert") from None
    if not isinstance(value, dict):
        raise ContractError("wire document must be a JSON object")
    return value
