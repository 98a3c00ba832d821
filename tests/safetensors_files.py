"""Build raw safetensors bytes, valid or hostile, for tests and the hostile-input corpus."""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import numpy as np
from safetensors.numpy import save_file


def raw_file(
    header: dict[str, Any] | str | bytes, data: bytes = b"", *, length: int | None = None
) -> bytes:
    """The bytes of a safetensors file: prefix, header and data, each as given.

    ``header`` is an object to encode as compact JSON, or text/bytes written as-is;
    ``length`` overrides the 8-byte little-endian header length (default: the true one).
    """
    if isinstance(header, dict):
        header = json.dumps(header, separators=(",", ":"))
    raw = header.encode("utf-8") if isinstance(header, str) else header
    declared = len(raw) if length is None else length
    return struct.pack("<Q", declared) + raw + data


def entry(dtype: str, shape: list[Any], begin: int, end: int) -> dict[str, Any]:
    """One tensor entry of a header."""
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def one_tensor(**changes: Any) -> bytes:
    """A valid file with one U8 tensor ``t`` of shape [4], with fields of its entry replaced."""
    return raw_file({"t": {**entry("U8", [4], 0, 4), **changes}}, b"\x00" * 4)


def write(path: str | os.PathLike[str], content: bytes) -> str:
    """Write ``content`` to ``path`` and return the path as a string."""
    with open(path, "wb") as f:
        f.write(content)
    return os.fspath(path)


def valid_model(
    path: str | os.PathLike[str],
    tensors: dict[str, np.ndarray],
    metadata: dict[str, str] | None = None,
) -> str:
    """Write ``tensors`` with the safetensors library itself and return the path."""
    save_file(tensors, os.fspath(path), metadata=metadata)
    return os.fspath(path)
