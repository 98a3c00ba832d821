"""Build raw safetensors bytes, valid or hostile, for tests and the hostile-input corpus."""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from loadwarden.worker.binary.dtypes import SAFETENSORS


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


#: Every safetensors dtype (``Dtype`` in safetensors' ``tensor.rs``).
ALL_DTYPES = (
    *("BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64"),
    *("F16", "BF16", "F32", "F64", "C64"),
    *("F8_E4M3", "F8_E5M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ"),
    *("F4", "F6_E2M3", "F6_E3M2"),
)
#: The ml_dtypes type each packed dtype's elements are cast to before packing.
PACKED_ELEMENTS = {
    "F4": ml_dtypes.float4_e2m1fn,
    "F6_E2M3": ml_dtypes.float6_e2m3fn,
    "F6_E3M2": ml_dtypes.float6_e3m2fn,
}


def sample(dtype: str, shape: list[int], rng: np.random.Generator) -> tuple[bytes, np.ndarray]:
    """Values of ``dtype`` and ``shape`` cast as real checkpoints are (ml_dtypes for BF16, FP8,
    FP6, FP4): the tensor's bytes, and the array a loader must give back for them.

    F4 packs two elements per byte (the first in the low nibble, as torch's
    float4_e2m1fn_x2), F6 four per three bytes (little-endian 6-bit fields); a
    loader gives them back as those bytes, a flat uint8 array.
    """
    count = int(np.prod(shape, dtype=np.int64))
    values = rng.standard_normal(count).astype(np.float32) * 4
    if dtype in PACKED_ELEMENTS:
        bits = 4 if dtype == "F4" else 6
        codes = values.astype(PACKED_ELEMENTS[dtype]).view(np.uint8).astype(np.uint32)
        packed = _pack(codes & (2**bits - 1), bits)
        return packed.tobytes(), packed
    kind = SAFETENSORS[dtype]
    assert kind.array is not None
    target = np.dtype(kind.array)
    if dtype == "BOOL":
        array = values > 0
    elif dtype == "C64":
        array = (values + 1j * values[::-1]).astype(target)
    elif target.kind in "iu":
        info = np.iinfo(target)
        array = rng.integers(info.min, info.max, count, dtype=target, endpoint=True)
    elif dtype == "F8_E8M0":  # powers of two only
        array = np.abs(values).astype(target)
    else:
        array = values.astype(target)
    array = array.reshape(shape)
    return array.tobytes(), array


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack ``bits``-bit codes into bytes, little-endian, the first code in the lowest bits."""
    per_group = 8 // math.gcd(bits, 8)  # codes per whole number of bytes: 2 for F4, 4 for F6
    groups = codes.reshape(-1, per_group)
    word = np.zeros(len(groups), dtype=np.uint32)
    for i in range(per_group):
        word |= groups[:, i] << (bits * i)
    group_bytes = per_group * bits // 8
    return word.view(np.uint8).reshape(-1, 4)[:, :group_bytes].reshape(-1).copy()


def tensors_file(
    tensors: dict[str, tuple[str, list[int], bytes]],
    metadata: dict[str, str] | None = None,
    *,
    pad_before: str = "",
) -> bytes:
    """A safetensors file as the reference writer lays it out (tensors in the given order,
    the header padded with spaces to a multiple of 8 bytes); ``pad_before`` is JSON
    whitespace to put before the header's object, as writers that align the data do."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    data = bytearray()
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = entry(dtype, shape, len(data), len(data) + len(raw))
        data += raw
    text = pad_before + json.dumps(header, separators=(",", ":"))
    text += " " * (-len(text.encode()) % 8)
    return raw_file(text, bytes(data))
