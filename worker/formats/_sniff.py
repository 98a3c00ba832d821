"""Tell a model file's format from its content: magic bytes first, the name never alone."""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from loadwarden.producer.contract import ModelFormat
from loadwarden.worker.binary import magic
from loadwarden.worker.config import InspectionCaps
from loadwarden.worker.formats._common import file_pickle_protocol, read_at, show

if TYPE_CHECKING:
    from loadwarden.worker._files import ModelFile


class CodeBearing(StrEnum):
    """Formats whose loading runs code the file brings: recognised, then refused."""

    PICKLE = "pickle"
    PYTORCH = "pytorch"
    KERAS = "keras"
    HDF5 = "hdf5"


Kind = ModelFormat | CodeBearing

PICKLE_EXTENSIONS = frozenset({".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle"})
HDF5_EXTENSIONS = frozenset({".h5", ".hdf5", ".keras"})

#: What each known extension promises; a file whose content is something else is refused.
EXTENSIONS: dict[str, frozenset[Kind]] = {
    ".safetensors": frozenset({ModelFormat.SAFETENSORS}),
    ".npy": frozenset({ModelFormat.NPY}),
    ".npz": frozenset({ModelFormat.NPZ}),
    ".gguf": frozenset({ModelFormat.GGUF}),
    **dict.fromkeys(PICKLE_EXTENSIONS, frozenset({CodeBearing.PICKLE, CodeBearing.PYTORCH})),
    **dict.fromkeys(HDF5_EXTENSIONS, frozenset({CodeBearing.HDF5, CodeBearing.KERAS})),
}

#: Why each code-bearing kind is refused.
REASONS: dict[CodeBearing, str] = {
    CodeBearing.PICKLE: "unpickling runs arbitrary code, and pickle scanners have a history "
    "of bypasses",
    CodeBearing.PYTORCH: "torch.load unpickles it, which runs arbitrary code "
    "(weights_only has been bypassed too: CVE-2025-32434)",
    CodeBearing.KERAS: "Keras configs name arbitrary Python callables and Lambda layers "
    "carry Python bytecode",
    CodeBearing.HDF5: "Keras HDF5 models can carry Lambda layers with Python bytecode, "
    "and loadwarden loads no HDF5",
}

_DESCRIPTIONS: dict[Kind, str] = {
    ModelFormat.SAFETENSORS: "safetensors",
    ModelFormat.NPY: "a NumPy .npy array",
    ModelFormat.NPZ: "a NumPy .npz archive",
    ModelFormat.GGUF: "GGUF",
    CodeBearing.PICKLE: "a Python pickle",
    CodeBearing.PYTORCH: "a PyTorch zip checkpoint",
    CodeBearing.KERAS: "a Keras archive",
    CodeBearing.HDF5: "an HDF5 (Keras .h5) file",
}
_PREFIX_BYTES = 256
# HDF5 may start after a user block of 512, 1024, 2048, ... bytes; Keras writes none.
_HDF5_MAX_USERBLOCK = 1024 * 1024
_KERAS_MEMBERS = frozenset({"config.json", "model.config"})


@dataclass(frozen=True, slots=True)
class Sniffed:
    """What the content says: a kind (None: nothing we know), in words, and the first bytes."""

    kind: Kind | None
    detail: str
    prefix: bytes


def describe(kind: Kind) -> str:
    """A kind in words, for messages."""
    return _DESCRIPTIONS[kind]


def extension(path: str) -> str:
    """The lower-case extension of ``path`` (``""`` when it has none)."""
    return os.path.splitext(path)[1].lower()


def sniff_file(fd: int, size: int, path: str, caps: InspectionCaps) -> Sniffed:
    """Tell the format of the file on ``fd`` from its bytes; ``path`` only names zip flavours."""
    prefix = read_at(fd, min(size, _PREFIX_BYTES), 0)
    for signature, fmt in ((magic.NPY, ModelFormat.NPY), (magic.GGUF, ModelFormat.GGUF)):
        if prefix.startswith(signature):
            return _found(fmt, prefix)
    if prefix.startswith(magic.ZIP):
        return _zip_kind(fd, size, path, caps, prefix)
    if prefix.startswith(magic.HDF5):
        return _found(CodeBearing.HDF5, prefix)
    # Before pickle: a safetensors header length such as 640 starts with b"\x80\x02".
    if _plausible_safetensors(size, prefix):
        return _found(ModelFormat.SAFETENSORS, prefix)
    protocol = file_pickle_protocol(fd, size, prefix)
    if protocol is not None:
        return Sniffed(CodeBearing.PICKLE, f"a Python pickle (protocol {protocol})", prefix)
    if _hdf5_after_userblock(fd, size):
        return _found(CodeBearing.HDF5, prefix)
    if prefix[8:9] == b"{":  # a safetensors prefix with a broken length: its inspector says how
        return _found(ModelFormat.SAFETENSORS, prefix)
    return Sniffed(None, "", prefix)


def _found(kind: Kind, prefix: bytes) -> Sniffed:
    return Sniffed(kind, describe(kind), prefix)


def _plausible_safetensors(size: int, prefix: bytes) -> bool:
    if len(prefix) < 10 or prefix[8:9] != b"{":
        return False
    # A declared header that fits the file: a pickle's first 8 bytes are opcodes, which
    # read as a length of petabytes; a crafted one that fits still fails safetensors' checks.
    return 2 <= int.from_bytes(prefix[:8], "little") <= size - 8


def _hdf5_after_userblock(fd: int, size: int) -> bool:
    offset = 512
    while offset + len(magic.HDF5) <= min(size, _HDF5_MAX_USERBLOCK):
        if read_at(fd, len(magic.HDF5), offset) == magic.HDF5:
            return True
        offset *= 2
    return False


def _zip_kind(fd: int, size: int, path: str, caps: InspectionCaps, prefix: bytes) -> Sniffed:
    # Imported for a zip only: zipfile is most of the cost of a sniff's imports.
    from loadwarden.worker.formats._zip import member_names

    ext = extension(path)
    names = member_names(fd, size, caps)
    if names is None:  # an unreadable directory: the name says which flavour was meant
        if ext in HDF5_EXTENSIONS:
            return Sniffed(CodeBearing.KERAS, f"a zip archive named {ext}", prefix)
        if ext in PICKLE_EXTENSIONS:
            return Sniffed(CodeBearing.PYTORCH, f"a zip archive named {ext}", prefix)
        return _found(ModelFormat.NPZ, prefix)
    bases = [(name, name.rsplit("/", 1)[-1]) for name in names]
    for name, base in bases:
        if base == "data.pkl":
            return Sniffed(
                CodeBearing.PYTORCH, f"a PyTorch checkpoint (holds {show(name)})", prefix
            )
    for name, base in bases:
        if base.lower().endswith((".pkl", ".pickle")):
            return Sniffed(
                CodeBearing.PICKLE, f"a zip archive holding the pickle {show(name)}", prefix
            )
    for name, base in bases:
        if base in _KERAS_MEMBERS or base.lower().endswith(tuple(HDF5_EXTENSIONS)):
            return Sniffed(CodeBearing.KERAS, f"a Keras archive (holds {show(name)})", prefix)
    if ext == ".keras":
        return Sniffed(CodeBearing.KERAS, "a zip archive named .keras", prefix)
    return _found(ModelFormat.NPZ, prefix)


def needs_isolation(model_file: ModelFile, isolate_above_bytes: int) -> bool:
    """Whether this file's header may be large enough to inspect in a child.

    A file of at most ``isolate_above_bytes`` cannot have a larger header; a
    safetensors file says its header's length in its first 8 bytes; an .npy
    header is capped at 1 MiB by ``max_npy_header_bytes``. Anything else of
    that size (an .npz directory, a GGUF header, an unknown file) goes to a child.
    """
    if model_file.size <= isolate_above_bytes:
        return False
    prefix = read_at(model_file.fd, 9, 0)
    if prefix.startswith(magic.NPY):
        return False
    if len(prefix) == 9 and prefix[8:9] in (b"{", b" "):
        return int.from_bytes(prefix[:8], "little") > isolate_above_bytes
    return True
