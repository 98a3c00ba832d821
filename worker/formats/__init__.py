"""Model formats: tell a file's format by its content, inspect it strictly, or refuse it.

``inspect_model`` is the one entry point, run in the supervisor before any child
starts. The format comes from the file's magic bytes, never from its name alone;
a known extension or a declared format that disagrees with the content is
refused. Errors, by ``code``::

    SourceRefused (outcome ``refused``)
        code_bearing_format  a pickle (any protocol), a PyTorch zip checkpoint, a Keras
                             archive or HDF5 file, or a zip holding a pickle
        object_array         a NumPy array (or .npz member) of dtype object
        format_mismatch      the extension or the request's ``format`` says one format,
                             the content another
        over_budget          valid, but holds more tensor bytes than ``budget_bytes``
    InvalidModel (outcome ``invalid``)
        unknown_format       no format we know, by content or name
        every format         file_too_small, header_too_large, header_beyond_file,
                             duplicate_key, unknown_dtype, bad_shape, rank_too_large,
                             too_many_tensors, too_large, data_size_mismatch
        safetensors          header_not_utf8, header_not_json, header_not_object,
                             non_finite_number, bad_metadata, bad_tensor_entry,
                             bad_offsets, size_mismatch, not_whole_bytes (a packed F4 or F6
                             tensor that does not fill whole bytes), offsets_not_contiguous
        npy (and members)    bad_magic, unsupported_version, bad_header
        npz                  bad_zip, bad_member_name, unsupported_compression,
                             compression_ratio, overlapping_members
        gguf                 bad_magic, unsupported_version, too_many_keys, bad_key,
                             string_too_long, array_too_long, nesting_too_deep,
                             bad_value, bad_value_type, header_not_utf8, bad_alignment,
                             bad_tensor_entry, bad_offsets, offsets_not_contiguous
    SourceUnavailable (outcome ``unavailable``)
        unreadable           a read of the file failed
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from loadwarden.producer.contract import ModelFormat, ModelSummary
from loadwarden.producer.errors import InvalidModel, SourceRefused
from loadwarden.worker.config import InspectionCaps
from loadwarden.worker.formats._common import CONVERT_HINT, over_budget
from loadwarden.worker.formats._sniff import (
    EXTENSIONS,
    REASONS,
    CodeBearing,
    Kind,
    Sniffed,
    describe,
    extension,
    needs_isolation,
    sniff_file,
)

__all__ = [
    "LOADERS",
    "CodeBearing",
    "Inspection",
    "Kind",
    "inspect_model",
    "needs_isolation",
    "sniff",
]

#: The child loader (``register_loader`` name) of each format.
LOADERS: Mapping[ModelFormat, str] = {
    ModelFormat.SAFETENSORS: "safetensors",
    ModelFormat.NPY: "npy",
    ModelFormat.NPZ: "npz",
    ModelFormat.GGUF: "gguf",
}


def _inspect(
    fmt: ModelFormat, fd: int, size: int, caps: InspectionCaps, budget_bytes: int | None
) -> ModelSummary:
    """Run ``fmt``'s inspector, imported here: a file needs its own format's parser alone
    (``loadwarden inspect`` of a safetensors file imports no GGUF, npy or zip parser)."""
    if fmt is ModelFormat.SAFETENSORS:
        from loadwarden.worker.formats.safetensors import inspect_safetensors

        return inspect_safetensors(fd, size, caps).summary
    if fmt is ModelFormat.NPY:
        from loadwarden.worker.formats.npy import inspect_npy

        return inspect_npy(fd, size, caps)
    if fmt is ModelFormat.NPZ:
        from loadwarden.worker.formats.npz import inspect_npz

        return inspect_npz(fd, size, caps, budget_bytes)
    if fmt is ModelFormat.GGUF:
        from loadwarden.worker.formats.gguf import inspect_gguf

        return inspect_gguf(fd, size, caps)
    raise AssertionError(f"no inspector for {fmt}")  # a new ModelFormat needs its branch


@dataclass(frozen=True, slots=True)
class Inspection:
    """A checked model: what it holds, and the child loader that loads it."""

    summary: ModelSummary
    loader: str


def sniff(fd: int, size: int, path: str, *, caps: InspectionCaps | None = None) -> Kind | None:
    """The format (or code-bearing kind) of the file on ``fd`` by its content; None if unknown.

    ``path`` is used only to tell a ``.keras`` zip from an ``.npz``; ``caps`` bound the
    zip central directory read to list members (default: ``InspectionCaps()``).
    """
    return sniff_file(fd, size, path, caps or InspectionCaps()).kind


def inspect_model(
    fd: int,
    size: int,
    *,
    path: str,
    declared: ModelFormat | None,
    caps: InspectionCaps,
    budget_bytes: int | None = None,
) -> Inspection:
    """Check the model file open on ``fd`` (``size`` bytes, named ``path``) before any load.

    Raises ``SourceRefused`` for code-bearing formats, object arrays, a name or
    ``declared`` format that disagrees with the content, and tensor data over
    ``budget_bytes``; ``InvalidModel`` for every defect. Reads only headers (and an
    archive's directory), never tensor data.
    """
    sniffed = sniff_file(fd, size, path, caps)
    fmt = _choose(sniffed, path, declared)
    with _gc_paused():
        summary = _inspect(fmt, fd, size, caps, budget_bytes)
    if budget_bytes is not None and summary.bytes > budget_bytes:
        raise over_budget(str(fmt), summary.bytes, budget_bytes)
    return Inspection(summary, LOADERS[fmt])


_gc_lock = threading.Lock()
_gc_pausers = 0


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a header is parsed (nesting across threads).

    A 150,000-tensor header makes ~10^6 objects; each collection walks them all, so the
    cost grew faster than the tensor count (x1.39 per tensor from 15k to 150k, measured
    in bench/inspect_scale.py) and took 60% of the time. Parsing makes no cycles, so
    reference counting frees everything meanwhile; collection resumes after.
    """
    global _gc_pausers
    with _gc_lock:
        _gc_pausers += 1
        gc.disable()
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pausers -= 1
            if _gc_pausers == 0:
                gc.enable()


def _choose(sniffed: Sniffed, path: str, declared: ModelFormat | None) -> ModelFormat:
    """The format to inspect as; refuse code and contradictions; unknown content -> its name."""
    name = os.path.basename(path) or path
    ext = extension(path)
    promised = EXTENSIONS.get(ext)
    kind = sniffed.kind
    if isinstance(kind, CodeBearing):
        named = f" named {ext}" if promised is not None and kind not in promised else ""
        raise SourceRefused(
            f"{name}{named} is {sniffed.detail}: {REASONS[kind]}; {CONVERT_HINT}",
            code="code_bearing_format",
        )
    if kind is not None:
        if promised is not None and kind not in promised:
            expected = " or ".join(sorted(describe(k) for k in promised))
            raise SourceRefused(
                f"{name} is named {ext} ({expected}) but its content is {sniffed.detail}",
                code="format_mismatch",
            )
        if declared is not None and declared is not kind:
            raise SourceRefused(
                f"{name}: the request declares {declared} but the content is {sniffed.detail}",
                code="format_mismatch",
            )
        return kind
    # No magic we know: a format the request or the name promises gets its strict
    # inspector, which names the defect (an empty .safetensors is file_too_small).
    fallback = declared or next((k for k in promised or () if isinstance(k, ModelFormat)), None)
    if fallback is not None:
        return fallback
    named = f" (named {ext})" if ext else ""
    raise InvalidModel(
        f"{name}{named} is no format loadwarden knows: it starts with {sniffed.prefix[:8]!r}; "
        "supported: safetensors, npy, npz, gguf",
        code="unknown_format",
    )
