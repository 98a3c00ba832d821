"""A zip archive's central directory, bounded before ``zipfile`` reads any of it.

``zipfile.ZipFile`` builds one object per directory entry and reads the whole
directory at once; the end-of-directory record says how many entries and bytes
that is. We read that record first (as ``zipfile`` finds it, including Zip64)
and check the entry count, the directory's size and its place in the file
against the caps before ``zipfile`` sees the archive.
"""

from __future__ import annotations

import contextlib
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass

from loadwarden.producer.errors import LoadError
from loadwarden.worker.binary.pread import open_reader
from loadwarden.worker.config import InspectionCaps
from loadwarden.worker.formats._common import invalid, read_at

_END = b"PK\x05\x06"
_END64 = b"PK\x06\x06"
_LOCATOR = b"PK\x06\x07"
_END_RECORD = struct.Struct("<4s4H2LH")  # signature, disks, entries (x2), size, offset, comment
_END64_RECORD = struct.Struct("<4sQ2H2L4Q")
_LOCATOR_RECORD = struct.Struct("<4sLQL")
_MAX_COMMENT = 0xFFFF


@dataclass(frozen=True, slots=True)
class EndRecord:
    """What the end-of-central-directory record declares."""

    entries: int
    directory_bytes: int
    directory_offset: int


def read_end_record(fd: int, size: int, where: str) -> EndRecord:
    """Find and decode the end record the way ``zipfile`` does; raise ``InvalidModel`` if bad."""
    tail_start = max(0, size - _END_RECORD.size - _MAX_COMMENT)
    tail = read_at(fd, size - tail_start, tail_start)
    # The last signature with a whole record after it, as zipfile looks for it.
    at = tail.rfind(_END, 0, max(0, len(tail) - _END_RECORD.size + len(_END)))
    if at < 0:
        raise invalid(where, "bad_zip", "no end-of-central-directory record: not a whole zip")
    fields = _END_RECORD.unpack_from(tail, at)
    # Like zipfile, a Zip64 record wins whenever its locator is there, markers or not.
    return _zip64(fd, tail_start + at, where) or EndRecord(
        entries=fields[4], directory_bytes=fields[5], directory_offset=fields[6]
    )


def _zip64(fd: int, end_at: int, where: str) -> EndRecord | None:
    at = end_at - _LOCATOR_RECORD.size
    locator = read_at(fd, _LOCATOR_RECORD.size, at) if at >= 0 else b""
    if len(locator) < _LOCATOR_RECORD.size or locator[:4] != _LOCATOR:
        return None
    # zipfile assumes the Zip64 end record sits right before its locator; so do we.
    raw = read_at(fd, _END64_RECORD.size, at - _END64_RECORD.size)
    if len(raw) < _END64_RECORD.size or raw[:4] != _END64:
        raise invalid(where, "bad_zip", "the Zip64 end record is missing or corrupt")
    fields = _END64_RECORD.unpack(raw)
    return EndRecord(entries=fields[7], directory_bytes=fields[8], directory_offset=fields[9])


def check_end_record(record: EndRecord, size: int, caps: InspectionCaps, where: str) -> None:
    """The directory's entry count and size are within the caps, and it lies inside the file."""
    if record.entries > caps.max_tensors:
        raise invalid(
            where,
            "too_many_tensors",
            f"{record.entries} members, over the cap of {caps.max_tensors}",
        )
    if record.directory_bytes > caps.max_header_bytes:
        raise invalid(
            where,
            "header_too_large",
            f"central directory of {record.directory_bytes} bytes "
            f"is over the cap of {caps.max_header_bytes}",
        )
    if record.directory_offset + record.directory_bytes > size:
        raise invalid(
            where,
            "bad_zip",
            f"central directory [{record.directory_offset}, "
            f"{record.directory_offset + record.directory_bytes}) runs past the "
            f"end of a {size}-byte file",
        )


@contextlib.contextmanager
def open_archive(
    fd: int, size: int, caps: InspectionCaps, where: str
) -> Iterator[tuple[zipfile.ZipFile, EndRecord]]:
    """``zipfile`` over ``fd``, once the end record passed ``check_end_record``."""
    record = read_end_record(fd, size, where)
    check_end_record(record, size, caps, where)
    try:
        archive = zipfile.ZipFile(open_reader(fd))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as exc:
        raise invalid(where, "bad_zip", f"unreadable central directory: {exc}") from exc
    try:
        if len(archive.infolist()) != record.entries:
            raise invalid(
                where,
                "bad_zip",
                f"the end record declares {record.entries} members, "
                f"the central directory holds {len(archive.infolist())}",
            )
        yield archive, record
    finally:
        archive.close()


def member_names(fd: int, size: int, caps: InspectionCaps) -> list[str] | None:
    """The names in a zip's central directory, or None when it cannot be read within the caps."""
    try:
        with open_archive(fd, size, caps, "zip") as (archive, _record):
            return [info.filename for info in archive.infolist()]
    except LoadError:  # the npz inspector reports the defect properly
        return None
