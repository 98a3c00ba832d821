"""Strict, bounded check of a NumPy ``.npy`` header, in-process, without numpy.

numpy itself reads a declared header of up to 4 GiB before its own size check,
evaluates the header with ``ast.literal_eval`` whatever its length, and accepts
shape ``(-1,)``. Here the declared length is checked against the cap before the
header is read, the header must be one dict literal with exactly numpy's three
keys (no duplicates), ``descr`` comes from a whitelist of numeric dtypes, object
dtypes (which numpy unpickles) are refused, and the declared data must fill the
rest of the file exactly.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass

from loadwarden.producer.contract import ModelFormat, ModelSummary
from loadwarden.producer.errors import SourceRefused
from loadwarden.worker.binary.dtypes import NPY, ElementType
from loadwarden.worker.binary.magic import NPY as MAGIC
from loadwarden.worker.config import InspectionCaps
from loadwarden.worker.formats._common import (
    CONVERT_HINT,
    Cursor,
    invalid,
    pickle_protocol,
    refuse_pickle,
    show,
    summarize,
)

#: The one tensor of an ``.npy`` file is named this (the name must not depend on the path,
#: so the same bytes give the same manifest wherever they are stored).
TENSOR_NAME = "array"
_KEYS = frozenset({"descr", "fortran_order", "shape"})
_LENGTH_BYTES = {1: 2, 2: 4, 3: 4}  # size of the header-length field, by major version


Read = Callable[[int], bytes]


@dataclass(frozen=True, slots=True)
class NpyHeader:
    """A checked ``.npy`` header: the array it declares and where its data starts."""

    dtype: str
    shape: list[int]
    fortran_order: bool
    header_bytes: int
    data_bytes: int
    parameters: int


def inspect_npy(fd: int, file_size: int, caps: InspectionCaps) -> ModelSummary:
    """Check the ``.npy`` file open on ``fd``; raise ``InvalidModel`` or ``SourceRefused``."""
    header = parse_header(Cursor(fd).read, caps, "npy")
    data = file_size - header.header_bytes
    if data != header.data_bytes:
        defect = "is truncated" if data < header.data_bytes else "has trailing bytes"
        raise invalid(
            "npy",
            "data_size_mismatch",
            f"file {defect}: {header.dtype} {header.shape} needs {header.data_bytes} bytes "
            f"after the {header.header_bytes}-byte header, the file holds {data}",
        )
    return summarize(ModelFormat.NPY, [entry(TENSOR_NAME, header)], file_size)


def entry(name: str, header: NpyHeader) -> tuple[str, str, list[int], int, int]:
    """The summary entry of one checked array."""
    return (name, header.dtype, header.shape, header.data_bytes, header.parameters)


def parse_header(read: Read, caps: InspectionCaps, where: str) -> NpyHeader:
    """Read and check an ``.npy`` header from the sequential reader ``read``."""
    prefix = _read_exact(read, len(MAGIC) + 2, where, "file_too_small", "the magic and version")
    if prefix[: len(MAGIC)] != MAGIC:
        protocol = pickle_protocol(prefix, b"")  # only a PROTO header is told from 8 bytes
        if protocol is not None:
            raise refuse_pickle(where, protocol)
        raise invalid(where, "bad_magic", f"starts with {prefix!r}, not the .npy magic")
    version = (prefix[6], prefix[7])
    if version[1] != 0 or version[0] not in _LENGTH_BYTES:
        raise invalid(where, "unsupported_version", f"format version {version[0]}.{version[1]}")
    width = _LENGTH_BYTES[version[0]]
    length = int.from_bytes(
        _read_exact(read, width, where, "file_too_small", "the header length"), "little"
    )
    if length > caps.max_npy_header_bytes:
        raise invalid(
            where,
            "header_too_large",
            f"header length {length} is over the cap of {caps.max_npy_header_bytes}",
        )
    raw = _read_exact(read, length, where, "header_beyond_file", f"the {length}-byte header")
    fields = _literal_dict(_decode(raw, version[0], where), where)
    kind = _check_descr(fields["descr"], where)
    if not isinstance(fields["fortran_order"], bool):
        raise invalid(
            where, "bad_header", f"fortran_order {show(fields['fortran_order'])} is not a bool"
        )
    shape = _check_shape(fields["shape"], caps, where)
    parameters = _count(shape, kind, caps, where)
    return NpyHeader(
        dtype=kind.name,
        shape=shape,
        fortran_order=fields["fortran_order"],
        header_bytes=len(prefix) + width + length,
        data_bytes=parameters * kind.block_bytes,
        parameters=parameters,
    )


def _read_exact(read: Read, count: int, where: str, code: str, what: str) -> bytes:
    chunks: list[bytes] = []
    done = 0
    while done < count:
        chunk = read(count - done)
        if not chunk:
            raise invalid(where, code, f"the file ends {done} bytes into {what}")
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)


def _decode(raw: bytes, major: int, where: str) -> str:
    # Versions 1 and 2 are latin-1 by the spec and ASCII in practice; 3 is UTF-8.
    encoding = "utf-8" if major == 3 else "ascii"
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise invalid(
            where,
            "bad_header",
            f"header is not {encoding.upper()}: {exc.reason} at byte {exc.start}",
        ) from exc


def _literal_dict(text: str, where: str) -> dict[str, object]:
    """Parse the header as one dict literal: never ``eval``, duplicates refused."""
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        reason = exc.msg if isinstance(exc, SyntaxError) else type(exc).__name__
        raise invalid(where, "bad_header", f"header is not a Python literal ({reason})") from exc
    if not isinstance(node, ast.Dict):
        raise invalid(where, "bad_header", f"header is a {type(node).__name__}, not a dict")
    keys: list[str] = []
    for key in node.keys:
        if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
            raise invalid(where, "bad_header", "header keys must be string literals")
        if key.value in keys:
            raise invalid(where, "duplicate_key", f"key {show(key.value)} appears twice")
        keys.append(key.value)
    if set(keys) != _KEYS:
        raise invalid(where, "bad_header", f"header keys are {sorted(keys)}, not {sorted(_KEYS)}")
    try:
        value = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError) as exc:
        raise invalid(where, "bad_header", "header holds something other than literals") from exc
    return dict(value)


def _holds_object(descr: object, depth: int = 0) -> bool:
    """Whether a descr (a string, or a structured list of fields) has an object dtype."""
    if depth > 32:
        return True  # nobody nests dtypes this deep; treat it as the worst case
    if isinstance(descr, str):
        return descr.lstrip("<>|=").startswith("O")
    if isinstance(descr, list):
        return any(
            isinstance(f, tuple) and len(f) >= 2 and _holds_object(f[1], depth + 1) for f in descr
        )
    if isinstance(descr, tuple) and descr:  # a sub-array: (dtype, shape)
        return _holds_object(descr[0], depth + 1)
    return False


def _check_descr(descr: object, where: str) -> ElementType:
    if isinstance(descr, str) and descr in NPY:
        return NPY[descr]
    if _holds_object(descr):
        raise SourceRefused(
            f"{where}: holds a NumPy object array (descr {show(descr)}): loading it unpickles "
            f"every element, which runs arbitrary code; {CONVERT_HINT}",
            code="object_array",
        )
    kind = "structured dtypes are" if isinstance(descr, list) else f"descr {show(descr)} is"
    raise invalid(where, "unknown_dtype", f"{kind} not supported (numeric and bool dtypes only)")


def _check_shape(shape: object, caps: InspectionCaps, where: str) -> list[int]:
    if not isinstance(shape, tuple):
        raise invalid(where, "bad_shape", f"shape {show(shape)} is not a tuple")
    if len(shape) > caps.max_rank:
        raise invalid(
            where, "rank_too_large", f"rank {len(shape)} is over the cap of {caps.max_rank}"
        )
    for dim in shape:
        # numpy's dimensions are intp: (2**63, 0) declares no data yet cannot be built.
        if not (isinstance(dim, int) and not isinstance(dim, bool) and 0 <= dim < 2**63):
            raise invalid(
                where, "bad_shape", f"dimension {show(dim)} is not an integer in [0, 2**63)"
            )
    return list(shape)


def _count(shape: list[int], kind: ElementType, caps: InspectionCaps, where: str) -> int:
    count = kind.count_within(shape, caps.max_total_bytes)
    if count is None:
        raise invalid(
            where,
            "too_large",
            f"shape {show(tuple(shape))} is over the cap of {caps.max_total_bytes} bytes",
        )
    return count
