"""The hostile-input corpus: for every format, files that try to hurt a loader, and controls.

    python -m tests.hostile FOLDER      writes every case into FOLDER/<case id>/

Each ``Case`` says what ``inspect_model`` (and a supervisor's load) must make of
its file: the error code (its class follows from it), or success for the valid
controls. ``tests/test_hostile.py`` runs every case. Filesystem tricks (FIFOs,
symlinks, files changed under the load) need a live path and live there.
"""

from __future__ import annotations

import functools
import os
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save

from loadwarden.producer.contract import ModelFormat
from loadwarden.producer.errors import InvalidModel, LoadError, SourceRefused
from loadwarden.worker.config import InspectionCaps
from tests import format_files as ff
from tests.safetensors_files import entry, one_tensor, raw_file

#: The sparse "100 GB" files are structurally valid and take no disk; a budget like
#: the default memory ceiling (64 GiB) refuses them.
SPARSE_BYTES = 100 * 10**9
SPARSE_BUDGET = 64 * 1024**3
#: How far the zip bomb inflates (its file is about 260 KB).
BOMB_BYTES = 256 * 1024 * 1024
#: Each member of the aggregate bomb: at the per-member exemption (1 MiB).
AGGREGATE_MEMBER_BYTES = 1024 * 1024
SMALL_CAPS = InspectionCaps(max_tensors=3, max_header_bytes=1024)
#: Codes whose error is SourceRefused (outcome ``refused``); every other is InvalidModel.
REFUSED_CODES = frozenset({"code_bearing_format", "object_array", "format_mismatch", "over_budget"})


@dataclass(frozen=True)
class Case:
    """One corpus file and what must become of it."""

    id: str
    group: str
    filename: str
    content: bytes | Callable[[], bytes]
    code: str | None = None
    fragment: str = ""
    declared: ModelFormat | None = None
    caps: InspectionCaps | None = None
    budget_bytes: int | None = None
    #: Grow the written file (sparsely) to this size.
    sparse_size: int | None = None
    #: A defect no header shows: inspection passes, the child starts and reports this code.
    load_code: str | None = None

    @property
    def error(self) -> type[LoadError] | None:
        """The error class inspection must raise (None: it must pass)."""
        if self.code is None:
            return None
        return SourceRefused if self.code in REFUSED_CODES else InvalidModel

    def write(self, folder: Path) -> Path:
        """Write the case's file into ``folder``; return its path."""
        path = folder / self.filename
        path.write_bytes(self.content() if callable(self.content) else self.content)
        if self.sparse_size is not None:
            os.truncate(path, self.sparse_size)
        return path


def _maker(group: str, filename: str) -> Callable[..., Case]:
    def make(case_id: str, content: Any, code: str | None = None, **kw: Any) -> Case:
        return Case(case_id, group, kw.pop("filename", filename), content, code, **kw)

    return make


# --- contents that take more than an expression -------------------------------------


def _st_valid() -> bytes:
    rng = np.random.default_rng(1)
    arrays = {
        "w.f32": rng.standard_normal((3, 5)).astype(np.float32),
        "w.f16": rng.standard_normal(7).astype(np.float16),
        "w.f64": np.array([[1.5, -2.0]]),
        "ids": np.arange(6, dtype=np.int64).reshape(2, 3),
        "mask": np.array([True, False]),
        "bytes": np.arange(5, dtype=np.uint8),
    }
    return save(arrays)


@functools.cache
def _bomb() -> bytes:
    return ff.zeros_bomb("zeros.npy", BOMB_BYTES)


def _aggregate_bomb() -> bytes:
    """100 members of 1 MiB of zeros each: every one exempt from the per-member ratio cap."""
    member = ff.npy_of(np.zeros(AGGREGATE_MEMBER_BYTES - 128, dtype=np.uint8))
    assert len(member) == AGGREGATE_MEMBER_BYTES
    return ff.zip_bytes([(f"m{n}.npy", member) for n in range(100)], zipfile.ZIP_DEFLATED)


def _gguf_offsets(offsets: tuple[int, int], data_bytes: int = 48) -> bytes:
    infos = [ff.gguf_tensor(f"t{i}", [4], ff.GGML_F32, off) for i, off in enumerate(offsets)]
    return ff.gguf_bytes([], infos, bytes(data_bytes))


def _gguf_one(dims: list[int], ggml_type: int = ff.GGML_F32, data: int = 0) -> bytes:
    return ff.gguf_bytes([], [ff.gguf_tensor("t", dims, ggml_type, 0)], bytes(data))


def _gguf_kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return ff.gguf_bytes([ff.gguf_kv(key, vtype, payload)])


def _sparse(header: bytes) -> dict[str, Any]:
    """A file of ``header`` grown to hold SPARSE_BYTES of data, judged against the budget."""
    return {
        "sparse_size": len(header) + SPARSE_BYTES,
        "budget_bytes": SPARSE_BUDGET,
        "fragment": "budget",
    }


HEADER = ff.npy_header()
F4x4 = np.arange(4, dtype=np.float32).tobytes()
ARRAYS = {
    "f32": np.arange(12, dtype=np.float32).reshape(3, 4),
    "f16": np.linspace(-1, 1, 5).astype(np.float16),
    "f64": np.array([[1.5, -2.0]]),
    "i64": np.arange(6, dtype=np.int64),
    "i8": np.arange(-3, 3, dtype=np.int8),
    "u8": np.arange(7, dtype=np.uint8),
    "bool": np.array([True, False, True]),
    "c64": (np.arange(3) + 1j).astype(np.complex64),
    "c128": np.array([1 + 2j]),
}
U8x4 = entry("U8", [4], 0, 4)
OBJECTS = ff.npy_of(np.array([1, "x"], dtype=object), allow_pickle=True)
#: serde_json reads -0 as the float -0.0: the Rust loader refuses it as a shape or offset.
MINUS_ZERO = '{{"t":{{"dtype":"U8","shape":{},"data_offsets":{}}}}}'
DEEP_JSON = '{"t":' + "[" * 10**5 + "]" * 10**5 + "}"
DUP_NPY = "{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (4,)}"
CODE_NPY = ff.npy_header().replace("'<f4'", "__import__('os').getpid()")
F32_INFOS, F32_DATA = ff.gguf_f32_tensors(2)
ARRAY_BOMB = ff.gguf_kv("a", ff.ARRAY, ff.gguf_array(ff.U8, 2**62) + bytes(4))
NESTED = ff.gguf_array(ff.ARRAY, 1, ff.gguf_array(ff.ARRAY, 1, ff.gguf_array(ff.U8, 0)))
ST_SPARSE = raw_file({"huge": entry("U8", [SPARSE_BYTES], 0, SPARSE_BYTES)})
NPY_SPARSE = ff.npy_bytes(ff.npy_header("|u1", (SPARSE_BYTES,)))
GGUF_SPARSE = ff.gguf_bytes([], [ff.gguf_tensor("huge", [SPARSE_BYTES], ff.GGML_I8, 0)])


def _safetensors_cases() -> list[Case]:
    c = _maker("safetensors", "model.safetensors")
    return [
        c("st-header-over-cap", raw_file(b"{}", length=2**40), "header_too_large"),
        c("st-header-beyond-file", raw_file('{"t":1}', length=100), "header_beyond_file"),
        c("st-truncated-header", raw_file('{"t":'), "header_not_json"),
        c("st-not-utf8", raw_file(b'{"\xff":1}'), "header_not_utf8"),
        c("st-utf16", raw_file("{}".encode("utf-16")), "header_not_utf8"),
        c("st-duplicate-keys", raw_file(b'{"t":{},"t":{}}'), "duplicate_key"),
        c("st-nan", raw_file('{"__metadata__":{"a":NaN}}'), "non_finite_number"),
        c("st-deep-nesting", raw_file(DEEP_JSON), "header_not_json"),
        c("st-unknown-dtype", one_tensor(dtype="Q9"), "unknown_dtype"),
        c("st-negative-shape", one_tensor(shape=[-4]), "bad_shape"),
        c("st-minus-zero-shape", raw_file(MINUS_ZERO.format("[-0]", "[0,0]")), "bad_shape"),
        c("st-minus-zero-offset", raw_file(MINUS_ZERO.format("[0]", "[-0,0]")), "bad_offsets"),
        c("st-zero-size-huge-dim", raw_file({"t": entry("U8", [2**63, 0], 0, 0)}), "bad_shape"),
        c("st-overflowing-shape", one_tensor(shape=[2**62, 2**62]), "too_large"),
        c("st-offsets-reversed", one_tensor(data_offsets=[4, 0]), "bad_offsets"),
        c("st-offsets-overlap", raw_file({"a": U8x4, "b": entry("U8", [4], 2, 6)}, bytes(6)),
          "offsets_not_contiguous"),
        c("st-offsets-gap", raw_file({"a": U8x4, "b": entry("U8", [4], 5, 9)}, bytes(9)),
          "offsets_not_contiguous"),
        c("st-past-eof", raw_file({"t": U8x4}, b"12"), "data_size_mismatch"),
        c("st-size-mismatch", raw_file({"t": entry("F32", [2], 0, 4)}, bytes(4)), "size_mismatch"),
        c("st-f4-odd-count", raw_file({"t": entry("F4", [3], 0, 2)}, bytes(2)), "not_whole_bytes"),
        c("st-f6-byte-each", raw_file({"t": entry("F6_E3M2", [4], 0, 4)}, bytes(4)),
          "size_mismatch"),
        c("st-empty", b"", "file_too_small"),
        c("st-valid-mixed", _st_valid),
        c("st-valid-empty", raw_file("{}")),
        c("st-valid-whitespace-padded", raw_file("\n\t {} \r")),
    ]  # fmt: skip


def _npy_cases() -> list[Case]:
    c = _maker("npy", "array.npy")
    shape = functools.partial(ff.npy_header, "<f4")
    return [
        c("npy-header-over-cap", ff.npy_bytes(HEADER, length=65_535), "header_too_large"),
        c("npy-v2-header-2gib", ff.npy_bytes(HEADER, version=(2, 0), length=2**31),
          "header_too_large"),
        c("npy-header-beyond-file", ff.npy_bytes(HEADER, length=5000), "header_beyond_file"),
        c("npy-truncated-prefix", ff.NPY_MAGIC + b"\x01", "file_too_small"),
        c("npy-truncated-header", ff.npy_bytes(HEADER, F4x4)[:24], "header_beyond_file"),
        c("npy-not-ascii", ff.npy_bytes(HEADER.replace("<f4", "\xff")), "bad_header"),
        c("npy-utf16-header", ff.npy_bytes(HEADER.encode("utf-16"), version=(3, 0)), "bad_header"),
        c("npy-duplicate-keys", ff.npy_bytes(DUP_NPY, F4x4), "duplicate_key"),
        c("npy-shape-not-tuple", ff.npy_bytes(shape("4")), "bad_shape"),
        c("npy-nan-literal", ff.npy_bytes(HEADER.replace("(4,)", "(nan,)")), "bad_header"),
        c("npy-inf-shape", ff.npy_bytes(HEADER.replace("(4,)", "(1e999,)")), "bad_shape"),
        c("npy-deep-nesting", ff.npy_bytes(HEADER.replace("(4,)", "(" * 999 + ")" * 999)),
          "bad_header"),
        c("npy-code-in-header", ff.npy_bytes(CODE_NPY), "bad_header", fragment="literals"),
        c("npy-unknown-dtype", ff.npy_bytes(ff.npy_header("<f16")), "unknown_dtype"),
        c("npy-string-dtype", ff.npy_bytes(ff.npy_header("<U8")), "unknown_dtype"),
        c("npy-structured", ff.npy_bytes(ff.npy_header([("a", "<f4")])), "unknown_dtype"),
        c("npy-object-array", OBJECTS, "object_array", fragment="convert it to safetensors"),
        c("npy-structured-object", ff.npy_bytes(ff.npy_header([("a", "<f4"), ("b", "|O")])),
          "object_array"),
        c("npy-negative-shape", ff.npy_bytes(shape((-1,)), F4x4), "bad_shape"),
        c("npy-zero-size-huge-dim", ff.npy_bytes(shape((2**63, 0))), "bad_shape"),
        c("npy-overflowing-shape", ff.npy_bytes(shape((2**62, 2**62))), "too_large"),
        c("npy-rank-17", ff.npy_bytes(shape((1,) * 17), F4x4[:4]), "rank_too_large"),
        c("npy-fortran-not-bool", ff.npy_bytes(ff.npy_header(fortran=1), F4x4), "bad_header"),
        c("npy-past-eof", ff.npy_bytes(HEADER, F4x4[:8]), "data_size_mismatch",
          fragment="truncated"),
        c("npy-trailing-bytes", ff.npy_bytes(HEADER, F4x4 + b"x"), "data_size_mismatch",
          fragment="trailing"),
        c("npy-version-9", ff.npy_bytes(HEADER, F4x4, version=(9, 0)), "unsupported_version"),
        c("npy-empty", b"", "file_too_small"),
        *(c(f"npy-valid-{key}", ff.npy_of(array)) for key, array in ARRAYS.items()),
        c("npy-valid-fortran", ff.npy_of(np.asfortranarray(np.ones((2, 3), "<i4")))),
        c("npy-valid-big-endian", ff.npy_of(np.arange(4, dtype=">f4"))),
        c("npy-valid-scalar", ff.npy_of(np.array(2.5, dtype=np.float32))),
        c("npy-valid-empty", ff.npy_of(np.zeros((0, 4), dtype=np.float32))),
        c("npy-valid-v2", ff.npy_version(np.arange(3, dtype=np.int32), (2, 0))),
        c("npy-valid-v3", ff.npy_version(np.arange(3, dtype=np.int16), (3, 0))),
    ]  # fmt: skip


def _npz_cases() -> list[Case]:
    c = _maker("npz", "arrays.npz")
    member = ff.npy_of(np.arange(4, dtype=np.float32))
    one = lambda content, name="a.npy": ff.zip_bytes([(name, content)])  # noqa: E731
    return [
        c("npz-member-not-npy", one(member, "weights.txt"), "bad_member_name"),
        c("npz-path-traversal", one(member, "../evil.npy"), "bad_member_name"),
        c("npz-member-in-folder", one(member, "sub/a.npy"), "bad_member_name"),
        c("npz-duplicate-members", ff.duplicate_members_zip, "duplicate_key"),
        c("npz-too-many-members", ff.zip_bytes([(f"{n}.npy", member) for n in "abcd"]),
          "too_many_tensors", caps=SMALL_CAPS),
        c("npz-zip64-claims-2^40-members", ff.zip64_end_claiming(2**40), "too_many_tensors"),
        c("npz-zip-bomb", _bomb, "compression_ratio", fragment="zip bomb"),
        c("npz-aggregate-zip-bomb", _aggregate_bomb, "compression_ratio", fragment="100 members"),
        c("npz-overlapping-members", ff.overlapping_npz(np.zeros(4), 3), "overlapping_members"),
        c("npz-object-member", one(ff.npy_of(np.array([None]), allow_pickle=True)),
          "object_array"),
        c("npz-pickle-member", one(ff.pickled(4)), "code_bearing_format"),
        c("npz-member-size-mismatch", one(member + b"xx"), "data_size_mismatch"),
        c("npz-member-header-over-cap", one(ff.npy_bytes(HEADER, length=60_000)),
          "header_too_large"),
        c("npz-member-negative-shape", one(ff.npy_bytes(ff.npy_header(shape=(-1,)), F4x4)),
          "bad_shape"),
        c("npz-bzip2-member", ff.zip_bytes([("a.npy", member)], zipfile.ZIP_BZIP2),
          "unsupported_compression"),
        c("npz-truncated", ff.npz_of({"a": np.zeros(3)})[:-10], "bad_zip"),
        c("npz-directory-past-eof", ff.npz_directory_past_eof, "bad_zip"),
        c("npz-bad-crc", ff.zip_with_bad_crc, load_code="file_changed"),
        c("npz-valid-stored", ff.npz_of(ARRAYS)),
        c("npz-valid-deflated", ff.npz_of(ARRAYS, compressed=True)),
        c("npz-valid-empty-and-scalar",
          ff.npz_of({"empty": np.zeros((0, 3)), "scalar": np.array(7, dtype=np.int64)})),
        c("npz-valid-no-members", ff.npz_of({})),
    ]  # fmt: skip


def _gguf_cases() -> list[Case]:
    c = _maker("gguf", "model.gguf")
    string = ff.gguf_string
    u32 = (4).to_bytes(4, "little")
    return [
        c("gguf-53-byte-array-bomb", ff.gguf_bytes([ARRAY_BOMB], pad=False), "array_too_long"),
        c("gguf-string-over-cap", _gguf_kv("k", ff.STRING, string("x", length=2**40)),
          "string_too_long"),
        c("gguf-string-beyond-file", _gguf_kv("k", ff.STRING, string("x", length=1000)),
          "header_beyond_file"),
        c("gguf-header-over-cap", _gguf_kv("k", ff.STRING, string("x" * 2000)),
          "header_too_large", caps=SMALL_CAPS),
        c("gguf-too-many-tensors", ff.gguf_bytes(tensor_count=2**60), "too_many_tensors"),
        c("gguf-too-many-keys", ff.gguf_bytes(kv_count=2**60), "too_many_keys"),
        c("gguf-deep-nesting", _gguf_kv("n", ff.ARRAY, NESTED), "nesting_too_deep"),
        c("gguf-bad-value-type", _gguf_kv("k", 99, b""), "bad_value_type"),
        c("gguf-key-not-utf8", _gguf_kv(b"\xff", ff.U8, b"\0"), "header_not_utf8"),
        c("gguf-utf16-key", _gguf_kv("key".encode("utf-16"), ff.U8, b"\0"), "header_not_utf8"),
        c("gguf-duplicate-key",
          ff.gguf_bytes([ff.gguf_kv("k", ff.U8, b"\0"), ff.gguf_kv("k", ff.U8, b"\1")]),
          "duplicate_key"),
        c("gguf-duplicate-tensor",
          ff.gguf_bytes([], [ff.gguf_tensor("t", [4], ff.GGML_F32, 0)] * 2, bytes(48)),
          "duplicate_key"),
        c("gguf-bool-not-0-or-1", _gguf_kv("b", ff.BOOL, b"\7"), "bad_value"),
        c("gguf-unknown-type", _gguf_one([4], 4, 16), "unknown_dtype"),
        c("gguf-rank-5", _gguf_one([1] * 5, data=4), "rank_too_large"),
        c("gguf-negative-dim", _gguf_one([2**64 - 1]), "bad_shape"),
        c("gguf-overflowing-dims", _gguf_one([2**31] * 3), "too_large"),
        c("gguf-rank-0-quantised", _gguf_one([], ff.GGML_Q4_K), "bad_shape", fragment="rank-0"),
        c("gguf-block-misfit", _gguf_one([100], ff.GGML_Q4_K, 144), "bad_shape"),
        c("gguf-misaligned-offset", _gguf_offsets((0, 20)), "bad_offsets"),
        c("gguf-offsets-out-of-order", _gguf_offsets((32, 0)), "offsets_not_contiguous"),
        c("gguf-offsets-overlap", _gguf_offsets((0, 0)), "offsets_not_contiguous"),
        c("gguf-offsets-gap", _gguf_offsets((0, 64), 80), "offsets_not_contiguous"),
        c("gguf-past-eof", ff.gguf_bytes([], F32_INFOS, F32_DATA[:-4]), "data_size_mismatch",
          fragment="truncated"),
        c("gguf-trailing-bytes", ff.gguf_bytes([], F32_INFOS, F32_DATA + bytes(100)),
          "data_size_mismatch", fragment="trailing"),
        c("gguf-alignment-48", _gguf_kv("general.alignment", ff.U32, (48).to_bytes(4, "little")),
          "bad_alignment"),
        c("gguf-alignment-0", _gguf_kv("general.alignment", ff.U32, bytes(4)), "bad_alignment"),
        c("gguf-alignment-string", _gguf_kv("general.alignment", ff.STRING, string("32")),
          "bad_alignment"),
        c("gguf-alignment-u8", _gguf_kv("general.alignment", ff.U8, u32[:1]), "bad_alignment"),
        c("gguf-version-1", ff.gguf_bytes(version=1), "unsupported_version"),
        c("gguf-big-endian", ff.gguf_bytes(version=3 << 24), "unsupported_version",
          fragment="big-endian"),
        c("gguf-truncated-prefix", b"GGUF\x03\x00", "file_too_small"),
        c("gguf-empty", b"", "file_too_small"),
        c("gguf-valid-mixed", lambda: ff.gguf_written(ff.gguf_mixed)),
        c("gguf-valid-aligned-64", lambda: ff.gguf_written(ff.gguf_mixed, alignment=64)),
        c("gguf-valid-nested-metadata", lambda: ff.gguf_written(ff.gguf_nested)),
        c("gguf-valid-no-tensors", lambda: ff.gguf_written(lambda writer: None)),
    ]  # fmt: skip


def _budget_cases() -> list[Case]:
    c = _maker("budget", "huge")
    return [
        c("st-sparse-100gb", ST_SPARSE, "over_budget", filename="huge.safetensors",
          **_sparse(ST_SPARSE)),
        c("npy-sparse-100gb", NPY_SPARSE, "over_budget", filename="huge.npy",
          **_sparse(NPY_SPARSE)),
        c("gguf-sparse-100gb", GGUF_SPARSE, "over_budget", filename="huge.gguf",
          **_sparse(GGUF_SPARSE)),
        c("npz-bomb-over-budget", ff.zeros_bomb("zeros.npy", 1 << 20, SPARSE_BYTES), "over_budget",
          filename="bomb.npz", budget_bytes=SPARSE_BUDGET, fragment="budget"),
    ]  # fmt: skip


def _code_bearing_cases() -> list[Case]:
    c = _maker("code_bearing", "model.pkl")
    code = "code_bearing_format"
    hint = "convert it to safetensors"
    keep = ff.zip_bytes([("a.npy", ff.npy_of(np.zeros(2))), ("extra.pkl", ff.pickled(4))])
    return [
        *(c(f"pickle-protocol-{p}", ff.pickled(p), code, fragment=hint) for p in range(6)),
        *(c(f"pickle-as{ext}", ff.pickled(2), code, filename=f"model{ext}")
          for ext in (".pt", ".pth", ".bin", ".ckpt")),
        *(c(f"disguised-pickle{ext}", ff.pickled(4), code, filename=f"model{ext}",
            fragment=f"named {ext}")
          for ext in (".safetensors", ".npy", ".npz", ".gguf")),
        c("torch-zip.pt", ff.torch_zip(), code, filename="model.pt", fragment="data.pkl"),
        c("torch-zip.bin", ff.torch_zip("pytorch_model"), code, filename="pytorch_model.bin"),
        c("torch-zip-as.npz", ff.torch_zip(), code, filename="model.npz"),
        c("zip-with-pickle-member", keep, code, filename="arrays.npz"),
        c("keras-archive", ff.keras_zip(), code, filename="model.keras", fragment="Keras"),
        c("keras-zip-as.zip", ff.keras_zip(), code, filename="model.zip"),
        c("hdf5.h5", ff.hdf5(), code, filename="model.h5", fragment="HDF5"),
        c("hdf5-userblock.hdf5", ff.hdf5(userblock=512), code, filename="model.hdf5"),
        c("hdf5-as.safetensors", ff.hdf5(), code, filename="model.safetensors"),
    ]  # fmt: skip


def _mismatch_cases() -> list[Case]:
    c = _maker("mismatch", "model.npy")
    code = "format_mismatch"
    st = raw_file({"t": U8x4}, bytes(4))
    npy = ff.npy_of(np.zeros(3, np.float32))
    return [
        c("safetensors-named.npy", st, code, fragment="named .npy"),
        c("safetensors-named.pt", st, code, filename="model.pt"),
        c("npy-named.gguf", npy, code, filename="model.gguf", fragment="content is a NumPy"),
        c("gguf-named.safetensors", ff.gguf_bytes(), code, filename="model.safetensors"),
        c("npz-named.npy", ff.npz_of({"a": np.zeros(2)}), code),
        c("declared-npy-is-safetensors", st, code, filename="model.safetensors",
          declared=ModelFormat.NPY, fragment="declares npy"),
    ]  # fmt: skip


def _unknown_cases() -> list[Case]:
    c = _maker("unknown", "model.dat")
    noise = np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    return [
        c("random-bytes.dat", noise, "unknown_format"),
        c("random-bytes.bin", b"\x01" + noise, "unknown_format", filename="model.bin"),
        c("empty.dat", b"", "unknown_format"),
        c("text-file", b"hello, world\n", "unknown_format", filename="README.txt"),
    ]


#: Every case, by group.
CORPUS: list[Case] = [
    *_safetensors_cases(),
    *_npy_cases(),
    *_npz_cases(),
    *_gguf_cases(),
    *_budget_cases(),
    *_code_bearing_cases(),
    *_mismatch_cases(),
    *_unknown_cases(),
]


def write_corpus(folder: Path) -> dict[str, Path]:
    """Write every case into ``folder/<case id>/``; return the paths by case id."""
    paths = {}
    for case in CORPUS:
        (folder / case.id).mkdir(parents=True, exist_ok=True)
        paths[case.id] = case.write(folder / case.id)
    return paths


if __name__ == "__main__":
    for case_id, path in write_corpus(Path(sys.argv[1] if len(sys.argv) > 1 else ".")).items():
        print(f"{case_id}\t{path}")
