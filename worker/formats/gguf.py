"""Strict, bounded check of a GGUF file (versions 2 and 3), in-process, without the gguf package.

The parsing lives in ``loadwarden.worker.binary.gguf`` (stdlib only) because the
load child reads the same layout to load the tensors; this module applies the
worker's caps and turns the layout into a ``ModelSummary``. Tensor shapes are
reported outermost dimension first, as numpy and safetensors do (GGUF stores
them innermost first); dtypes are ggml's names (``F32``, ``Q4_K``, ...).
"""

from __future__ import annotations

from loadwarden.producer.contract import ModelFormat, ModelSummary
from loadwarden.worker.binary.gguf import Caps, GGUFError, Layout, read_layout
from loadwarden.worker.config import InspectionCaps
from loadwarden.worker.formats._common import defects_as_invalid, summarize


def caps_for(caps: InspectionCaps) -> Caps:
    """The GGUF parser's caps from the worker's inspection caps."""
    return Caps(
        max_header_bytes=caps.max_header_bytes,
        max_tensors=caps.max_tensors,
        max_keys=caps.max_gguf_keys,
        max_string_bytes=caps.max_gguf_string_bytes,
        max_array_elements=caps.max_gguf_array_elements,
        max_nesting=caps.max_gguf_nesting,
        max_rank=caps.max_rank,
        max_total_bytes=caps.max_total_bytes,
        max_metadata_entries=caps.max_metadata_entries,
    )


def read_gguf_layout(fd: int, file_size: int, caps: InspectionCaps) -> Layout:
    """The checked layout of the GGUF file on ``fd``; raise ``InvalidModel`` if bad."""
    with defects_as_invalid("gguf", GGUFError):
        return read_layout(fd, file_size, caps_for(caps))


def inspect_gguf(fd: int, file_size: int, caps: InspectionCaps) -> ModelSummary:
    """Check the GGUF file open on ``fd``; raise ``InvalidModel`` if bad."""
    layout = read_gguf_layout(fd, file_size, caps)
    entries = [(t.name, t.dtype, t.shape, t.nbytes, t.parameters) for t in layout.tensors]
    return summarize(ModelFormat.GGUF, entries, file_size, layout.metadata)
