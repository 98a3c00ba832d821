"""Loaders for safetensors, ``.npy``, ``.npz`` and GGUF files, run in the load child.

Stdlib, numpy and ml_dtypes only, like ``_child`` (which imports this module, so
the fork server preloads it; each loader registers itself in ``_registry``): every
child's memory starts from the fork server's. Each loader reads every tensor into
memory once, through the descriptor it was handed (never a path: Landlock may
forbid opening one), never unpickles (``allow_pickle=False`` everywhere), and
returns the manifest of what it really read, which must match the one the
supervisor inspected. A file that no longer parses as it did at inspection raises
``FileChanged`` (outcome ``invalid``).

safetensors is read by our own code, not ``safetensors.numpy``, which has no
array type for BF16 or FP8 (numpy has none; ml_dtypes provides them): the
header is re-read with the inspector's own stdlib parser, bounded by the file,
and each tensor's byte range is pread straight into a fresh array of its true
dtype (``_regions``), one copy, no mapping of the file.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Iterable
from typing import IO, Any, TypeVar

import numpy as np
import numpy.lib.format as npy_format

from loadwarden.worker.binary import gguf, safetensors
from loadwarden.worker.binary.dtypes import GGML_BY_NAME, NPY_BY_ARRAY
from loadwarden.worker.binary.pread import ZIP_MEMBER_ERRORS, open_reader
from loadwarden.worker.sandbox._regions import Region, read_regions
from loadwarden.worker.sandbox._registry import (
    FileChanged,
    Spec,
    finish,
    register_loader,
    register_reader,
)

#: The one tensor of an ``.npy`` file (``loadwarden.worker.formats.npy.TENSOR_NAME``).
NPY_TENSOR_NAME = "array"
#: The largest ``.npy`` header the supervisor can be configured to accept
#: (``InspectionCaps.max_npy_header_bytes`` is at most 1 MiB); it checked the real cap.
NPY_MAX_HEADER_BYTES = 1024 * 1024

Entry = tuple[str, str, list[int], int]
T = TypeVar("T")
Array = np.ndarray[Any, Any]


@register_loader("safetensors")
def load_safetensors(fd: int, spec: Spec) -> dict[str, Any]:
    """Read every tensor into memory once, in its true dtype, check the manifest."""
    entries, tensors = safetensors_shard(fd, spec)
    del tensors
    return finish(entries, spec)


@register_reader("safetensors")
def safetensors_shard(fd: int, spec: Spec) -> tuple[list[Entry], object]:
    """One shard of a checkpoint: its tensors (kept by ``load_files``) and its manifest."""
    tensors = read_safetensors(fd)
    return [(t.name, t.dtype.name, t.shape, int(array.nbytes)) for t, array in tensors], tensors


@register_loader("npy")
def load_npy(fd: int, spec: Spec) -> dict[str, Any]:
    """Read the array into memory once, check the manifest."""
    entries = [_entry(NPY_TENSOR_NAME, read_npy(fd))]
    return finish(entries, spec)


@register_loader("npz")
def load_npz(fd: int, spec: Spec) -> dict[str, Any]:
    """Read every member into memory once, check the manifest."""
    arrays = read_npz(fd, spec.memory_bytes)
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


def read_safetensors(fd: int) -> list[tuple[safetensors.Tensor, Array]]:
    """Every tensor of the safetensors file on ``fd``, in offset order, each in its true dtype.

    The header is re-read and checked as at inspection (bounded by the file's
    size, not the worker's caps, which the supervisor already applied). F4 and F6
    tensors stay packed: a flat ``uint8`` array of their bytes.
    """
    layout = _reread(fd, "safetensors", safetensors.SafetensorsError, safetensors.read_within)
    regions = [
        Region(t.name, layout.data_offset + t.begin, t.nbytes, t.dtype, t.shape)
        for t in layout.tensors
    ]
    return list(zip(layout.tensors, read_regions(fd, regions), strict=True))


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
    except ZIP_MEMBER_ERRORS as exc:
        raise FileChanged(
            f"the .npz archive is corrupt or changed after inspection: {exc}"
        ) from exc
    return arrays


def read_gguf(fd: int) -> list[tuple[gguf.TensorEntry, np.ndarray[Any, Any]]]:
    """Every tensor of the GGUF file on ``fd``, its layout re-read (bounded by the file)."""
    layout = _reread(fd, "GGUF", gguf.GGUFError, gguf.read_within)
    regions = [
        Region(t.name, layout.data_start + t.offset, t.nbytes, GGML_BY_NAME[t.dtype], t.shape)
        for t in layout.tensors
    ]
    return list(zip(layout.tensors, read_regions(fd, regions), strict=True))


def _reread(fd: int, what: str, defect: type[Exception], read: Callable[[int, int], T]) -> T:
    """A layout re-read as at inspection; a file that no longer checks out raises FileChanged."""
    try:
        return read(fd, os.fstat(fd).st_size)
    except defect as exc:
        raise FileChanged(f"the {what} file changed after inspection: {exc}") from exc


def _entry(name: str, array: np.ndarray[Any, Any]) -> Entry:
    dtype = NPY_BY_ARRAY.get(array.dtype.name, array.dtype.name)
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
