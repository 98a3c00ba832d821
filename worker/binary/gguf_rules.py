"""GGUF's rules beyond its byte format: tensor sizes, alignment, layout (ggml types: ``dtypes``).

Stdlib only: the load child uses it too (through ``gguf``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from loadwarden.worker.binary.defect import LayoutDefect
from loadwarden.worker.binary.dtypes import GGML

#: ggml tensors have at most four dimensions (GGML_MAX_DIMS).
MAX_DIMS = 4
#: A metadata value longer than this is left out of reports.
MAX_METADATA_CHARS = 256
ALIGNMENT_KEY = "general.alignment"
_UINT32 = 4
_SHOW_CHARS = 80


class GGUFError(LayoutDefect):
    """A GGUF defect: ``code`` names it (stable), ``message`` says where and what."""


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor: its ggml type name, its shape in row-major (numpy) order, where it lies."""

    name: str
    dtype: str
    shape: list[int]
    offset: int
    nbytes: int
    parameters: int


def show(value: object) -> str:
    """``repr(value)``, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= _SHOW_CHARS else f"{text[: _SHOW_CHARS - 3]}..."


def align(offset: int, alignment: int) -> int:
    """``offset`` rounded up to a multiple of ``alignment``."""
    return offset + (-offset % alignment)


def tensor_size(name: str, dims: list[int], type_id: int, max_total: int) -> tuple[str, int, int]:
    """The ggml type name, element count and byte size of a tensor; its dims checked."""
    if type_id not in GGML:
        raise GGUFError("unknown_dtype", f"tensor {show(name)} has unknown ggml type {type_id}")
    kind = GGML[type_id]
    for dim in dims:
        if dim >= 2**63:  # ggml's ne is int64_t
            raise GGUFError("bad_shape", f"tensor {show(name)}: dimension {dim} is not below 2**63")
    if not dims and kind.block_elements > 1:  # ggml reads a rank-0 tensor as one element
        raise GGUFError(
            "bad_shape",
            f"tensor {show(name)}: {kind.name} packs {kind.block_elements} values per block; "
            "a rank-0 tensor holds one value",
        )
    if dims and dims[0] % kind.block_elements:
        raise GGUFError(
            "bad_shape",
            f"tensor {show(name)}: {kind.name} packs {kind.block_elements} values per block, "
            f"but its first dimension is {dims[0]}",
        )
    parameters = kind.count_within(dims, max_total)
    if parameters is None:
        raise GGUFError(
            "too_large",
            f"tensor {show(name)}: {kind.name} {dims[::-1]} is over the cap of {max_total} bytes",
        )
    nbytes = kind.nbytes(parameters)
    assert nbytes is not None  # the first dimension is a whole number of blocks
    return kind.name, parameters, nbytes


def check_alignment(vtype: int, value: object) -> int:
    """The alignment a ``general.alignment`` value declares: a power-of-two UINT32."""
    if vtype != _UINT32 or not isinstance(value, int) or value <= 0 or value & (value - 1):
        raise GGUFError(
            "bad_alignment",
            f"{ALIGNMENT_KEY} must be a power-of-two UINT32, not {show(value)} (type {vtype})",
        )
    return value


def metadata_text(value: object) -> str | None:
    """A scalar metadata value as report text, or None when it is not worth reporting."""
    if isinstance(value, bytes):
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float) and not math.isfinite(value):
        return None
    else:
        text = str(value)
    return text if len(text) <= MAX_METADATA_CHARS else None


def check_layout(
    tensors: list[TensorEntry], alignment: int, data_start: int, header_bytes: int, size: int
) -> None:
    """llama.cpp's rule: in file order, each tensor at the previous end rounded up to the
    alignment; the file ends with the last tensor (plus padding to the alignment)."""
    expected = 0
    for tensor in tensors:
        if tensor.offset % alignment:
            raise GGUFError(
                "bad_offsets",
                f"tensor {show(tensor.name)} at offset {tensor.offset} "
                f"is not aligned to {alignment} bytes",
            )
        if tensor.offset != expected:
            defect = "overlaps what comes before it" if tensor.offset < expected else "leaves a gap"
            raise GGUFError(
                "offsets_not_contiguous",
                f"tensor {show(tensor.name)} at offset {tensor.offset} {defect}: "
                f"the previous tensor ends, aligned, at {expected}",
            )
        expected = align(tensor.offset + tensor.nbytes, alignment)
    end = data_start + tensors[-1].offset + tensors[-1].nbytes if tensors else header_bytes
    if size < end:
        raise GGUFError(
            "data_size_mismatch",
            f"file is truncated: tensor data ends at byte {end}, the file has {size}",
        )
    if size > align(end, alignment):
        raise GGUFError(
            "data_size_mismatch",
            f"file has trailing bytes: tensor data ends at byte {end} "
            f"(padded: {align(end, alignment)}), the file has {size}",
        )
