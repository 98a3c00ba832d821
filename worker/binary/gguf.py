"""A strict, bounded reader of a GGUF file's layout (stdlib only: the load child uses it too).

Versions 2 and 3, little-endian. Every count and length is checked against a cap
and against the file's real size before anything is read or allocated for it,
so a 53-byte file that declares a 2^62-element array fails at once (the released
``gguf`` reader hangs on it) and nesting cannot reach Python's recursion limit.
Tensor offsets must follow llama.cpp's own rule: in file order, each at the
previous end rounded up to ``general.alignment`` (a power of two, default 32).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from loadwarden.worker.binary.gguf_rules import (
    ALIGNMENT_KEY,
    MAX_DIMS,
    GGUFError,
    TensorEntry,
    align,
    check_alignment,
    check_layout,
    metadata_text,
    show,
    tensor_size,
)
from loadwarden.worker.binary.magic import GGUF as MAGIC
from loadwarden.worker.binary.pread import pread_into

DEFAULT_ALIGNMENT = 32
#: Longest tensor name we accept (ggml's own is 64; converters stay well under 1024).
MAX_NAME_BYTES = 1024

# Value types of the key/value section.
_STRING, _ARRAY, _BOOL = 8, 9, 7
# Fixed-size value types (UINT8 ... FLOAT64, BOOL as a byte) and their struct formats.
_SCALARS: dict[int, struct.Struct] = {
    vtype: struct.Struct(f"<{code}")
    for vtype, code in zip((0, 1, 2, 3, 4, 5, 6, 7, 10, 11, 12), "BbHhIifBQqd", strict=True)
}
_U32 = struct.Struct("<I")
_ARRAY_HEAD = struct.Struct("<IQ")  # element type, length
_U64 = struct.Struct("<Q")
_FIXED_PREFIX = 24  # magic, version, tensor count, key/value count
_FIRST_READ = 64 * 1024


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
    data_start = align(header_bytes, alignment)
    check_layout(tensors, alignment, data_start, header_bytes, file_size)
    return Layout(version, alignment, header_bytes, data_start, tensors, metadata)


def read_within(fd: int, file_size: int) -> Layout:
    """``read_layout`` bounded only by the file (the child re-reads an inspected file)."""
    return read_layout(fd, file_size, Caps.within(file_size))


class _Reader:
    """Reads the header through a buffer that grows on demand, never past the caps or the file.

    Messages name what was being read as ``(label, subject)`` and are only built on
    error: the hot loops (a vocabulary is 10^5 strings) must not format text.
    """

    def __init__(self, fd: int, file_size: int, caps: Caps) -> None:
        self.fd = fd
        self.file_size = file_size
        self.caps = caps
        self.buf = bytearray()
        self.pos = 0

    def _need(self, count: int, label: str, subject: str | None = None) -> None:
        end = self.pos + count
        if end <= len(self.buf):
            return
        what = _what(label, subject)
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
        chunk = bytearray(min(want, self.file_size) - len(self.buf))
        got = pread_into(self.fd, memoryview(chunk), len(self.buf))
        self.buf += chunk[:got]
        if end > len(self.buf):  # the file shrank since its size was taken
            raise GGUFError("header_beyond_file", f"the file ends at byte {len(self.buf)}")

    def _unpack(self, fmt: struct.Struct, label: str, subject: str | None = None) -> int:
        self._need(fmt.size, label, subject)
        (value,) = fmt.unpack_from(self.buf, self.pos)
        self.pos += fmt.size
        return int(value)

    def u32(self, label: str, subject: str | None = None) -> int:
        return self._unpack(_U32, label, subject)

    def u64(self, label: str, subject: str | None = None) -> int:
        return self._unpack(_U64, label, subject)

    def raw_string(self, label: str, subject: str | None = None) -> bytes:
        length = self.u64(f"the length of {label}", subject)
        if length > self.caps.max_string_bytes:
            raise GGUFError(
                "string_too_long",
                f"{_what(label, subject)} declares {length} bytes, "
                f"over the cap of {self.caps.max_string_bytes}",
            )
        self._need(length, label, subject)
        value = bytes(self.buf[self.pos : self.pos + length])
        self.pos += length
        return value

    def skip_strings(self, count: int, key: str) -> None:
        """Skip ``count`` strings (checking each length) without copying or decoding them."""
        cap = self.caps.max_string_bytes
        unpack = _U64.unpack_from
        buf, pos, end = self.buf, self.pos, len(self.buf)  # locals: this loop runs 10^6 times
        for _ in range(count):
            if pos + 8 > end:
                self.pos = pos
                self._need(8, "a string in", key)
                end = len(buf)  # the buffer grew in place
            (length,) = unpack(buf, pos)
            if length > cap:
                raise GGUFError(
                    "string_too_long",
                    f"a string in {show(key)} declares {length} bytes, over the cap of {cap}",
                )
            pos += 8 + length
            if pos > end:
                self.pos = pos - length
                self._need(length, "a string in", key)
                end = len(buf)
        self.pos = pos

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
                "too_many_tensors", f"{tensors} tensors, over the cap of {self.caps.max_tensors}"
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
            key = _utf8(self.raw_string(f"key #{index}"), f"key #{index}")
            if not key:
                raise GGUFError("bad_key", f"key #{index} is empty")
            if key in seen:
                raise GGUFError("duplicate_key", f"key {show(key)} appears twice")
            seen.add(key)
            vtype = self.u32("the type", key)
            value = self.value(vtype, key)
            if key == ALIGNMENT_KEY:
                alignment = check_alignment(vtype, value)
            if value is not None and len(metadata) < self.caps.max_metadata_entries:
                text = metadata_text(value)
                if text is not None:
                    metadata[key] = text
        return metadata, alignment

    def value(self, vtype: int, key: str) -> object:
        """Read one value; scalars and strings are returned, arrays skipped (None)."""
        if vtype in _SCALARS:
            result = _SCALARS[vtype]
            self._need(result.size, "the value", key)
            (scalar,) = result.unpack_from(self.buf, self.pos)
            self.pos += result.size
            if vtype == _BOOL and scalar not in (0, 1):
                raise GGUFError("bad_value", f"{show(key)}: boolean byte {scalar} is not 0 or 1")
            return bool(scalar) if vtype == _BOOL else scalar
        if vtype == _STRING:
            return self.raw_string("the value", key)
        if vtype == _ARRAY:
            self.array(1, key)
            return None
        raise GGUFError("bad_value_type", f"{show(key)} has unknown value type {vtype}")

    def array(self, depth: int, key: str) -> None:
        """Skip one array value (its elements are not kept)."""
        self._check_depth(depth, key)
        etype = self.u32("the element type", key)
        count = self.u64("the length", key)
        self._check_count(count, key)
        self._elements(etype, count, depth, key)

    def _elements(self, etype: int, count: int, depth: int, key: str) -> None:
        if etype in _SCALARS:
            self._need(count * _SCALARS[etype].size, "the elements", key)
            self.pos += count * _SCALARS[etype].size
        elif etype == _STRING:
            self.skip_strings(count, key)
        elif etype == _ARRAY:
            self._arrays(count, depth + 1, key)
        else:
            raise GGUFError("bad_value_type", f"{show(key)} has unknown element type {etype}")

    def _arrays(self, count: int, depth: int, key: str) -> None:
        """Skip ``count`` arrays; a fast path for scalar ones (this loop can run 10^6 times)."""
        if count:
            self._check_depth(depth, key)
        unpack = _ARRAY_HEAD.unpack_from
        for _ in range(count):
            self._need(_ARRAY_HEAD.size, "an array in", key)
            etype, length = unpack(self.buf, self.pos)
            self.pos += _ARRAY_HEAD.size
            self._check_count(length, key)
            self._elements(etype, length, depth, key)

    def _check_depth(self, depth: int, key: str) -> None:
        if depth > self.caps.max_nesting:
            raise GGUFError(
                "nesting_too_deep",
                f"{show(key)}: arrays nested {depth} deep, over the cap of {self.caps.max_nesting}",
            )

    def _check_count(self, count: int, key: str) -> None:
        if count > self.caps.max_array_elements:
            raise GGUFError(
                "array_too_long",
                f"{show(key)} declares {count} elements, "
                f"over the cap of {self.caps.max_array_elements}",
            )

    def tensor_info(self, names: set[str]) -> TensorEntry:
        index = len(names)
        raw = self.raw_string(f"the name of tensor #{index}")
        if not 0 < len(raw) <= MAX_NAME_BYTES:
            raise GGUFError(
                "bad_tensor_entry",
                f"the name of tensor #{index} has {len(raw)} bytes (1-{MAX_NAME_BYTES})",
            )
        name = _utf8(raw, f"the name of tensor #{index}")
        if name in names:
            raise GGUFError("duplicate_key", f"tensor name {show(name)} appears twice")
        names.add(name)
        rank = self.u32("the rank", name)
        if rank > min(MAX_DIMS, self.caps.max_rank):
            raise GGUFError(
                "rank_too_large",
                f"tensor {show(name)} has rank {rank}; "
                f"at most {min(MAX_DIMS, self.caps.max_rank)} allowed",
            )
        dims = [self.u64("a dimension", name) for _ in range(rank)]
        type_id = self.u32("the type", name)
        offset = self.u64("the offset", name)
        dtype, parameters, nbytes = tensor_size(name, dims, type_id, self.caps.max_total_bytes)
        # GGUF lists dimensions innermost first; numpy (and our manifests) outermost first.
        return TensorEntry(name, dtype, dims[::-1], offset, nbytes, parameters)


def _what(label: str, subject: str | None) -> str:
    return label if subject is None else f"{label} of {show(subject)}"


def _utf8(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GGUFError(
            "header_not_utf8", f"{what} is not UTF-8: {exc.reason} at byte {exc.start}"
        ) from exc


__all__ = ["Caps", "GGUFError", "Layout", "TensorEntry", "read_layout"]
