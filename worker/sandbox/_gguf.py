"""A strict, bounded reader of a GGUF file's layout (stdlib only: the load child uses it too).

Versions 2 and 3, little-endian. Every count and length is checked against a cap
and against the file's real size before anything is read or allocated for it,
so a 53-byte file that declares a 2^62-element array fails at once (the released
``gguf`` reader hangs on it) and nesting cannot reach Python's recursion limit.
Tensor offsets must follow llama.cpp's own rule: in file order, each at the
previous end rounded up to ``general.alignment`` (a power of two, default 32).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

from loadwarden.worker.sandbox._pread import pread_into

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
#: ggml tensors have at most four dimensions (GGML_MAX_DIMS).
MAX_DIMS = 4
#: Longest tensor name we accept (ggml's own is 64; converters stay well under 1024).
MAX_NAME_BYTES = 1024
#: A metadata value longer than this is left out of reports.
MAX_METADATA_CHARS = 256
ALIGNMENT_KEY = "general.alignment"

#: ggml type id -> (name, elements per block, bytes per block), as in ggml.h / gguf-py.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}

# Value types of the key/value section.
_STRING, _ARRAY, _BOOL, _UINT32 = 8, 9, 7, 4
_SCALARS: dict[int, struct.Struct] = {
    0: struct.Struct("<B"),
    1: struct.Struct("<b"),
    2: struct.Struct("<H"),
    3: struct.Struct("<h"),
    4: struct.Struct("<I"),
    5: struct.Struct("<i"),
    6: struct.Struct("<f"),
    7: struct.Struct("<B"),
    10: struct.Struct("<Q"),
    11: struct.Struct("<q"),
    12: struct.Struct("<d"),
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_FIXED_PREFIX = 24  # magic, version, tensor count, key/value count
_FIRST_READ = 64 * 1024
_SHOW_CHARS = 80


class GGUFError(Exception):
    """A GGUF defect: ``code`` names it (stable), ``message`` says where and what."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Caps:
    """What a GGUF header may declare; exceeding any is a defect, found before any read."""

    max_header_bytes: int
    max_tensors: int
    max_keys: int
    max_string_bytes: int
    max_array_elements: int
    max_nesting: int
    max_rank: int
    max_total_bytes: int
    max_metadata_entries: int = 0

    @classmethod
    def within(cls, file_size: int) -> Caps:
        """Caps bounded only by the file itself (the child re-reads an inspected file)."""
        n = max(file_size, 1)
        return cls(n, n, n, n, n, 32, MAX_DIMS, n)


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor: its ggml type name, its shape in row-major (numpy) order, where it lies."""

    name: str
    dtype: str
    shape: list[int]
    offset: int
    nbytes: int
    parameters: int


@dataclass(frozen=True, slots=True)
class Layout:
    """A checked GGUF layout: tensors in file order; ``data_start`` is absolute."""

    version: int
    alignment: int
    header_bytes: int
    data_start: int
    tensors: list[TensorEntry]
    metadata: dict[str, str] = field(default_factory=dict)


def read_layout(fd: int, file_size: int, caps: Caps) -> Layout:
    """Read and check the header of the GGUF file on ``fd``; raise ``GGUFError`` if bad."""
    if file_size < _FIXED_PREFIX:
        raise GGUFError("file_too_small", f"file of {file_size} bytes has no GGUF header")
    reader = _Reader(fd, file_size, caps)
    version, tensor_count, key_count = reader.prefix()
    metadata, alignment = reader.key_values(key_count)
    names: set[str] = set()
    tensors = [reader.tensor_info(names) for _ in range(tensor_count)]
    total = sum(t.nbytes for t in tensors)
    if total > caps.max_total_bytes:
        raise GGUFError(
            "too_large", f"tensors hold {total} bytes, over the cap of {caps.max_total_bytes}"
        )
    header_bytes = reader.pos
    data_start = _align(header_bytes, alignment)
    _check_layout(tensors, alignment, data_start, header_bytes, file_size)
    return Layout(version, alignment, header_bytes, data_start, tensors, metadata)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _SHOW_CHARS else f"{text[: _SHOW_CHARS - 3]}..."


def _align(offset: int, alignment: int) -> int:
    return offset + (-offset % alignment)


class _Reader:
    """Reads the header through a buffer that grows on demand, never past the caps or the file."""

    def __init__(self, fd: int, file_size: int, caps: Caps) -> None:
        self.fd = fd
        self.file_size = file_size
        self.caps = caps
        self.buf = bytearray()
        self.pos = 0
        self.keys = 0

    def _need(self, count: int, what: str) -> None:
        end = self.pos + count
        if end <= len(self.buf):
            return
        if end > self.caps.max_header_bytes:
            raise GGUFError(
                "header_too_large",
                f"{what} ends at byte {end}, past the header cap of {self.caps.max_header_bytes}",
            )
        if end > self.file_size:
            raise GGUFError(
                "header_beyond_file",
                f"{what} ends at byte {end}, past the end of a {self.file_size}-byte file",
            )
        want = min(max(end, 2 * len(self.buf), _FIRST_READ), self.caps.max_header_bytes)
        want = min(want, self.file_size)
        chunk = bytearray(want - len(self.buf))
        got = pread_into(self.fd, memoryview(chunk), len(self.buf))
        self.buf += chunk[:got]
        if end > len(self.buf):  # the file shrank since its size was taken
            raise GGUFError("header_beyond_file", f"the file ends at byte {len(self.buf)}")

    def _unpack(self, fmt: struct.Struct, what: str) -> int:
        self._need(fmt.size, what)
        (value,) = fmt.unpack_from(self.buf, self.pos)
        self.pos += fmt.size
        return int(value)

    def u32(self, what: str) -> int:
        return self._unpack(_U32, what)

    def u64(self, what: str) -> int:
        return self._unpack(_U64, what)

    def skip(self, count: int, what: str) -> None:
        self._need(count, what)
        self.pos += count

    def raw_string(self, what: str) -> bytes:
        length = self.u64(f"the length of {what}")
        if length > self.caps.max_string_bytes:
            raise GGUFError(
                "string_too_long",
                f"{what} declares {length} bytes, over the cap of {self.caps.max_string_bytes}",
            )
        self._need(length, what)
        value = bytes(self.buf[self.pos : self.pos + length])
        self.pos += length
        return value

    def text(self, what: str) -> str:
        raw = self.raw_string(what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GGUFError(
                "header_not_utf8", f"{what} is not UTF-8: {exc.reason} at byte {exc.start}"
            ) from exc

    def prefix(self) -> tuple[int, int, int]:
        self._need(_FIXED_PREFIX, "the fixed header")
        if self.buf[:4] != MAGIC:
            raise GGUFError("bad_magic", f"file starts with {bytes(self.buf[:4])!r}, not b'GGUF'")
        self.pos = 4
        version = self.u32("the version")
        if version not in (2, 3):
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            detail = (
                "big-endian GGUF is not supported"
                if swapped in (2, 3)
                else "only versions 2 and 3 are supported"
            )
            raise GGUFError("unsupported_version", f"version {version}: {detail}")
        tensors = self.u64("the tensor count")
        if tensors > self.caps.max_tensors:
            raise GGUFError(
                "too_many_tensors",
                f"{tensors} tensors, over the cap of {self.caps.max_tensors}",
            )
        keys = self.u64("the key/value count")
        if keys > self.caps.max_keys:
            raise GGUFError(
                "too_many_keys", f"{keys} key/value pairs, over the cap of {self.caps.max_keys}"
            )
        return version, tensors, keys

    def key_values(self, count: int) -> tuple[dict[str, str], int]:
        metadata: dict[str, str] = {}
        seen: set[str] = set()
        alignment = DEFAULT_ALIGNMENT
        for index in range(count):
            key = self.text(f"key #{index}")
            if not key:
                raise GGUFError("bad_key", f"key #{index} is empty")
            if key in seen:
                raise GGUFError("duplicate_key", f"key {_show(key)} appears twice")
            seen.add(key)
            vtype = self.u32(f"the type of {_show(key)}")
            value = self.value(vtype, 0, key)
            if key == ALIGNMENT_KEY:
                alignment = _check_alignment(vtype, value)
            if value is not None and len(metadata) < self.caps.max_metadata_entries:
                text = _metadata_text(value)
                if text is not None:
                    metadata[key] = text
        return metadata, alignment

    def value(self, vtype: int, depth: int, key: str) -> object:
        """Read one value; scalars and strings are returned, arrays skipped (None)."""
        if vtype in _SCALARS:
            scalar = _SCALARS[vtype]
            self._need(scalar.size, f"the value of {_show(key)}")
            (result,) = scalar.unpack_from(self.buf, self.pos)
            self.pos += scalar.size
            if vtype == _BOOL and result not in (0, 1):
                raise GGUFError("bad_value", f"{_show(key)}: boolean byte {result} is not 0 or 1")
            return bool(result) if vtype == _BOOL else result
        if vtype == _STRING:
            return self.raw_string(f"the value of {_show(key)}")
        if vtype == _ARRAY:
            self.array(depth + 1, key)
            return None
        raise GGUFError("bad_value_type", f"{_show(key)} has unknown value type {vtype}")

    def array(self, depth: int, key: str) -> None:
        if depth > self.caps.max_nesting:
            raise GGUFError(
                "nesting_too_deep",
                f"{_show(key)}: arrays nested {depth} deep, over the cap of {self.caps.max_nesting}",
            )
        etype = self.u32(f"the element type of {_show(key)}")
        count = self.u64(f"the length of {_show(key)}")
        if count > self.caps.max_array_elements:
            raise GGUFError(
                "array_too_long",
                f"{_show(key)} declares {count} elements, "
                f"over the cap of {self.caps.max_array_elements}",
            )
        if etype in _SCALARS:
            self.skip(count * _SCALARS[etype].size, f"the elements of {_show(key)}")
        elif etype == _STRING:
            for _ in range(count):
                self.raw_string(f"a string in {_show(key)}")
        elif etype == _ARRAY:
            for _ in range(count):
                self.array(depth + 1, key)
        else:
            raise GGUFError("bad_value_type", f"{_show(key)} has unknown element type {etype}")

    def tensor_info(self, names: set[str]) -> TensorEntry:
        index = len(names)
        raw = self.raw_string(f"the name of tensor #{index}")
        name = _tensor_name(raw, index)
        if name in names:
            raise GGUFError("duplicate_key", f"tensor name {_show(name)} appears twice")
        names.add(name)
        rank = self.u32(f"the rank of {_show(name)}")
        if rank > min(MAX_DIMS, self.caps.max_rank):
            raise GGUFError(
                "rank_too_large",
                f"tensor {_show(name)} has rank {rank}; "
                f"at most {min(MAX_DIMS, self.caps.max_rank)} allowed",
            )
        dims = [self.u64(f"a dimension of {_show(name)}") for _ in range(rank)]
        type_id = self.u32(f"the type of {_show(name)}")
        offset = self.u64(f"the offset of {_show(name)}")
        dtype, parameters, nbytes = _size(name, dims, type_id, self.caps.max_total_bytes)
        # GGUF lists dimensions innermost first; numpy (and our manifests) outermost first.
        return TensorEntry(name, dtype, dims[::-1], offset, nbytes, parameters)


def _tensor_name(raw: bytes, index: int) -> str:
    if not 0 < len(raw) <= MAX_NAME_BYTES:
        raise GGUFError(
            "bad_tensor_entry",
            f"the name of tensor #{index} has {len(raw)} bytes (1-{MAX_NAME_BYTES})",
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GGUFError(
            "header_not_utf8", f"the name of tensor #{index} is not UTF-8: {exc.reason}"
        ) from exc


def _size(name: str, dims: list[int], type_id: int, max_total: int) -> tuple[str, int, int]:
    if type_id not in GGML_TYPES:
        raise GGUFError("unknown_dtype", f"tensor {_show(name)} has unknown ggml type {type_id}")
    dtype, block, block_bytes = GGML_TYPES[type_id]
    for dim in dims:
        if dim >= 2**63:  # ggml's ne is int64_t
            raise GGUFError("bad_shape", f"tensor {_show(name)}: dimension {dim} is not below 2**63")
    if dims and dims[0] % block:
        raise GGUFError(
            "bad_shape",
            f"tensor {_show(name)}: {dtype} packs {block} values per block, "
            f"but its first dimension is {dims[0]}",
        )
    parameters = 1
    for dim in dims:
        parameters *= dim
        # Stop at the cap so dims like [2**62, 2**62, ...] never build a huge number.
        if parameters // block * block_bytes > max_total:
            raise GGUFError(
                "too_large",
                f"tensor {_show(name)}: {dtype} {dims[::-1]} is over the cap of {max_total} bytes",
            )
    return dtype, parameters, parameters // block * block_bytes


def _check_alignment(vtype: int, value: object) -> int:
    if vtype != _UINT32 or not isinstance(value, int) or value <= 0 or value & (value - 1):
        raise GGUFError(
            "bad_alignment",
            f"{ALIGNMENT_KEY} must be a power-of-two UINT32, not {_show(value)} (type {vtype})",
        )
    return value


def _metadata_text(value: object) -> str | None:
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


def _check_layout(
    tensors: list[TensorEntry], alignment: int, data_start: int, header_bytes: int, size: int
) -> None:
    expected = 0
    for tensor in tensors:
        if tensor.offset % alignment:
            raise GGUFError(
                "bad_offsets",
                f"tensor {_show(tensor.name)} at offset {tensor.offset} "
                f"is not aligned to {alignment} bytes",
            )
        if tensor.offset != expected:
            defect = "overlaps what comes before it" if tensor.offset < expected else "leaves a gap"
            raise GGUFError(
                "offsets_not_contiguous",
                f"tensor {_show(tensor.name)} at offset {tensor.offset} {defect}: "
                f"the previous tensor ends, aligned, at {expected}",
            )
        expected = _align(tensor.offset + tensor.nbytes, alignment)
    end = data_start + tensors[-1].offset + tensors[-1].nbytes if tensors else header_bytes
    if size < end:
        raise GGUFError(
            "data_size_mismatch",
            f"file is truncated: tensor data ends at byte {end}, the file has {size}",
        )
    if size > _align(end, alignment):
        raise GGUFError(
            "data_size_mismatch",
            f"file has trailing bytes: tensor data ends at byte {end} "
            f"(padded: {_align(end, alignment)}), the file has {size}",
        )
