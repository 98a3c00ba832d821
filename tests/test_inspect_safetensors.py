"""Header inspection of safetensors files, and opening model files safely."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

from loadwarden.producer.contract import ModelFormat
from loadwarden.producer.errors import InvalidModel, SourceRefused, SourceUnavailable
from loadwarden.worker._files import ModelFile, open_model_file
from loadwarden.worker.config import InspectionCaps
from loadwarden.worker.formats.safetensors import SafetensorsHeader, inspect_safetensors
from tests.safetensors_files import entry, one_tensor, raw_file, valid_model, write

CAPS = InspectionCaps(
    max_header_bytes=1024 * 1024,
    max_tensors=3,
    max_rank=4,
    max_total_bytes=1024,
    max_metadata_entries=2,
)
NUMPY_NAMES = {
    np.dtype(np.float64): "F64",
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(np.int64): "I64",
    np.dtype(np.uint8): "U8",
    np.dtype(np.bool_): "BOOL",
    np.dtype(np.complex64): "C64",
}
U8_4 = entry("U8", [4], 0, 4)


def inspect_file(path: str | os.PathLike[str], caps: InspectionCaps = CAPS) -> SafetensorsHeader:
    with open_model_file(path) as model:
        return inspect_safetensors(model.fd, model.size, caps)


def inspect_bytes(tmp_path: Path, content: bytes, caps: InspectionCaps = CAPS) -> SafetensorsHeader:
    return inspect_file(write(tmp_path / "model.safetensors", content), caps)


def case(case_id: str, content: bytes, code: str, fragment: str) -> Any:
    return pytest.param(content, code, fragment, id=case_id)


DEFECTS = [
    case("empty-file", b"", "file_too_small", "0 bytes"),
    case("seven-bytes", b"\x02\x00\x00\x00\x00\x00\x00", "file_too_small", "7 bytes"),
    case("length-zero", raw_file(b""), "file_too_small", "header length 0"),
    case("length-one", raw_file(b"{"), "file_too_small", "header length 1"),
    case(
        "over-cap",
        raw_file(b"{}", length=CAPS.max_header_bytes + 1),
        "header_too_large",
        f"over the cap of {CAPS.max_header_bytes}",
    ),
    case("beyond-file", raw_file(b"{}", length=100), "header_beyond_file", "header length 100"),
    case("bad-byte", raw_file(b'{"\xff":1}'), "header_not_utf8", "invalid start byte"),
    case("utf16", raw_file("{}".encode("utf-16")), "header_not_utf8", "not UTF-8"),
    case("utf8-bom", raw_file(b"\xef\xbb\xbf{}"), "header_not_utf8", "byte order mark"),
    case("encoded-surrogate", raw_file(b'{"\xed\xa0\x80":1}'), "header_not_utf8", "not UTF-8"),
    case("escaped-surrogate", raw_file('{"\\ud800":1}'), "header_not_utf8", "surrogate"),
    case("cut-json", raw_file('{"t":'), "header_not_json", "not valid JSON"),
    case("trailing-junk", raw_file("{}x"), "header_not_json", "Extra data"),
    case(
        "deep-nesting",
        raw_file('{"t":' + "[" * 10**5 + "]" * 10**5 + "}"),
        "header_not_json",
        "nested too deeply",
    ),
    case(
        "huge-int",
        raw_file('{"t":{"dtype":"U8","shape":[' + "9" * 5000 + "]}}"),
        "header_not_json",
        "too many digits",
    ),
    case("array", raw_file("[]"), "header_not_object", "'['"),
    # JSON whitespace may pad the header (see test_dtypes.py); nothing else may.
    case("leading-form-feed", raw_file("\f{}"), "header_not_object", "'\\x0c'"),
    case("leading-nbsp", raw_file("\u00a0{}"), "header_not_object", "'\\xa0'"),
    case("only-spaces", raw_file("    "), "header_not_object", "' '"),
    case("trailing-nul", raw_file("{}\x00"), "header_not_json", "Extra data"),
    case("trailing-vertical-tab", raw_file("{}\v"), "header_not_json", "Extra data"),
    case("number", raw_file("12"), "header_not_object", "'1'"),
    case(
        "dup-tensor",
        raw_file(f'{{"t":{json.dumps(U8_4)},"t":{json.dumps(U8_4)}}}', b"1234"),
        "duplicate_key",
        "'t'",
    ),
    case(
        "dup-field",
        raw_file('{"t":{"dtype":"U8","dtype":"U8","shape":[4],"data_offsets":[0,4]}}', b"1234"),
        "duplicate_key",
        "'dtype'",
    ),
    case("dup-metadata", raw_file('{"__metadata__":{"k":"a","k":"b"}}'), "duplicate_key", "'k'"),
    case(
        "nan",
        raw_file('{"t":{"dtype":"U8","shape":[NaN],"data_offsets":[0,4]}}'),
        "non_finite_number",
        "NaN",
    ),
    case("infinity", raw_file('{"__metadata__":{"k":-Infinity}}'), "non_finite_number", "Infinity"),
    case("overflow", raw_file('{"__metadata__":{"k":1e400}}'), "non_finite_number", "1e400"),
    case("metadata-list", raw_file({"__metadata__": ["a"]}), "bad_metadata", "is an array"),
    case("metadata-null", raw_file({"__metadata__": None}), "bad_metadata", "is null"),
    case(
        "metadata-int",
        raw_file({"__metadata__": {"k": 1}}),
        "bad_metadata",
        "__metadata__['k'] is a number",
    ),
    case(
        "metadata-many",
        raw_file({"__metadata__": {"a": "", "b": "", "c": ""}}),
        "bad_metadata",
        "3 entries",
    ),
    case("entry-list", raw_file({"t": [1]}), "bad_tensor_entry", "'t' is an array"),
    case(
        "no-dtype",
        raw_file({"t": {"shape": [0], "data_offsets": [0, 0]}}),
        "bad_tensor_entry",
        "has no dtype",
    ),
    case(
        "no-offsets",
        raw_file({"t": {"dtype": "U8", "shape": [0]}}),
        "bad_tensor_entry",
        "has no data_offsets",
    ),
    case("extra-field", one_tensor(offset=0), "bad_tensor_entry", "unknown fields ['offset']"),
    case("empty-name", raw_file({"": U8_4}, b"1234"), "bad_tensor_entry", "'' has 0 characters"),
    case("long-name", raw_file({"n" * 1025: U8_4}, b"1234"), "bad_tensor_entry", "1025"),
    case("torch-name", one_tensor(dtype="F8_E4M3FN"), "unknown_dtype", "not a safetensors dtype"),
    case(
        "f4-odd", raw_file({"t": entry("F4", [3], 0, 2)}, b"12"), "not_whole_bytes", "3 F4 elements"
    ),
    case(
        "f6-six",
        raw_file({"t": entry("F6_E3M2", [6], 0, 5)}, bytes(5)),
        "not_whole_bytes",
        "4 elements per 3 bytes",
    ),
    case(
        "f4-bytewise",
        raw_file({"t": entry("F4", [4], 0, 4)}, b"1234"),
        "size_mismatch",
        "needs 2 bytes",
    ),
    case(
        "f6-bytewise",
        raw_file({"t": entry("F6_E2M3", [4], 0, 4)}, b"1234"),
        "size_mismatch",
        "needs 3 bytes",
    ),
    case(
        "bf16-bytewise",
        raw_file({"t": entry("BF16", [2], 0, 2)}, b"12"),
        "size_mismatch",
        "needs 4 bytes",
    ),
    case("numpy-name", one_tensor(dtype="float32"), "unknown_dtype", "not a safetensors dtype"),
    case("lower-case", one_tensor(dtype="u8"), "unknown_dtype", "'u8'"),
    case("dtype-int", one_tensor(dtype=1), "unknown_dtype", "dtype 1"),
    case("shape-string", one_tensor(shape="4"), "bad_shape", "not a list"),
    case("shape-bool", one_tensor(shape=[True]), "bad_shape", "True"),
    case("shape-float", one_tensor(shape=[4.0]), "bad_shape", "4.0"),
    case("shape-negative", one_tensor(shape=[-4]), "bad_shape", "-4"),
    case("shape-null", one_tensor(shape=[None]), "bad_shape", "None"),
    case("shape-u64", one_tensor(shape=[2**64]), "bad_shape", f"{2**64} is not an integer"),
    case("shape-huge-string", one_tensor(shape="x" * 10**5), "bad_shape", "xxx... is not a list"),
    case("rank-5", one_tensor(shape=[1, 1, 1, 1, 4]), "rank_too_large", "rank 5"),
    case("offsets-one", one_tensor(data_offsets=[0]), "bad_offsets", "[0]"),
    case("offsets-three", one_tensor(data_offsets=[0, 4, 4]), "bad_offsets", "[0, 4, 4]"),
    case("offsets-negative", one_tensor(data_offsets=[-1, 3]), "bad_offsets", "[-1, 3]"),
    case("offsets-bool", one_tensor(data_offsets=[False, 4]), "bad_offsets", "False"),
    case("offsets-float", one_tensor(data_offsets=[0, 4.0]), "bad_offsets", "4.0"),
    case("offsets-u64", one_tensor(data_offsets=[0, 2**64]), "bad_offsets", "in [0, 2**64)"),
    case("offsets-reversed", one_tensor(data_offsets=[4, 0]), "bad_offsets", "begin 4 > end 0"),
    case(
        "short-span",
        raw_file({"t": entry("U8", [4], 0, 3)}, b"123"),
        "size_mismatch",
        "needs 4 bytes",
    ),
    case("itemsize", raw_file({"t": entry("F32", [2], 0, 4)}, b"1234"), "size_mismatch", "span 4"),
    case(
        "starts-late",
        raw_file({"t": entry("U8", [4], 4, 8)}, b"12345678"),
        "offsets_not_contiguous",
        "4-byte gap between the start of the data and tensor 't'",
    ),
    case(
        "overlap",
        raw_file({"a": U8_4, "b": entry("U8", [4], 2, 6)}, b"123456"),
        "offsets_not_contiguous",
        "'b' at data_offsets [2, 6] overlaps tensor 'a'",
    ),
    case(
        "gap",
        raw_file({"a": U8_4, "b": entry("U8", [4], 5, 9)}, b"123456789"),
        "offsets_not_contiguous",
        "1-byte gap between tensor 'a' (ends at byte 4) and tensor 'b'",
    ),
    case("truncated", raw_file({"t": U8_4}, b"123"), "data_size_mismatch", "truncated"),
    case("trailing", raw_file({"t": U8_4}, b"12345"), "data_size_mismatch", "trailing bytes"),
    case("empty-set-data", raw_file("{}", b"1"), "data_size_mismatch", "trailing bytes"),
    case(
        "four-tensors",
        raw_file({n: entry("U8", [0], 0, 0) for n in "abcd"}),
        "too_many_tensors",
        "4 tensors",
    ),
    case("huge-shape", one_tensor(shape=[2**62, 2**62]), "too_large", "over the cap of 1024"),
    case(
        "total",
        raw_file(
            {"a": entry("U8", [600], 0, 600), "b": entry("U8", [600], 600, 1200)}, bytes(1200)
        ),
        "too_large",
        "1200 bytes",
    ),
]

CODES = {
    "file_too_small",
    "header_too_large",
    "header_beyond_file",
    "header_not_utf8",
    "header_not_json",
    "header_not_object",
    "duplicate_key",
    "non_finite_number",
    "bad_metadata",
    "bad_tensor_entry",
    "unknown_dtype",
    "bad_shape",
    "rank_too_large",
    "bad_offsets",
    "size_mismatch",
    "not_whole_bytes",
    "offsets_not_contiguous",
    "data_size_mismatch",
    "too_many_tensors",
    "too_large",
}


@pytest.mark.parametrize(("content", "code", "fragment"), DEFECTS)
def test_defect_is_rejected_with_its_code(
    tmp_path: Path, content: bytes, code: str, fragment: str
) -> None:
    """Each header defect raises InvalidModel with its code and a short message naming it."""
    with pytest.raises(InvalidModel) as info:
        inspect_bytes(tmp_path, content)
    assert info.value.code == code
    assert fragment in info.value.message
    assert len(info.value.message) < 300


def test_every_code_has_a_case() -> None:
    """The defect table covers every code the inspector documents."""
    assert {p.values[1] for p in DEFECTS} == CODES


def model_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "w.f32": rng.standard_normal((3, 5)).astype(np.float32),
        "w.f16": rng.standard_normal(7).astype(np.float16),
        "w.f64": np.array([[1.5, -2.0]]),
        "ids": np.arange(6, dtype=np.int64).reshape(2, 3),
        "bytes": np.arange(10, dtype=np.uint8),
        "mask": np.array([True, False, True]),
        "z": (np.arange(4) + 1j).astype(np.complex64),
        "scalar": np.array(3.0, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }


def test_valid_model_matches_the_loader(tmp_path: Path) -> None:
    """A multi-dtype model's summary agrees with what safetensors.numpy loads."""
    path = valid_model(tmp_path / "m.safetensors", model_arrays(), {"author": "test"})
    summary = inspect_file(path, InspectionCaps()).summary
    loaded = load_file(path)
    expected = {name: (NUMPY_NAMES[a.dtype], list(a.shape), a.nbytes) for name, a in loaded.items()}
    assert {t.name: (t.dtype, t.shape, t.bytes) for t in summary.tensors} == expected
    assert summary.format is ModelFormat.SAFETENSORS
    assert summary.sha256 is None
    assert summary.metadata == {"author": "test"}
    assert summary.parameters == sum(a.size for a in loaded.values())
    assert summary.bytes == sum(a.nbytes for a in loaded.values())
    assert summary.dtypes == {
        "BOOL": 3,
        "C64": 4,
        "F16": 7,
        "F32": 16,
        "F64": 2,
        "I64": 6,
        "U8": 10,
    }


def test_layout_figures_match_the_file(tmp_path: Path) -> None:
    """header_bytes, data_offset and file_bytes describe the file, tensors in offset order."""
    path = valid_model(tmp_path / "m.safetensors", model_arrays())
    result = inspect_file(path, InspectionCaps())
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        assert int.from_bytes(f.read(8), "little") == result.header_bytes
        header = json.loads(f.read(result.header_bytes))
    assert result.data_offset == 8 + result.header_bytes
    assert result.summary.file_bytes == size
    assert result.summary.bytes == size - result.data_offset
    by_offset = sorted(header.items(), key=lambda kv: (kv[1]["data_offsets"], kv[0]))
    assert [t.name for t in result.summary.tensors] == [name for name, _ in by_offset]


@pytest.mark.parametrize(
    ("content", "tensors", "metadata"),
    [
        pytest.param(raw_file("{}"), 0, {}, id="empty-object"),
        pytest.param(raw_file("{}      "), 0, {}, id="space-padding"),
        pytest.param(raw_file({"__metadata__": {"k": "v"}}), 0, {"k": "v"}, id="metadata-only"),
        pytest.param(
            raw_file(
                {"a": entry("U8", [0], 0, 0), "b": entry("F32", [2, 0], 0, 0), "c": U8_4}, b"1234"
            ),
            3,
            {},
            id="zero-size-shared-offset",
        ),
        pytest.param(raw_file({"s": entry("U8", [], 0, 1)}, b"1"), 1, {}, id="scalar"),
    ],
)
def test_valid_edge_case_is_accepted(
    tmp_path: Path, content: bytes, tensors: int, metadata: dict[str, str]
) -> None:
    """Empty sets, space padding, zero-size tensors and scalars are valid, as for the loader."""
    summary = inspect_bytes(tmp_path, content).summary
    assert len(summary.tensors) == tensors == len(load_file(tmp_path / "model.safetensors"))
    assert summary.metadata == metadata
    assert summary.bytes == len(content) - 8 - int.from_bytes(content[:8], "little")


@pytest.fixture
def pread_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the byte count of every os.pread the inspector makes."""
    calls: list[int] = []
    real = os.pread

    def recording(fd: int, count: int, offset: int) -> bytes:
        calls.append(count)
        return real(fd, count, offset)

    monkeypatch.setattr(os, "pread", recording)
    return calls


@pytest.mark.parametrize(
    ("declared", "caps", "code"),
    [
        pytest.param(2**40, InspectionCaps(), "header_too_large", id="over-cap"),
        pytest.param(
            2**40, InspectionCaps(max_header_bytes=2**41), "header_beyond_file", id="beyond-file"
        ),
    ],
)
def test_declared_length_is_checked_before_reading(
    tmp_path: Path, pread_calls: list[int], declared: int, caps: InspectionCaps, code: str
) -> None:
    """A declared header length over the cap or past the file is rejected after 8 bytes read."""
    with pytest.raises(InvalidModel) as info:
        inspect_bytes(tmp_path, raw_file(b"", length=declared), caps)
    assert info.value.code == code
    assert pread_calls == [8]


def test_valid_file_reads_only_prefix_and_header(tmp_path: Path, pread_calls: list[int]) -> None:
    """Inspection reads 8 + N bytes and never touches tensor data."""
    path = valid_model(tmp_path / "m.safetensors", model_arrays())
    result = inspect_file(path, InspectionCaps())
    assert sum(pread_calls) == 8 + result.header_bytes


def test_sparse_file_is_checked_against_its_real_size(tmp_path: Path) -> None:
    """A header claiming more data than the file holds is rejected; nothing is read from it."""
    content = raw_file({"t": entry("U8", [2**30], 0, 2**30)})
    path = write(tmp_path / "sparse.safetensors", content)
    os.truncate(path, len(content) + 2**20)
    with pytest.raises(InvalidModel) as info:
        inspect_file(path, InspectionCaps())
    assert info.value.code == "data_size_mismatch"
    assert "truncated" in info.value.message


# open_model_file


def test_regular_file_opens_read_only_and_blocking(tmp_path: Path) -> None:
    """A regular file opens with its identity, blocking, close-on-exec and read-only."""
    path = write(tmp_path / "m.safetensors", raw_file("{}"))
    with open_model_file(path) as model:
        st = os.stat(path)
        assert (model.path, model.size, model.dev, model.ino, model.mtime_ns) == (
            path,
            st.st_size,
            st.st_dev,
            st.st_ino,
            st.st_mtime_ns,
        )
        flags = fcntl.fcntl(model.fd, fcntl.F_GETFL)
        assert not flags & os.O_NONBLOCK
        assert flags & os.O_ACCMODE == os.O_RDONLY
        assert not os.get_inheritable(model.fd)
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(model.fd)


def test_close_twice_does_nothing_the_second_time(tmp_path: Path) -> None:
    """A second close neither raises nor closes a descriptor number reused since."""
    model = open_model_file(write(tmp_path / "m", b"x"))
    model.close()
    reused = os.open(os.devnull, os.O_RDONLY)
    try:
        model.close()
        os.fstat(reused)
    finally:
        os.close(reused)


def test_close_ignores_an_already_closed_descriptor(tmp_path: Path) -> None:
    """close() ignores EBADF when somebody else closed the descriptor first."""
    model = open_model_file(write(tmp_path / "m", b"x"))
    os.close(model.fd)
    model.close()


def make_fifo(tmp_path: Path) -> str:
    os.mkfifo(tmp_path / "pipe")
    return str(tmp_path / "pipe")


def make_symlink(tmp_path: Path) -> str:
    target = write(tmp_path / "real.safetensors", raw_file("{}"))
    os.symlink(target, tmp_path / "link.safetensors")
    return str(tmp_path / "link.safetensors")


def make_socket(tmp_path: Path) -> str:
    path = str(tmp_path / "sock")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(path)
    return path


def make_dangling_symlink(tmp_path: Path) -> str:
    os.symlink("/nonexistent/target", tmp_path / "dangling")
    return str(tmp_path / "dangling")


@pytest.mark.parametrize(
    ("make", "code", "fragment"),
    [
        pytest.param(make_fifo, "not_regular_file", "FIFO", id="fifo"),
        pytest.param(make_socket, "not_regular_file", "socket", id="socket"),
        pytest.param(make_symlink, "symlink", "symlink", id="symlink"),
        pytest.param(make_dangling_symlink, "symlink", "symlink", id="dangling-symlink"),
        pytest.param(str, "not_regular_file", "directory", id="directory"),
        pytest.param(lambda p: os.devnull, "not_regular_file", "character device", id="dev-null"),
    ],
)
def test_special_file_is_refused_without_opening(
    tmp_path: Path, make: Any, code: str, fragment: str
) -> None:
    """Symlinks, FIFOs, sockets, directories and devices are refused before any open."""
    path = make(tmp_path)
    with pytest.raises(SourceRefused) as info:
        open_model_file(path)
    assert info.value.code == code
    assert fragment in info.value.message
    assert repr(path) in info.value.message


def test_missing_file_is_unavailable(tmp_path: Path) -> None:
    """A missing file (or a missing directory on its path) is SourceUnavailable not_found."""
    for path in (tmp_path / "absent", tmp_path / "absent" / "model"):
        with pytest.raises(SourceUnavailable) as info:
            open_model_file(path)
        assert info.value.code == "not_found"
        assert str(path) in info.value.message


def test_permission_error_is_unreadable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A path the worker may not stat is SourceUnavailable unreadable."""

    def denied(path: str) -> os.stat_result:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(os, "lstat", denied)
    with pytest.raises(SourceUnavailable) as info:
        open_model_file(tmp_path / "m")
    assert info.value.code == "unreadable"
    assert "Permission denied" in info.value.message


def test_model_file_is_a_frozen_value(tmp_path: Path) -> None:
    """ModelFile fields cannot be reassigned."""
    with open_model_file(write(tmp_path / "m", b"x")) as model:
        assert isinstance(model, ModelFile)
        assert stat.S_ISREG(os.fstat(model.fd).st_mode)
        with pytest.raises(AttributeError):
            model.fd = 0  # type: ignore[misc]
