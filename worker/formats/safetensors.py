"""Strict, bounded check of a safetensors header, in-process, without the safetensors library."""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from loadwarden.producer.contract import ModelFormat, ModelSummary, TensorInfo
from loadwarden.producer.errors import InvalidModel, SourceUnavailable
from loadwarden.producer.settings import InspectionCaps
from loadwarden.worker.formats._common import element_count

#: Dtypes ``safetensors.numpy`` can load, with their item size in bytes.
NUMPY_DTYPE_BYTES: dict[str, int] = {
    **dict.fromkeys(("F64", "I64", "U64", "C64"), 8),
    **dict.fromkeys(("F32", "I32", "U32"), 4),
    **dict.fromkeys(("F16", "I16", "U16"), 2),
    **dict.fromkeys(("I8", "U8", "BOOL"), 1),
}
# Valid in safetensors 0.8, but the numpy loader has no array type for them.
_OTHER_SAFETENSORS_DTYPES = frozenset(
    {"BF16", "F4", "F6_E2M3", "F6_E3M2", "F8_E4M3", "F8_E5M2", "F8_E8M0"}
    | {"F8_E4M3FNUZ", "F8_E5M2FNUZ"}
)
_PREFIX_BYTES = 8
_MIN_HEADER_BYTES = 2  # "{}"
_MAX_NAME_CHARS = 1024
_TENSOR_FIELDS = frozenset({"dtype", "shape", "data_offsets"})
_METADATA_KEY = "__metadata__"
_UTF8_BOM = b"\xef\xbb\xbf"
# A \uD800-\uDFFF escape: only then can the parsed header hold an unpaired surrogate.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
# The Rust loader reads shapes and offsets as u64; this also keeps every number in a message short.
_COUNT_LIMIT = 2**64
# numpy's dimensions are intp: a zero-size tensor with a dimension of 2**63 passes the Rust
# check (its element count is 0) and then fails in numpy.
_DIM_LIMIT = 2**63
# Values quoted from a hostile header are cut so a message stays readable and small.
_SHOW_CHARS = 80


@dataclass(frozen=True, slots=True)
class SafetensorsHeader:
    """A checked safetensors header: the model it describes and where its data starts."""

    summary: ModelSummary
    header_bytes: int
    data_offset: int


@dataclass(frozen=True, slots=True)
class _Tensor:
    name: str
    dtype: str
    shape: list[int]
    begin: int
    end: int
    parameters: int


def inspect_safetensors(fd: int, file_size: int, caps: InspectionCaps) -> SafetensorsHeader:
    """Check the header of the safetensors file open on ``fd``; raise ``InvalidModel`` if bad."""
    header_bytes = _read_length(fd, file_size, caps)
    data_offset = _PREFIX_BYTES + header_bytes
    header = _parse(_read_exact(fd, header_bytes, _PREFIX_BYTES))
    metadata = _check_metadata(header.pop(_METADATA_KEY, {}), caps)
    if len(header) > caps.max_tensors:
        raise _invalid(
            "too_many_tensors", f"{len(header)} tensors, over the cap of {caps.max_tensors}"
        )
    tensors = _check_tensors(header, caps)
    _check_layout(tensors, file_size - data_offset)
    return SafetensorsHeader(_summarize(tensors, metadata, file_size), header_bytes, data_offset)


def _invalid(code: str, message: str) -> InvalidModel:
    return InvalidModel(f"safetensors: {message}", code=code)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _SHOW_CHARS else f"{text[: _SHOW_CHARS - 3]}..."


def _read_length(fd: int, file_size: int, caps: InspectionCaps) -> int:
    if file_size < _PREFIX_BYTES:
        raise _invalid("file_too_small", f"file of {file_size} bytes has no 8-byte header length")
    n = int.from_bytes(_read_exact(fd, _PREFIX_BYTES, 0), "little")
    if n < _MIN_HEADER_BYTES:
        raise _invalid("file_too_small", f"header length {n} is too small to hold a JSON object")
    if n > caps.max_header_bytes:
        raise _invalid(
            "header_too_large", f"header length {n} is over the cap of {caps.max_header_bytes}"
        )
    if _PREFIX_BYTES + n > file_size:
        raise _invalid(
            "header_beyond_file",
            f"header length {n} runs past the end of a {file_size}-byte file",
        )
    return n


def _read_exact(fd: int, count: int, offset: int) -> bytes:
    chunks: list[bytes] = []
    done = 0
    while done < count:
        try:
            chunk = os.pread(fd, count - done, offset + done)
        except OSError as exc:
            raise SourceUnavailable(f"read failed: {exc.strerror}", code="unreadable") from exc
        if not chunk:  # the file shrank since its size was taken
            raise _invalid("header_beyond_file", f"file ends at byte {offset + done} in the header")
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)


def _parse(raw: bytes) -> dict[str, Any]:
    if raw.startswith(_UTF8_BOM):
        raise _invalid("header_not_utf8", "header starts with a UTF-8 byte order mark")
    try:
        text = raw.decode("utf-8")  # strict: json.loads on bytes would also accept UTF-16
    except UnicodeDecodeError as exc:
        raise _invalid(
            "header_not_utf8", f"header is not UTF-8: {exc.reason} at byte {exc.start}"
        ) from exc
    if not text.startswith("{"):
        raise _invalid("header_not_object", f"header must start with '{{', not {text[:1]!r}")
    value = _load_json(text)
    if _SURROGATE_ESCAPE.search(text):
        _require_unicode(value)
    return value


def _load_json(text: str) -> dict[str, Any]:
    try:
        value = json.loads(
            text,
            object_pairs_hook=_unique_object,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
            parse_int=_serde_int,
        )
    except RecursionError as exc:
        raise _invalid("header_not_json", "header JSON is nested too deeply") from exc
    except json.JSONDecodeError as exc:
        raise _invalid("header_not_json", f"header is not valid JSON: {exc}") from exc
    except ValueError as exc:  # int() refuses more digits than sys.get_int_max_str_digits()
        raise _invalid("header_not_json", "header holds an integer with too many digits") from exc
    if not isinstance(value, dict):
        raise _invalid("header_not_object", f"header is {_json_type(value)}, not an object")
    return value


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        key = next(key for key, count in Counter(key for key, _ in pairs).items() if count > 1)
        raise _invalid("duplicate_key", f"key {_show(key)} appears twice in one object")
    return result


def _require_unicode(value: dict[str, Any]) -> None:
    # "\ud800" is valid JSON syntax but not Unicode text; the Rust loader rejects it.
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except RecursionError as exc:
        raise _invalid("header_not_json", "header JSON is nested too deeply") from exc
    except UnicodeEncodeError as exc:
        near = exc.object[max(0, exc.start - 30) : exc.end + 30]
        raise _invalid(
            "header_not_utf8", f"header holds an unpaired surrogate escape in {near!r}"
        ) from exc


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    kinds = ((bool, "a boolean"), (str, "a string"), (list, "an array"), (dict, "an object"))
    return next((label for kind, label in kinds if isinstance(value, kind)), "a number")


def _reject_constant(name: str) -> Any:
    raise _invalid("non_finite_number", f"header holds the non-finite number {name}")


def _serde_int(text: str) -> int | float:
    # serde_json reads "-0" as the float -0.0, which no shape or offset (u64) accepts.
    return -0.0 if text == "-0" else int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _invalid("non_finite_number", f"number {text[:40]} overflows to {value}")
    return value


def _check_metadata(value: object, caps: InspectionCaps) -> dict[str, str]:
    if not isinstance(value, dict):
        raise _invalid("bad_metadata", f"__metadata__ is {_json_type(value)}, not an object")
    if len(value) > caps.max_metadata_entries:
        raise _invalid(
            "bad_metadata",
            f"__metadata__ has {len(value)} entries, over the cap of {caps.max_metadata_entries}",
        )
    for key, item in value.items():
        if not isinstance(item, str):
            raise _invalid(
                "bad_metadata", f"__metadata__[{_show(key)}] is {_json_type(item)}, not a string"
            )
    return dict(value)


def _check_tensors(header: dict[str, Any], caps: InspectionCaps) -> list[_Tensor]:
    tensors: list[_Tensor] = []
    total = 0
    for name, entry in header.items():
        tensor = _check_tensor(name, entry, caps)
        total += tensor.end - tensor.begin
        if total > caps.max_total_bytes:
            raise _invalid(
                "too_large",
                f"tensors through {_show(name)} hold {total} bytes, "
                f"over the cap of {caps.max_total_bytes}",
            )
        tensors.append(tensor)
    return tensors


def _check_tensor(name: str, entry: object, caps: InspectionCaps) -> _Tensor:
    if not 0 < len(name) <= _MAX_NAME_CHARS:
        raise _invalid(
            "bad_tensor_entry",
            f"tensor name {_show(name)} has {len(name)} characters (1-{_MAX_NAME_CHARS})",
        )
    if not isinstance(entry, dict):
        raise _invalid(
            "bad_tensor_entry", f"tensor {_show(name)} is {_json_type(entry)}, not an object"
        )
    if missing := sorted(_TENSOR_FIELDS - entry.keys()):
        raise _invalid("bad_tensor_entry", f"tensor {_show(name)} has no {', '.join(missing)}")
    if unknown := sorted(entry.keys() - _TENSOR_FIELDS):
        raise _invalid("bad_tensor_entry", f"tensor {_show(name)} has unknown fields {unknown}")
    itemsize = _check_dtype(name, entry["dtype"])
    shape = _check_shape(name, entry["shape"], caps)
    parameters = _count(name, shape, itemsize, caps)
    begin, end = _check_offsets(name, entry["data_offsets"])
    if end - begin != parameters * itemsize:
        raise _invalid(
            "size_mismatch",
            f"tensor {_show(name)}: {entry['dtype']} {shape} needs {parameters * itemsize} bytes, "
            f"data_offsets [{begin}, {end}] span {end - begin}",
        )
    return _Tensor(name, entry["dtype"], shape, begin, end, parameters)


def _check_dtype(name: str, dtype: object) -> int:
    if isinstance(dtype, str) and dtype in NUMPY_DTYPE_BYTES:
        return NUMPY_DTYPE_BYTES[dtype]
    if isinstance(dtype, str) and dtype in _OTHER_SAFETENSORS_DTYPES:
        reason = "is valid safetensors but not loadable by the numpy loader"
    else:
        reason = "is not a safetensors dtype"
    raise _invalid("unknown_dtype", f"tensor {_show(name)}: dtype {_show(dtype)} {reason}")


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _COUNT_LIMIT


def _check_shape(name: str, shape: object, caps: InspectionCaps) -> list[int]:
    if not isinstance(shape, list):
        raise _invalid("bad_shape", f"tensor {_show(name)}: shape {_show(shape)} is not a list")
    if len(shape) > caps.max_rank:
        raise _invalid(
            "rank_too_large",
            f"tensor {_show(name)} has rank {len(shape)}, over the cap of {caps.max_rank}",
        )
    for dim in shape:
        if not (_is_count(dim) and dim < _DIM_LIMIT):
            raise _invalid(
                "bad_shape",
                f"tensor {_show(name)}: dimension {_show(dim)} is not an integer in [0, 2**63)",
            )
    return shape


def _count(name: str, shape: list[int], itemsize: int, caps: InspectionCaps) -> int:
    count = element_count(shape, itemsize, caps.max_total_bytes)
    if count is None:
        raise _invalid(
            "too_large",
            f"tensor {_show(name)}: shape {shape} is over the cap of {caps.max_total_bytes} bytes",
        )
    return count


def _check_offsets(name: str, offsets: object) -> tuple[int, int]:
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise _invalid(
            "bad_offsets",
            f"tensor {_show(name)}: data_offsets {_show(offsets)} "
            "is not two integers in [0, 2**64)",
        )
    begin, end = offsets
    if begin > end:
        raise _invalid(
            "bad_offsets", f"tensor {_show(name)}: data_offsets begin {begin} > end {end}"
        )
    return begin, end


def _check_layout(tensors: list[_Tensor], data_bytes: int) -> None:
    # Ties between zero-size tensors are broken by name so the order is deterministic.
    tensors.sort(key=lambda t: (t.begin, t.end, t.name))
    expected, previous = 0, ""
    for tensor in tensors:
        if tensor.begin < expected:
            raise _invalid(
                "offsets_not_contiguous",
                f"tensor {_show(tensor.name)} at data_offsets [{tensor.begin}, {tensor.end}] "
                f"overlaps {previous}, which ends at byte {expected}",
            )
        if tensor.begin > expected:
            after = f"{previous} (ends at byte {expected})" if previous else "the start of the data"
            raise _invalid(
                "offsets_not_contiguous",
                f"{tensor.begin - expected}-byte gap between {after} "
                f"and tensor {_show(tensor.name)} (starts at byte {tensor.begin})",
            )
        expected, previous = tensor.end, f"tensor {_show(tensor.name)}"
    if expected != data_bytes:
        defect = "is truncated" if expected > data_bytes else "has trailing bytes"
        raise _invalid(
            "data_size_mismatch",
            f"file {defect}: tensors end at data byte {expected}, the data holds {data_bytes}",
        )


def _summarize(
    tensors: Iterable[_Tensor], metadata: dict[str, str], file_size: int
) -> ModelSummary:
    infos: list[TensorInfo] = []
    dtypes: dict[str, int] = {}
    for t in tensors:
        infos.append(TensorInfo(name=t.name, dtype=t.dtype, shape=t.shape, bytes=t.end - t.begin))
        dtypes[t.dtype] = dtypes.get(t.dtype, 0) + t.parameters
    return ModelSummary(
        format=ModelFormat.SAFETENSORS,
        file_bytes=file_size,
        bytes=sum(info.bytes for info in infos),
        parameters=sum(dtypes.values()),
        dtypes=dict(sorted(dtypes.items())),
        tensors=infos,
        metadata=metadata,
    )
