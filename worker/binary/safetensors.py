"""A strict, bounded reader of a safetensors header (stdlib only: the load child uses it too).

It accepts what the reference reader accepts (``SafeTensors::read_metadata`` and
``Metadata::validate`` in safetensors' ``tensor.rs``) and refuses more: the header
is strict UTF-8 JSON, padded by JSON whitespace at either end at most (serde_json
skips exactly space, tab, LF and CR; anything else, NUL included, is refused);
every tensor's dtype, shape and offsets are checked; the tensors, sorted by
offset, must tile the data exactly; an element count times the dtype's bit width
must be whole bytes (F4: an even count, F6: a multiple of 4). Beyond the
reference: duplicate keys (it keeps the last), unknown fields, a BOM, unpaired
surrogate escapes, non-finite numbers, and anything over the caps are refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from loadwarden.worker.binary.defect import LayoutDefect
from loadwarden.worker.binary.dtypes import SAFETENSORS, ElementType
from loadwarden.worker.binary.strict_json import json_type, parse_object, show

PREFIX_BYTES = 8
_MIN_HEADER_BYTES = 2  # "{}"
_MAX_NAME_CHARS = 1024
_TENSOR_FIELDS = frozenset({"dtype", "shape", "data_offsets"})
_METADATA_KEY = "__metadata__"
#: JSON's whitespace (RFC 8259), all serde_json (and ``json``) skip around a value.
JSON_WHITESPACE = " \t\n\r"
# The Rust loader reads shapes and offsets as u64; this also keeps every number in a message short.
_COUNT_LIMIT = 2**64
# numpy's dimensions are intp: a zero-size tensor with a dimension of 2**63 passes the Rust
# check (its element count is 0) and then fails in numpy.
_DIM_LIMIT = 2**63


class SafetensorsError(LayoutDefect):
    """A safetensors defect: ``code`` names it (stable), ``message`` says where and what."""


@dataclass(frozen=True, slots=True)
class Caps:
    """What a safetensors header may declare; exceeding any is a defect."""

    max_header_bytes: int
    max_tensors: int
    max_metadata_entries: int
    max_rank: int
    max_total_bytes: int

    @classmethod
    def within(cls, file_size: int) -> Caps:
        """Caps bounded only by the file itself (the child re-reads an inspected file)."""
        n = max(file_size, 1)
        return cls(n, n, n, n, n)


@dataclass(frozen=True, slots=True)
class Tensor:
    """One checked tensor; ``begin`` and ``end`` are offsets into the data section."""

    name: str
    dtype: ElementType
    shape: list[int]
    begin: int
    end: int
    parameters: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True, slots=True)
class Layout:
    """A checked header: tensors sorted by offset, the data section's absolute start."""

    header_bytes: int
    data_offset: int
    tensors: list[Tensor]
    metadata: dict[str, str] = field(default_factory=dict)


def read_layout(fd: int, file_size: int, caps: Caps) -> Layout:
    """Check the header of the safetensors file on ``fd``; raise ``SafetensorsError`` if bad.

    Read errors propagate as ``OSError``.
    """
    header_bytes = _read_length(fd, file_size, caps)
    data_offset = PREFIX_BYTES + header_bytes
    header = _parse(_read_exact(fd, header_bytes, PREFIX_BYTES))
    metadata = _check_metadata(header.pop(_METADATA_KEY, {}), caps)
    if len(header) > caps.max_tensors:
        raise SafetensorsError(
            "too_many_tensors", f"{len(header)} tensors, over the cap of {caps.max_tensors}"
        )
    tensors = _check_tensors(header, caps)
    _check_layout(tensors, file_size - data_offset)
    return Layout(header_bytes, data_offset, tensors, metadata)


def read_within(fd: int, file_size: int) -> Layout:
    """``read_layout`` bounded only by the file (the child re-reads an inspected file)."""
    return read_layout(fd, file_size, Caps.within(file_size))


def _read_length(fd: int, file_size: int, caps: Caps) -> int:
    if file_size < PREFIX_BYTES:
        raise SafetensorsError(
            "file_too_small", f"file of {file_size} bytes has no 8-byte header length"
        )
    n = int.from_bytes(_read_exact(fd, PREFIX_BYTES, 0), "little")
    if n < _MIN_HEADER_BYTES:
        raise SafetensorsError(
            "file_too_small", f"header length {n} is too small to hold a JSON object"
        )
    if n > caps.max_header_bytes:
        raise SafetensorsError(
            "header_too_large", f"header length {n} is over the cap of {caps.max_header_bytes}"
        )
    if PREFIX_BYTES + n > file_size:
        raise SafetensorsError(
            "header_beyond_file",
            f"header length {n} runs past the end of a {file_size}-byte file",
        )
    return n


def _read_exact(fd: int, count: int, offset: int) -> bytes:
    chunks: list[bytes] = []
    done = 0
    while done < count:
        chunk = os.pread(fd, count - done, offset + done)
        if not chunk:  # the file shrank since its size was taken
            raise SafetensorsError(
                "header_beyond_file", f"file ends at byte {offset + done} in the header"
            )
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)


def _parse(raw: bytes) -> dict[str, Any]:
    # Only JSON whitespace may precede the object (writers pad to align the data).
    return parse_object(raw, SafetensorsError, "header", padding=JSON_WHITESPACE)


def _check_metadata(value: object, caps: Caps) -> dict[str, str]:
    if not isinstance(value, dict):
        raise SafetensorsError("bad_metadata", f"__metadata__ is {json_type(value)}, not an object")
    if len(value) > caps.max_metadata_entries:
        raise SafetensorsError(
            "bad_metadata",
            f"__metadata__ has {len(value)} entries, over the cap of {caps.max_metadata_entries}",
        )
    for key, item in value.items():
        if not isinstance(item, str):
            raise SafetensorsError(
                "bad_metadata", f"__metadata__[{show(key)}] is {json_type(item)}, not a string"
            )
    return dict(value)


def _check_tensors(header: dict[str, Any], caps: Caps) -> list[Tensor]:
    tensors: list[Tensor] = []
    total = 0
    for name, entry in header.items():
        tensor = _check_tensor(name, entry, caps)
        total += tensor.nbytes
        if total > caps.max_total_bytes:
            raise SafetensorsError(
                "too_large",
                f"tensors through {show(name)} hold {total} bytes, "
                f"over the cap of {caps.max_total_bytes}",
            )
        tensors.append(tensor)
    return tensors


def _check_tensor(name: str, entry: object, caps: Caps) -> Tensor:
    if not 0 < len(name) <= _MAX_NAME_CHARS:
        raise SafetensorsError(
            "bad_tensor_entry",
            f"tensor name {show(name)} has {len(name)} characters (1-{_MAX_NAME_CHARS})",
        )
    if not isinstance(entry, dict):
        raise SafetensorsError(
            "bad_tensor_entry", f"tensor {show(name)} is {json_type(entry)}, not an object"
        )
    if missing := sorted(_TENSOR_FIELDS - entry.keys()):
        raise SafetensorsError(
            "bad_tensor_entry", f"tensor {show(name)} has no {', '.join(missing)}"
        )
    if unknown := sorted(entry.keys() - _TENSOR_FIELDS):
        raise SafetensorsError(
            "bad_tensor_entry", f"tensor {show(name)} has unknown fields {unknown}"
        )
    dtype = _check_dtype(name, entry["dtype"])
    shape = _check_shape(name, entry["shape"], caps)
    parameters = dtype.count_within(shape, caps.max_total_bytes)
    if parameters is None:
        raise SafetensorsError(
            "too_large",
            f"tensor {show(name)}: shape {shape} is over the cap of {caps.max_total_bytes} bytes",
        )
    nbytes = dtype.nbytes(parameters)
    if nbytes is None:  # the reference's MisalignedSlice
        raise SafetensorsError(
            "not_whole_bytes",
            f"tensor {show(name)}: {parameters} {dtype.name} elements (shape {shape}) do not "
            f"fill whole bytes; {dtype.name} packs {dtype.describe_block()}",
        )
    begin, end = _check_offsets(name, entry["data_offsets"])
    if end - begin != nbytes:
        raise SafetensorsError(
            "size_mismatch",
            f"tensor {show(name)}: {dtype.name} {shape} needs {nbytes} bytes, "
            f"data_offsets [{begin}, {end}] span {end - begin}",
        )
    return Tensor(name, dtype, shape, begin, end, parameters)


def _check_dtype(name: str, dtype: object) -> ElementType:
    if isinstance(dtype, str) and dtype in SAFETENSORS:
        return SAFETENSORS[dtype]
    raise SafetensorsError(
        "unknown_dtype", f"tensor {show(name)}: dtype {show(dtype)} is not a safetensors dtype"
    )


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _COUNT_LIMIT


def _check_shape(name: str, shape: object, caps: Caps) -> list[int]:
    if not isinstance(shape, list):
        raise SafetensorsError(
            "bad_shape", f"tensor {show(name)}: shape {show(shape)} is not a list"
        )
    if len(shape) > caps.max_rank:
        raise SafetensorsError(
            "rank_too_large",
            f"tensor {show(name)} has rank {len(shape)}, over the cap of {caps.max_rank}",
        )
    for dim in shape:
        if not (_is_count(dim) and dim < _DIM_LIMIT):
            raise SafetensorsError(
                "bad_shape",
                f"tensor {show(name)}: dimension {show(dim)} is not an integer in [0, 2**63)",
            )
    return shape


def _check_offsets(name: str, offsets: object) -> tuple[int, int]:
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise SafetensorsError(
            "bad_offsets",
            f"tensor {show(name)}: data_offsets {show(offsets)} is not two integers in [0, 2**64)",
        )
    begin, end = offsets
    if begin > end:
        raise SafetensorsError(
            "bad_offsets", f"tensor {show(name)}: data_offsets begin {begin} > end {end}"
        )
    return begin, end


def _check_layout(tensors: list[Tensor], data_bytes: int) -> None:
    # Ties between zero-size tensors are broken by name so the order is deterministic.
    tensors.sort(key=lambda t: (t.begin, t.end, t.name))
    expected, previous = 0, ""
    for tensor in tensors:
        if tensor.begin < expected:
            raise SafetensorsError(
                "offsets_not_contiguous",
                f"tensor {show(tensor.name)} at data_offsets [{tensor.begin}, {tensor.end}] "
                f"overlaps {previous}, which ends at byte {expected}",
            )
        if tensor.begin > expected:
            after = f"{previous} (ends at byte {expected})" if previous else "the start of the data"
            raise SafetensorsError(
                "offsets_not_contiguous",
                f"{tensor.begin - expected}-byte gap between {after} "
                f"and tensor {show(tensor.name)} (starts at byte {tensor.begin})",
            )
        expected, previous = tensor.end, f"tensor {show(tensor.name)}"
    if expected != data_bytes:
        defect = "is truncated" if expected > data_bytes else "has trailing bytes"
        raise SafetensorsError(
            "data_size_mismatch",
            f"file {defect}: tensors end at data byte {expected}, the data holds {data_bytes}",
        )
