"""Format sniffing, bounded reads, and the child loaders against the reference libraries."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loadwarden.producer.contract import ModelFormat
from loadwarden.producer.errors import InvalidModel
from loadwarden.worker import formats
from loadwarden.worker._files import open_model_file
from loadwarden.worker.binary import gguf as binary_gguf
from loadwarden.worker.config import InspectionCaps
from loadwarden.worker.formats import CodeBearing, inspect_model, sniff
from loadwarden.worker.formats.npy import TENSOR_NAME, inspect_npy
from loadwarden.worker.sandbox import _registry, loaders
from tests import format_files as ff
from tests.hostile import CORPUS, F32_DATA, F32_INFOS, Case, U8x4
from tests.safetensors_files import entry, raw_file, write


@pytest.mark.parametrize(
    ("content", "name", "kind"),
    [
        pytest.param(raw_file({"t": U8x4}, bytes(4)), "m", ModelFormat.SAFETENSORS, id="st"),
        pytest.param(ff.npy_of(np.zeros(2)), "m", ModelFormat.NPY, id="npy"),
        pytest.param(ff.npz_of({"a": np.zeros(2)}), "m", ModelFormat.NPZ, id="npz"),
        pytest.param(ff.npz_of({}), "m", ModelFormat.NPZ, id="empty-npz"),
        pytest.param(ff.gguf_bytes(), "m", ModelFormat.GGUF, id="gguf"),
        pytest.param(ff.pickled(0), "m", CodeBearing.PICKLE, id="pickle-0"),
        pytest.param(ff.pickled(5), "m", CodeBearing.PICKLE, id="pickle-5"),
        pytest.param(ff.torch_zip(), "m", CodeBearing.PYTORCH, id="torch-zip"),
        pytest.param(ff.keras_zip(), "m", CodeBearing.KERAS, id="keras-zip"),
        pytest.param(ff.npz_of({"a": np.zeros(2)}), "m.keras", CodeBearing.KERAS, id="any-.keras"),
        pytest.param(ff.hdf5(), "m", CodeBearing.HDF5, id="hdf5"),
        pytest.param(ff.hdf5(2048), "m", CodeBearing.HDF5, id="hdf5-userblock"),
        pytest.param(b"hello.", "m", None, id="text-ending-in-a-dot"),
        pytest.param(b"", "m.safetensors", None, id="empty"),
    ],
)  # fmt: skip
def test_sniff_reads_the_content_not_the_name(
    tmp_path: Path, content: bytes, name: str, kind: object
) -> None:
    """The kind comes from magic bytes; the name only tells a .keras zip from an .npz."""
    with open_model_file(write(tmp_path / name, content)) as model:
        assert sniff(model.fd, model.size, model.path) == kind


@pytest.mark.parametrize("length", [640, 896, 1152, 1408])
def test_safetensors_header_length_that_looks_like_a_pickle_is_safetensors(
    tmp_path: Path, length: int
) -> None:
    """A header length of 640 starts with b"\\x80\\x02" (pickle's PROTO 2): still safetensors."""
    header = json.dumps({"t": entry("U8", [4], 0, 4)}).encode()
    content = raw_file(header + b" " * (length - len(header)), bytes(4))
    assert content[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
    path = write(tmp_path / "m.safetensors", content)
    with open_model_file(path) as model:
        inspection = inspect_model(
            model.fd, model.size, path=path, declared=None, caps=InspectionCaps()
        )
    assert (inspection.summary.format, inspection.loader) == (
        ModelFormat.SAFETENSORS,
        "safetensors",
    )


@pytest.fixture
def pread_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the size of every os.preadv the inspectors make."""
    sizes: list[int] = []
    real = os.preadv

    def recording(fd: int, buffers: list[memoryview], offset: int) -> int:
        sizes.append(sum(len(b) for b in buffers))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", recording)
    return sizes


def test_npy_header_length_is_checked_before_the_header_is_read(
    tmp_path: Path, pread_sizes: list[int]
) -> None:
    """A declared 2 GiB .npy header is refused after reading its 12-byte prefix."""
    path = write(tmp_path / "m.npy", ff.npy_bytes(ff.npy_header(), version=(2, 0), length=2**31))
    with open_model_file(path) as model, pytest.raises(InvalidModel) as info:
        inspect_npy(model.fd, model.size, InspectionCaps())
    assert info.value.code == "header_too_large"
    assert pread_sizes == [8, 4]


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(ff.gguf_bytes([ff.gguf_kv("a", ff.ARRAY, ff.gguf_array(ff.U8, 2**62))]),
                     id="array-2^62"),
        pytest.param(ff.gguf_bytes([ff.gguf_kv("k", ff.STRING, ff.gguf_string("", length=2**40))]),
                     id="string-2^40"),
        pytest.param(ff.gguf_bytes(tensor_count=2**60), id="tensors-2^60"),
    ],
)  # fmt: skip
def test_gguf_counts_are_checked_before_anything_is_read_for_them(
    tmp_path: Path, pread_sizes: list[int], content: bytes
) -> None:
    """GGUF counts and lengths are capped before a read or an allocation of their size."""
    path = write(tmp_path / "m.gguf", content)
    with open_model_file(path) as model, pytest.raises(InvalidModel):
        inspect_model(model.fd, model.size, path=path, declared=None, caps=InspectionCaps())
    assert max(pread_sizes) <= len(content)


def test_gguf_layout_follows_llama_cpp_padding(tmp_path: Path) -> None:
    """Tensors start at the previous end rounded up to the alignment; data starts aligned."""
    path = write(tmp_path / "m.gguf", ff.gguf_bytes([], F32_INFOS, F32_DATA))
    with open_model_file(path) as model:
        layout = binary_gguf.read_layout(model.fd, model.size, binary_gguf.Caps.within(model.size))
    assert layout.data_start % 32 == 0
    assert [(t.offset, t.nbytes, t.shape) for t in layout.tensors] == [(0, 16, [4]), (32, 16, [4])]


GGUF_CASES = [c for c in CORPUS if c.group == "gguf" and c.code is None]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in GGUF_CASES])
def test_gguf_loader_reads_the_bytes_gguf_py_reads(case: Case, tmp_path: Path) -> None:
    """Every tensor the child's GGUF reader loads equals gguf-py's, byte for byte."""
    import gguf

    path = case.write(tmp_path)
    reference = {t.name: t.data.tobytes() for t in gguf.GGUFReader(path).tensors}
    with open_model_file(path) as model:
        ours = {t.name: array.tobytes() for t, array in loaders.read_gguf(model.fd)}
    assert ours == reference


def test_npy_and_npz_loaders_read_what_numpy_reads(tmp_path: Path) -> None:
    """The child's npy and npz readers return numpy's own arrays, values and layout."""
    arrays = {"w": np.arange(12, dtype=">f4").reshape(3, 4), "m": np.array([True, False])}
    npy = write(tmp_path / "m.npy", ff.npy_of(np.asfortranarray(arrays["w"])))
    npz = write(tmp_path / "m.npz", ff.npz_of(arrays, compressed=True))
    with open_model_file(npy) as model:
        np.testing.assert_array_equal(loaders.read_npy(model.fd), np.load(npy))
    with open_model_file(npz) as model:
        ours = loaders.read_npz(model.fd)
    assert ours.keys() == arrays.keys()
    for name, array in arrays.items():
        assert ours[name].dtype == array.dtype
        np.testing.assert_array_equal(ours[name], array)


def test_loaders_are_registered_under_the_names_inspection_gives() -> None:
    """Each format's loader name is registered in the child, and npy names its tensor alike."""
    assert set(formats.LOADERS.values()) <= set(_registry.LOADERS)
    assert set(formats.LOADERS) == set(ModelFormat)
    assert TENSOR_NAME == loaders.NPY_TENSOR_NAME


def test_child_stays_lean() -> None:
    """Importing the child registers its loaders and imports no pydantic, arq or redis."""
    code = (
        "import sys, loadwarden.worker.sandbox._child; "
        "from loadwarden.worker.sandbox._registry import LOADERS; "
        "print(sorted(LOADERS)); "
        "print([m for m in sys.modules if m.startswith(('pydantic', 'arq', 'redis'))])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.split("\n")
    assert out[:2] == ["['gguf', 'npy', 'npz', 'safetensors']", "[]"]


def test_every_code_in_the_corpus_is_documented() -> None:
    """Each code the corpus expects is listed in the formats module's docstring."""
    documented = set(re.findall(r"\b[a-z0-9]+(?:_[a-z0-9]+)+\b", formats.__doc__ or ""))
    assert {c.code for c in CORPUS if c.code} <= documented
