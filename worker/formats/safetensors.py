"""Strict, bounded check of a safetensors header, in-process, without the safetensors library.

The parsing lives in ``loadwarden.worker.binary.safetensors`` (stdlib only)
because the load child re-reads the same layout to load the tensors; this module
applies the worker's caps and turns the layout into a ``ModelSummary``. Every
safetensors dtype is accepted (``loadwarden.worker.binary.dtypes.SAFETENSORS``).
"""

from __future__ import annotations

from dataclasses import dataclass

from loadwarden.producer.contract import ModelFormat, ModelSummary
from loadwarden.worker.binary.safetensors import Caps, Layout, SafetensorsError, read_layout
from loadwarden.worker.config import InspectionCaps
from loadwarden.worker.formats._common import defects_as_invalid, summarize


@dataclass(frozen=True, slots=True)
class SafetensorsHeader:
    """A checked safetensors header: the model it describes and where its data starts."""

    summary: ModelSummary
    header_bytes: int
    data_offset: int


def caps_for(caps: InspectionCaps) -> Caps:
    """The safetensors parser's caps from the worker's inspection caps."""
    return Caps(
        max_header_bytes=caps.max_header_bytes,
        max_tensors=caps.max_tensors,
        max_metadata_entries=caps.max_metadata_entries,
        max_rank=caps.max_rank,
        max_total_bytes=caps.max_total_bytes,
    )


def read_safetensors_layout(fd: int, file_size: int, caps: InspectionCaps) -> Layout:
    """The checked layout of the safetensors file on ``fd``; raise ``InvalidModel`` if bad."""
    with defects_as_invalid("safetensors", SafetensorsError):
        return read_layout(fd, file_size, caps_for(caps))


def inspect_safetensors(fd: int, file_size: int, caps: InspectionCaps) -> SafetensorsHeader:
    """Check the header of the safetensors file open on ``fd``; raise ``InvalidModel`` if bad."""
    layout = read_safetensors_layout(fd, file_size, caps)
    entries = [(t.name, t.dtype.name, t.shape, t.nbytes, t.parameters) for t in layout.tensors]
    summary = summarize(ModelFormat.SAFETENSORS, entries, file_size, layout.metadata)
    return SafetensorsHeader(summary, layout.header_bytes, layout.data_offset)
