"""Every safetensors dtype: the one description, bit-exact loads in real children, the
reference reader's size and whitespace rules."""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save

from loadwarden.producer.contract import LoadReport, LoadRequest, ModelFormat, Outcome
from loadwarden.producer.errors import InvalidModel
from loadwarden.worker._files import open_model_file
from loadwarden.worker.binary import dtypes as _dtypes
from loadwarden.worker.config import InspectionCaps
from loadwarden.worker.formats import inspect_model
from loadwarden.worker.load.supervisor import Supervisor
from loadwarden.worker.sandbox import _linux, _regions
from loadwarden.worker.sandbox._registry import FileChanged
from loadwarden.worker.sandbox.loaders import read_gguf, read_safetensors
from tests.conftest import TEST_LOADERS
from tests.format_files import gguf_mixed, gguf_written
from tests.safetensors_files import ALL_DTYPES, entry, raw_file, sample, tensors_file, write
from tests.sandbox_loaders import describe_array

pytestmark = pytest.mark.timeout(120)

LOADWARDEN = str(Path(sys.executable).parent / "loadwarden")
#: Shapes whose element counts fill whole bytes for every dtype (F6 needs a multiple of 4).
SHAPES: dict[str, list[int]] = {"matrix": [4, 8], "odd_last_dim": [4, 3], "empty": [0, 5]}


def every_dtype(rng: np.random.Generator) -> dict[str, tuple[str, list[int], bytes, np.ndarray]]:
    """One tensor per dtype and shape: name -> (dtype, shape, bytes, the array to expect)."""
    tensors = {}
    for dtype in ALL_DTYPES:
        for label, shape in SHAPES.items():
            raw, array = sample(dtype, shape, rng)
            tensors[f"{dtype.lower()}.{label}"] = (dtype, shape, raw, array)
    return tensors


@pytest.fixture
def every_dtype_model(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A model with every dtype, its header padded before and after with JSON whitespace,
    its metadata describing every array a loader must give back (for ``verify_arrays``)."""
    tensors = every_dtype(np.random.default_rng(0))
    metadata = {name: describe_array(t[3]) for name, t in tensors.items()}
    content = tensors_file(
        {name: (d, s, raw) for name, (d, s, raw, _) in tensors.items()},
        metadata,
        pad_before="\n\t  ",
    )
    path = Path(write(tmp_path / "every-dtype.safetensors", content))
    return path, {name: t[3] for name, t in tensors.items()}


def inspect_path(path: Path) -> Any:
    with open_model_file(path) as model:
        return inspect_model(
            model.fd, model.size, path=str(path), declared=None, caps=InspectionCaps()
        )


def reference_accepts(path: Path) -> bool:
    """Whether the safetensors library itself parses and validates the header."""
    try:
        with safe_open(str(path), framework="numpy") as handle:
            handle.keys()
    except Exception:
        return False
    return True


def we_accept(path: Path) -> bool:
    try:
        inspect_path(path)
    except InvalidModel:
        return False
    return True


@pytest.fixture
def model_fd(tmp_path: Path) -> Iterator[Any]:
    """Open a file's bytes read-only; closed at the end."""
    fds: list[int] = []

    def open_bytes(content: bytes) -> int:
        fds.append(os.open(write(tmp_path / "m.safetensors", content), os.O_RDONLY))
        return fds[-1]

    yield open_bytes
    for fd in fds:
        os.close(fd)


def test_description_names_every_safetensors_dtype() -> None:
    """The safetensors table holds exactly tensor.rs's dtypes; F4/F6 pack, the rest do not."""
    assert set(_dtypes.SAFETENSORS) == set(ALL_DTYPES)
    packed = {name for name, t in _dtypes.SAFETENSORS.items() if t.array is None}
    assert packed == {"F4", "F6_E2M3", "F6_E3M2"}
    bits = {name: 8 * t.block_bytes // t.block_elements for name, t in _dtypes.SAFETENSORS.items()}
    assert (bits["F4"], bits["F6_E2M3"], bits["F6_E3M2"], bits["BF16"]) == (4, 6, 6, 16)


@pytest.mark.parametrize(
    "kind", [t for t in _dtypes.SAFETENSORS.values() if t.array], ids=lambda t: t.name
)
def test_array_type_is_the_reference_writers(kind: _dtypes.ElementType) -> None:
    """Each array type has the dtype's item size, and the safetensors writer names it our way."""
    target = np.dtype(kind.array)  # resolves by name once ml_dtypes is imported
    assert target.itemsize == kind.block_bytes
    header = save({"t": np.zeros(2, dtype=target)})
    assert f'"dtype":"{kind.name}"'.encode() in header


@pytest.mark.parametrize(
    "table", [_dtypes.NPY.values(), _dtypes.GGML.values()], ids=["npy", "ggml"]
)
def test_other_formats_array_types_resolve(table: Any) -> None:
    """Every npy and ggml array type resolves to a numpy dtype of its item size."""
    for kind in table:
        if kind.array is not None:
            assert np.dtype(kind.array).itemsize == kind.block_bytes, kind


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_every_dtype_reads_back_bit_for_bit(dtype: str, model_fd: Any) -> None:
    """read_safetensors gives each tensor back in its true dtype (F4/F6 packed) and bytes."""
    tensors = {
        label: (dtype, shape, *sample(dtype, shape, np.random.default_rng(1)))
        for label, shape in SHAPES.items()
    }
    fd = model_fd(tensors_file({n: (d, s, raw) for n, (d, s, raw, _) in tensors.items()}))
    loaded = read_safetensors(fd)
    assert [t.name for t, _ in loaded] == list(tensors)
    for tensor, array in loaded:
        expected = tensors[tensor.name][3]
        assert tensor.dtype.name == dtype
        assert array.dtype == expected.dtype
        assert array.shape == expected.shape
        assert array.tobytes() == expected.tobytes()
        assert array.flags.c_contiguous and array.flags.writeable


def test_true_dtypes_hold_the_cast_values(model_fd: Any) -> None:
    """BF16 and FP8 arrays compare equal, as numbers, to the values cast with ml_dtypes."""
    values = np.array([1.0, -2.5, 0.375, 448.0], dtype=np.float32)
    casts = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn}
    tensors = {n: (n, [4], values.astype(t).tobytes()) for n, t in casts.items()}
    for tensor, array in read_safetensors(model_fd(tensors_file(tensors))):
        assert array.dtype == np.dtype(casts[tensor.name])
        np.testing.assert_array_equal(array.astype(np.float32), values)


def test_file_changed_under_the_loader_is_file_changed(model_fd: Any) -> None:
    """A header that no longer checks out when the child re-reads it raises FileChanged."""
    fd = model_fd(raw_file({"t": entry("F4", [3], 0, 2)}, b"12"))
    with pytest.raises(FileChanged, match=r"changed after inspection.*F4"):
        read_safetensors(fd)


PACKED_SIZES = [
    # (dtype, shape, bytes in the file, valid by tensor.rs)
    ("F4", [2], 1, True),
    ("F4", [4, 3], 6, True),  # an odd last dimension is fine: the total count is even
    ("F4", [0], 0, True),
    ("F4", [3], 2, False),  # 12 bits: not whole bytes
    ("F4", [], 1, False),  # a scalar is one element: 4 bits
    ("F4", [1, 5], 3, False),
    ("F4", [4], 4, False),  # a byte per element: twice the size
    ("F4", [4], 1, False),
    ("F6_E2M3", [4], 3, True),
    ("F6_E2M3", [2, 2, 2], 6, True),
    ("F6_E2M3", [2], 2, False),  # 12 bits
    ("F6_E2M3", [6], 5, False),  # 36 bits
    ("F6_E2M3", [4], 4, False),
    ("F6_E3M2", [3, 4], 9, True),
    ("F6_E3M2", [], 1, False),
    ("F6_E3M2", [4], 6, False),
    ("BF16", [3], 6, True),
    ("BF16", [3], 3, False),
    ("F8_E8M0", [5], 5, True),
    ("F8_E5M2FNUZ", [5], 10, False),
]


@pytest.mark.parametrize(
    ("dtype", "shape", "nbytes", "valid"),
    PACKED_SIZES,
    ids=[f"{d}-{s}-{n}B" for d, s, n, _ in PACKED_SIZES],
)
def test_byte_sizes_follow_the_reference_reader(
    tmp_path: Path, dtype: str, shape: list[int], nbytes: int, valid: bool
) -> None:
    """A tensor's byte length is accepted exactly when safetensors itself accepts it."""
    path = Path(write(tmp_path / "m.safetensors", raw_file({"t": entry(dtype, shape, 0, nbytes)},
                                                            bytes(nbytes))))  # fmt: skip
    assert reference_accepts(path) is valid
    assert we_accept(path) is valid
    if not valid:
        with pytest.raises(InvalidModel) as info:
            inspect_path(path)
        assert info.value.code in {"not_whole_bytes", "size_mismatch"}
        assert dtype in info.value.message


WHITESPACE = [
    # (header text, accepted by tensor.rs)
    ("{}", True),
    ("\t\n{}\r ", True),  # the reference's own test_whitespace_leading_padded_header
    ("{}\r \t\n", True),  # and test_whitespace_padded_header
    ("        {}", True),
    ('\n{"__metadata__":{"k":"v"}}\n', True),
    ("\f{}", False),  # form feed: Python's str.strip() whitespace, not JSON's
    ("{}\v", False),
    ("{}\x00\x00", False),  # NUL padding
    ("\u00a0{}", False),  # no-break space
    ("{}\u2003", False),  # em space
    ("\ufeff{}", False),  # a byte order mark
    ("    ", False),
]


@pytest.mark.parametrize(("header", "valid"), WHITESPACE, ids=[repr(h) for h, _ in WHITESPACE])
def test_header_padding_is_accepted_exactly_as_the_reference(
    tmp_path: Path, header: str, valid: bool
) -> None:
    """JSON whitespace (space, tab, LF, CR) may pad the header at either end; nothing else."""
    path = Path(write(tmp_path / "m.safetensors", raw_file(header)))
    assert reference_accepts(path) is valid
    assert we_accept(path) is valid


async def test_every_dtype_loads_in_a_real_child(
    every_dtype_model: tuple[Path, dict[str, np.ndarray]],
) -> None:
    """Supervisor.load reads every dtype in a confined child into the arrays that were written."""
    path, arrays = every_dtype_model
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    async with Supervisor(
        preload=[TEST_LOADERS], loaders={ModelFormat.SAFETENSORS: "verify_arrays"}
    ) as sup:
        report = await sup.load(LoadRequest(source=str(path), sha256=digest))
    assert report.outcome is Outcome.OK, report.error
    assert report.model is not None and report.model.sha256 == digest
    assert set(report.model.dtypes) == set(ALL_DTYPES)
    assert report.model.parameters == sum(
        int(np.prod(s)) for s in [*SHAPES.values()] * len(ALL_DTYPES)
    )
    assert {t.name: t.bytes for t in report.model.tensors} == {
        name: a.nbytes for name, a in arrays.items()
    }


async def test_changed_array_fails_the_verifying_loader(tmp_path: Path) -> None:
    """The verifying loader fails a load whose arrays differ from the metadata (a control)."""
    raw, array = sample("BF16", [4], np.random.default_rng(2))
    wrong = describe_array(array.astype(np.float32))
    path = write(tmp_path / "m.safetensors", tensors_file({"t": ("BF16", [4], raw)}, {"t": wrong}))
    async with Supervisor(
        preload=[TEST_LOADERS], loaders={ModelFormat.SAFETENSORS: "verify_arrays"}
    ) as sup:
        report = await sup.load(LoadRequest(source=path))
    assert report.outcome is not Outcome.OK
    assert report.error is not None and "not what was written" in report.error.message


def test_cli_load_prints_every_dtype(every_dtype_model: tuple[Path, dict[str, np.ndarray]]) -> None:
    """`loadwarden load FILE --json` loads a model of every dtype: ok, every dtype reported."""
    path, arrays = every_dtype_model
    result = subprocess.run(
        [LOADWARDEN, "load", str(path), "--json"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    report = LoadReport.model_validate_json(result.stdout)
    assert report.outcome is Outcome.OK
    assert report.model is not None and set(report.model.dtypes) == set(ALL_DTYPES)
    assert len(report.model.tensors) == len(arrays)


@pytest.mark.parametrize("threads", [1, 3])
def test_pieces_fill_every_byte_whatever_the_threads(
    threads: int, model_fd: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tensors split into many pieces read back whole, from one thread or several."""
    monkeypatch.setattr(_regions, "PIECE_BYTES", 7)
    raw, array = sample("F32", [5, 9], np.random.default_rng(3))
    fd = model_fd(tensors_file({"a": ("U8", [3], b"xyz"), "b": ("F32", [5, 9], raw)}))
    regions = [
        _regions.Region("a", 8 + 0, 3, _dtypes.U8, [3]),
        _regions.Region("b", 8 + 3, len(raw), _dtypes.F32, [5, 9]),
    ]
    regions = [replace(r, offset=r.offset + header_length(fd)) for r in regions]
    small, big = _regions.read_regions(fd, regions, threads=threads)
    assert small.tobytes() == b"xyz"
    assert big.dtype == np.float32 and big.tobytes() == array.tobytes()


@pytest.mark.parametrize("threads", [1, 2])
def test_prefaulted_pieces_fill_every_byte(
    threads: int, model_fd: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pieces of several pages, prefaulted by madvise before their preads, read back whole,
    wherever the pages' edges fall (the tensor starts at an odd offset in the file)."""
    page = _linux.PAGE_BYTES
    monkeypatch.setattr(_regions, "PIECE_BYTES", 3 * page + 5)
    monkeypatch.setattr(_regions, "PREFAULT_MIN_BYTES", 1)
    raw, array = sample("F32", [7, page // 2 + 3], np.random.default_rng(5))
    fd = model_fd(tensors_file({"a": ("U8", [3], b"xyz"), "b": ("F32", [7, page // 2 + 3], raw)}))
    regions = [
        _regions.Region("a", 8 + 0, 3, _dtypes.U8, [3]),
        _regions.Region("b", 8 + 3, len(raw), _dtypes.F32, [7, page // 2 + 3]),
    ]
    regions = [replace(r, offset=r.offset + header_length(fd)) for r in regions]
    small, big = _regions.read_regions(fd, regions, threads=threads)
    assert small.tobytes() == b"xyz"
    assert big.dtype == np.float32 and big.tobytes() == array.tobytes()


@pytest.mark.skipif(not _linux.CAN_POPULATE, reason="the kernel predates MADV_POPULATE_WRITE")
def test_populate_write_makes_fresh_memory_resident() -> None:
    """populate_write faults a fresh anonymous range in: the process's resident size grows
    by the range's whole pages before anything writes to them."""
    size = 64 * _linux.PAGE_BYTES
    with mmap.mmap(-1, size + _linux.PAGE_BYTES) as region:
        anchor = ctypes.c_char.from_buffer(region)
        try:
            address = ctypes.addressof(anchor) + 1  # not page-aligned: the edges are left alone
            _, before = _linux.memory_from_statm()
            assert _linux.populate_write(address, size)
            _, after = _linux.memory_from_statm()
        finally:
            del anchor
    assert after - before >= (size // _linux.PAGE_BYTES - 1) * _linux.PAGE_BYTES


def test_populate_write_skips_a_range_without_a_whole_page() -> None:
    """A range inside one page asks the kernel nothing and says so."""
    assert not _linux.populate_write(_linux.PAGE_BYTES + 1, _linux.PAGE_BYTES - 2)


def test_short_read_is_file_changed(model_fd: Any) -> None:
    """A region past the end of the file (truncated under the loader) raises FileChanged."""
    fd = model_fd(b"\x00" * 100)
    region = _regions.Region("t", 90, 20, _dtypes.U8, [20])
    with pytest.raises(FileChanged, match="truncated in tensor 't'"):
        _regions.read_regions(fd, [region, region])


def header_length(fd: int) -> int:
    return int.from_bytes(os.pread(fd, 8, 0), "little")


def test_gguf_bf16_loads_as_bfloat16_and_quantized_types_stay_bytes(model_fd: Any) -> None:
    """A GGUF written by gguf-py gives BF16 back as bfloat16, Q8_0 and Q4_K as raw bytes."""
    fd = model_fd(gguf_written(gguf_mixed))
    arrays = {t.name: array for t, array in read_gguf(fd)}
    assert arrays["bf16"].dtype == np.dtype(ml_dtypes.bfloat16)
    assert arrays["bf16"].tobytes() == np.arange(6, dtype=np.uint16).tobytes()
    assert arrays["bf16"].shape == (2, 3)
    assert arrays["tok.weight"].dtype == np.float32
    assert arrays["tok.weight"].tobytes() == np.arange(12, dtype=np.float32).tobytes()
    assert arrays["q8"].dtype == np.uint8 and arrays["q8"].tobytes() == bytes(range(68))
    assert arrays["q4k"].dtype == np.uint8 and arrays["q4k"].nbytes == 144
