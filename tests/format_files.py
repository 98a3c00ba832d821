"""Build raw npy, npz, GGUF, pickle, HDF5 and zip bytes, valid or hostile, for the tests."""

from __future__ import annotations

import io
import os
import pickle
import struct
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

NPY_MAGIC = b"\x93NUMPY"
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"

# GGUF value types.
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = (*range(10), 10, 11, 12)
# ggml tensor types used by the tests.
GGML_F32, GGML_F16, GGML_Q8_0, GGML_Q4_K, GGML_I8, GGML_I32 = 0, 1, 8, 12, 24, 26


# --- .npy ---------------------------------------------------------------------------


def npy_header(descr: Any = "<f4", shape: Any = (4,), fortran: Any = False) -> str:
    """A header dict literal as numpy writes it (values given as Python objects)."""
    return f"{{'descr': {descr!r}, 'fortran_order': {fortran!r}, 'shape': {shape!r}, }}"


def npy_bytes(
    header: str | bytes,
    data: bytes = b"",
    *,
    version: tuple[int, int] = (1, 0),
    length: int | None = None,
) -> bytes:
    """The bytes of an ``.npy`` file: magic, version, header length, header, data, each as given.

    ``length`` overrides the declared header length (default: the true one).
    """
    raw = header.encode("latin-1") if isinstance(header, str) else header
    width = "<H" if version[0] == 1 else "<I"
    declared = len(raw) if length is None else length
    return NPY_MAGIC + bytes(version) + struct.pack(width, declared) + raw + data


def npy_of(array: np.ndarray[Any, Any], **kwargs: Any) -> bytes:
    """An ``.npy`` file written by numpy itself."""
    out = io.BytesIO()
    np.save(out, array, **kwargs)
    return out.getvalue()


def npy_version(array: np.ndarray[Any, Any], version: tuple[int, int]) -> bytes:
    """An ``.npy`` file of the given format version, written by numpy."""
    out = io.BytesIO()
    np.lib.format.write_array(out, array, version=version)
    return out.getvalue()


# --- zip / .npz ---------------------------------------------------------------------


def zip_bytes(
    members: Sequence[tuple[str, bytes]], method: int = zipfile.ZIP_STORED, comment: bytes = b""
) -> bytes:
    """A zip archive of ``(name, content)`` members, written by zipfile."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=method) as archive:
        for name, content in members:
            archive.writestr(name, content)
        archive.comment = comment
    return out.getvalue()


def npz_of(arrays: dict[str, np.ndarray[Any, Any]], *, compressed: bool = False) -> bytes:
    """An ``.npz`` archive written by numpy itself."""
    out = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(out, **arrays)
    return out.getvalue()


def zeros_bomb(name: str, data_bytes: int, declared_bytes: int | None = None) -> bytes:
    """A deflated ``.npz`` whose one uint8 member inflates to ``data_bytes`` of zeros.

    Written by streaming zlib by hand (no buffer of the inflated size is ever built).
    ``declared_bytes`` makes the header and directory claim more than the stream holds
    (Zip64 past 4 GiB): a bomb too big to build, judged on what it declares.
    """
    declared = data_bytes if declared_bytes is None else declared_bytes
    header = npy_bytes(npy_header("|u1", (declared,)))
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    crc = zlib.crc32(header)
    parts = [compressor.compress(header)]
    chunk = bytes(1 << 20)
    for start in range(0, data_bytes, len(chunk)):
        piece = chunk[: min(len(chunk), data_bytes - start)]
        crc = zlib.crc32(piece, crc)
        parts.append(compressor.compress(piece))
    parts.append(compressor.flush())
    return _one_member_zip(name, b"".join(parts), len(header) + declared, crc)


def _one_member_zip(name: str, compressed: bytes, size: int, crc: int) -> bytes:
    """A one-member deflated zip from its parts (zipfile cannot write pre-compressed data)."""
    raw = name.encode()
    zip64 = size >= 0xFFFFFFFF
    extra = struct.pack("<HHQQ", 1, 16, size, len(compressed)) if zip64 else b""
    sizes = (0xFFFFFFFF, 0xFFFFFFFF) if zip64 else (len(compressed), size)
    local = struct.pack(
        "<4s5H3L2H", b"PK\x03\x04", 45, 0, 8, 0, 0, crc, *sizes, len(raw), len(extra)
    )
    local += raw + extra
    central = struct.pack(
        "<4s6H3L5H2L",
        b"PK\x01\x02",
        45,
        45,
        0,
        8,
        0,
        0,
        crc,
        *sizes,
        len(raw),
        len(extra),
        0,
        0,
        0,
        0,
        0,
    )
    central += raw + extra
    offset = len(local) + len(compressed)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, len(central), offset, 0)
    return local + compressed + central + end


def overlapping_npz(array: np.ndarray[Any, Any], copies: int) -> bytes:
    """A zip whose directory lists ``copies`` members that all point at the same bytes."""
    good = zip_bytes([("a.npy", npy_of(array))])
    end = good.rindex(b"PK\x05\x06")
    directory = good.index(b"PK\x01\x02")
    entry = bytearray(good[directory:end])
    entries = []
    for i in range(copies):
        named = bytearray(entry)
        named[46:47] = bytes([ord("a") + i])  # a.npy, b.npy, ...: same local header
        entries.append(bytes(named))
    central = b"".join(entries)
    tail = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, copies, copies, len(central), directory, 0)
    return good[:directory] + central + tail


def duplicate_members_zip() -> bytes:
    """An archive that lists ``a.npy`` twice."""
    member = npy_of(np.zeros(2, np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns of the duplicate
        return zip_bytes([("a.npy", member), ("a.npy", member)])


def zip_with_bad_crc() -> bytes:
    """A valid-looking ``.npz`` whose directory gives its member a wrong CRC-32.

    The member is larger than zipfile's first read (4 KiB), so reading its header
    does not reach the end where the CRC is checked: only a full load finds it.
    """
    good = bytearray(zip_bytes([("a.npy", npy_of(np.arange(4096, dtype=np.int32)))]))
    central = good.index(b"PK\x01\x02")
    good[central + 16 : central + 20] = b"\xde\xad\xbe\xef"
    return bytes(good)


def npz_directory_past_eof() -> bytes:
    """An ``.npz`` whose end record puts the central directory past the end of the file."""
    good = bytearray(npz_of({"a": np.zeros(2)}))
    end = good.rindex(b"PK\x05\x06")
    good[end + 16 : end + 20] = (10**9).to_bytes(4, "little")
    return bytes(good)


def zip64_end_claiming(entries: int) -> bytes:
    """A small zip whose Zip64 end record claims ``entries`` members."""
    good = zip_bytes([("a.npy", npy_of(np.zeros(2, np.uint8)))])
    end = good.rindex(b"PK\x05\x06")
    directory = good.index(b"PK\x01\x02")
    size = end - directory
    record64 = struct.pack(
        "<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, entries, entries, size, directory
    )
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, end, 1)
    tail = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, size, directory, 0)
    return good[:end] + record64 + locator + tail


# --- GGUF ---------------------------------------------------------------------------


def gguf_string(value: str | bytes, *, length: int | None = None) -> bytes:
    """A GGUF string: u64 length (or ``length``), then the bytes."""
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack("<Q", len(raw) if length is None else length) + raw


def gguf_kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    """One key/value pair: key, value type, the value's encoded bytes."""
    return gguf_string(key) + struct.pack("<I", vtype) + payload


def gguf_array(etype: int, count: int, payload: bytes = b"") -> bytes:
    """An array value's bytes: element type, declared count, elements."""
    return struct.pack("<IQ", etype, count) + payload


def gguf_tensor(name: str | bytes, dims: Sequence[int], ggml_type: int, offset: int) -> bytes:
    """One tensor info: name, rank, dims (innermost first), type, offset."""
    body = struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
    return gguf_string(name) + body + struct.pack("<IQ", ggml_type, offset)


def gguf_bytes(
    kvs: Sequence[bytes] = (),
    tensors: Sequence[bytes] = (),
    data: bytes = b"",
    *,
    version: int = 3,
    tensor_count: int | None = None,
    kv_count: int | None = None,
    alignment: int = 32,
    pad: bool = True,
) -> bytes:
    """A GGUF file: header, pairs, tensor infos, padding to ``alignment``, then ``data``."""
    head = b"GGUF" + struct.pack(
        "<IQQ",
        version,
        len(tensors) if tensor_count is None else tensor_count,
        len(kvs) if kv_count is None else kv_count,
    )
    head += b"".join(kvs) + b"".join(tensors)
    if pad:
        head += bytes(-len(head) % alignment)
    return head + data


def gguf_f32_tensors(count: int = 2, elements: int = 4) -> tuple[list[bytes], bytes]:
    """Infos and data of ``count`` contiguous F32 tensors ``t0``, ``t1``, ... (32-aligned)."""
    size = elements * 4
    stride = size + (-size % 32)
    infos = [gguf_tensor(f"t{i}", [elements], GGML_F32, i * stride) for i in range(count)]
    data = b"".join(
        np.arange(elements, dtype=np.float32).tobytes() + bytes(stride - size) for _ in range(count)
    )
    return infos, data[: (count - 1) * stride + size]


# --- code-bearing -------------------------------------------------------------------


def pickled(protocol: int) -> bytes:
    """A pickle of a small state dict, as a checkpoint would hold."""
    return pickle.dumps({"weight": [0.0] * 8, "step": 3}, protocol=protocol)


def torch_zip(prefix: str = "archive") -> bytes:
    """The layout of a ``torch.save`` zip checkpoint: data.pkl, byte order, a storage."""
    return zip_bytes(
        [
            (f"{prefix}/data.pkl", pickled(2)),
            (f"{prefix}/byteorder", b"little"),
            (f"{prefix}/data/0", bytes(32)),
            (f"{prefix}/version", b"3\n"),
        ]
    )


def keras_zip() -> bytes:
    """The layout of a Keras 3 ``.keras`` archive."""
    return zip_bytes(
        [
            ("metadata.json", b'{"keras_version": "3.0.0"}'),
            ("config.json", b'{"class_name": "Sequential", "config": {}}'),
            ("model.weights.h5", HDF5_MAGIC + bytes(56)),
        ]
    )


def hdf5(userblock: int = 0) -> bytes:
    """An HDF5 superblock signature after ``userblock`` bytes (enough to be sniffed)."""
    return bytes(userblock) + HDF5_MAGIC + bytes(120)


def gguf_written(build: Callable[[Any], None], alignment: int | None = None) -> bytes:
    """A GGUF file written by the gguf package's own writer (the reference implementation)."""
    import gguf

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "m.gguf")
        writer = gguf.GGUFWriter(path, "llama")
        if alignment is not None:
            writer.add_custom_alignment(alignment)
        build(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(path, "rb") as f:
            return f.read()


def gguf_mixed(writer: Any) -> None:
    """Metadata and tensors of several ggml types, quantized ones as raw blocks."""
    import gguf

    quant = gguf.GGMLQuantizationType
    writer.add_name("tiny")
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "a", "b"])
    writer.add_tensor("tok.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.add_tensor("norm", np.linspace(0, 1, 8).astype(np.float16))
    writer.add_tensor("ids", np.arange(-4, 4, dtype=np.int8))
    writer.add_tensor("pos", np.arange(6, dtype=np.int32).reshape(2, 3))
    q8 = np.arange(2 * 34, dtype=np.uint8).reshape(2, 34)
    writer.add_tensor("q8", q8, raw_dtype=quant.Q8_0)
    writer.add_tensor("q4k", np.arange(144, dtype=np.uint8).reshape(1, 144), raw_dtype=quant.Q4_K)
    bf16 = np.arange(6, dtype=np.uint16).reshape(2, 3)
    writer.add_tensor("bf16", bf16, raw_dtype=quant.BF16)


def gguf_nested(writer: Any) -> None:
    """An array of arrays in the metadata (one level of nesting), and one tensor."""
    writer.add_array("nested", [[1, 2], [3]])
    writer.add_tensor("t", np.ones(5, dtype=np.float32))
