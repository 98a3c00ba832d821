"""The first bytes of each file format loadwarden recognises (or refuses), named once."""

from __future__ import annotations

NPY = b"\x93NUMPY"
GGUF = b"GGUF"
#: A zip's local file header, or the end of an empty archive's central directory.
ZIP = (b"PK\x03\x04", b"PK\x05\x06")
HDF5 = b"\x89HDF\r\n\x1a\n"
