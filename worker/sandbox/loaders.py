"""Loaders for ``.npy``, ``.npz`` and GGUF files, run in the load child.

Stdlib and numpy only, like ``_child`` (which imports this module last, so the
fork server preloads it): every child's memory starts from the fork server's.
Each loader reads every tensor into memory once, through the descriptor it was
handed (never a path: Landlock may forbid opening one), never unpickles
(``allow_pickle=False`` everywhere), and returns the manifest of what it really
read, which must match the one the supervisor inspected. A file that no longer
parses as it did at inspection raises ``FileChanged`` (outcome ``invalid``).
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Iterable
from typing import IO, Any

import numpy as np
import numpy.lib.format as npy_format

from loadwarden.worker.sandbox import _gguf
from loadwarden.worker.sandbox._child import (
    _NUMPY_TO_SAFETENSORS,
    FileChanged,
    Spec,
    finish,
    register_loader,
)
from loadwarden.worker.sandbox._pread import open_reader, pread_into

#: The one tensor of an ``.npy`` file (``loadwarden.worker.formats.npy.TENSOR_NAME``).
NPY_TENSOR_NAME = "array"
#: The largest ``.npy`` header the supervisor can be configured to accept
#: (``InspectionCaps.max_npy_header_bytes`` is at most 1 MiB); it checked the real cap.
NPY_MAX_HEADER_BYTES = 1024 * 1024
#: numpy dtype names as our manifests spell them (safetensors' names, plus C128).
DTYPE_NAMES = {**_NUMPY_TO_SAFETENSORS, "complex128": "C128"}
#: ggml types numpy has an array type for; the others stay raw bytes (uint8).
GGML_NUMPY_TYPES: dict[str, type[np.generic]] = {
    "F32": np.float32,
    "F16": np.float16,
    "F64": np.float64,
    "I8": np.int8,
    "I16": np.int16,
    "I32": np.int32,
    "I64": np.int64,
}
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError)

Entry = tuple[str, str, list[int], int]


@register_loader("npy")
def load_npy(fd: int, spec: Spec) -> dict[str, Any]:
    """Read the array into memory once, check the manifest."""
    entries = [_entry(NPY_TENSOR_NAME, read_npy(fd))]
    return finish(entries, spec)


@register_loader("npz")
def load_npz(fd: int, spec: Spec) -> dict[str, Any]:
    """Read every member into memory once, check the manifest."""
    arrays = read_npz(fd, spec.get("memory_bytes"))
    entries = [_entry(name, array) for name, array in arrays.items()]
    del arrays
    return finish(entries, spec)


@register_loader("gguf")
def load_gguf(fd: int, spec: Spec) -> dict[str, Any]:
    """Read every tensor into memory once, check the manifest."""
    tensors = read_gguf(fd)
    entries = [(t.name, t.dtype, t.shape, int(array.nbytes)) for t, array in tensors]
    del tensors
    return finish(entries, spec)


def read_npy(fd: int) -> np.ndarray[Any, Any]:
    """The array of the ``.npy`` file on ``fd``; nothing may follow it."""
    with open_reader(fd) as stream:
        array = _read_array(stream, "the .npy file")
        if stream.read(1):
            raise FileChanged("the .npy file has bytes after its array data")
    return array


def read_npz(fd: int, memory_bytes: object = None) -> dict[str, np.ndarray[Any, Any]]:
    """The arrays of the ``.npz`` archive on ``fd``, by name, streamed member by member.

    zipfile stops each member at its declared size, so the bytes inflated never
    exceed what the directory declares; a directory that now declares more than
    ``memory_bytes`` is refused before anything is inflated.
    """
    arrays: dict[str, np.ndarray[Any, Any]] = {}
    try:
        with open_reader(fd) as stream, zipfile.ZipFile(stream) as archive:
            infos = archive.infolist()
            _check_declared(infos, memory_bytes)
            for info in infos:
                with archive.open(info) as member:
                    array = _read_array(member, f"member {info.filename!r}")
                    if member.read(1):
                        raise FileChanged(f"member {info.filename!r} has bytes after its array")
                arrays[info.filename.removesuffix(".npy")] = array
    except _ZIP_ERRORS as exc:
        raise FileChanged(
            f"the .npz archive is corrupt or changed after inspection: {exc}"
        ) from exc
    return arrays


def read_gguf(fd: int) -> list[tuple[_gguf.TensorEntry, np.ndarray[Any, Any]]]:
    """Every tensor of the GGUF file on ``fd``, its layout re-read (bounded by the file)."""
    size = os.fstat(fd).st_size
    try:
        layout = _gguf.read_layout(fd, size, _gguf.Caps.within(size))
    except _gguf.GGUFError as exc:
        raise FileChanged(f"the GGUF file changed after inspection: {exc.message}") from exc
    return [(t, _read_tensor(fd, layout.data_start, t)) for t in layout.tensors]


def _entry(name: str, array: np.ndarray[Any, Any]) -> Entry:
    dtype = DTYPE_NAMES.get(array.dtype.name, array.dtype.name)
    return (name, dtype, [int(d) for d in array.shape], int(array.nbytes))


def _read_array(stream: IO[bytes], what: str) -> np.ndarray[Any, Any]:
    try:
        array: np.ndarray[Any, Any] = npy_format.read_array(
            stream, allow_pickle=False, max_header_size=NPY_MAX_HEADER_BYTES
        )
    except (ValueError, EOFError, SyntaxError, OverflowError) as exc:
        raise FileChanged(f"{what} does not read as it did at inspection: {exc}") from exc
    return array


def _check_declared(infos: Iterable[zipfile.ZipInfo], memory_bytes: object) -> None:
    total = sum(info.file_size for info in infos)
    if isinstance(memory_bytes, int) and total > memory_bytes:
        raise FileChanged(
            f"the archive now declares {total} bytes, over the {memory_bytes}-byte memory limit"
        )


def _read_tensor(fd: int, data_start: int, tensor: _gguf.TensorEntry) -> np.ndarray[Any, Any]:
    raw = np.empty(tensor.nbytes, dtype=np.uint8)
    if pread_into(fd, raw.data, data_start + tensor.offset) != tensor.nbytes:
        raise FileChanged(f"the GGUF file was truncated in tensor {tensor.name!r}")
    kind = GGML_NUMPY_TYPES.get(tensor.dtype)
    return raw if kind is None else raw.view(kind).reshape(tensor.shape)
