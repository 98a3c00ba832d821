"""Strict, bounded check of a NumPy ``.npz`` archive, from its central directory first.

Before a single member byte is inflated: the member count and directory size are
capped (``_zip``), every name must be a plain ``NAME.npy`` (no paths, no
duplicates), only stored and deflated members are accepted, no two members may
share bytes (the overlapping-entry zip bomb), each member's compression ratio is
capped, so is the whole archive's (members under the per-member exemption add
up), and the declared uncompressed total is checked against the budget (a 1 MB
file can inflate to 1 GiB). Then each member's ``.npy`` header is read from
its stream (at most the header cap is ever inflated) and must declare exactly
the member's size.
"""

from __future__ import annotations

import zipfile

from loadwarden.producer.contract import ModelFormat, ModelSummary
from loadwarden.worker.binary.pread import ZIP_MEMBER_ERRORS
from loadwarden.worker.config import InspectionCaps
from loadwarden.worker.formats import npy
from loadwarden.worker.formats._common import invalid, over_budget, show, summarize
from loadwarden.worker.formats._zip import open_archive

#: Members smaller than this are exempt from the compression-ratio cap (1 MiB).
RATIO_EXEMPT_BYTES = 1024 * 1024
_LOCAL_HEADER_BYTES = 30
_ENCRYPTED = 0x1
_UTF8_NAME = 0x800
_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflated"}
_WHERE = "npz"


def inspect_npz(
    fd: int, file_size: int, caps: InspectionCaps, budget_bytes: int | None = None
) -> ModelSummary:
    """Check the ``.npz`` archive open on ``fd``; raise ``InvalidModel`` or ``SourceRefused``."""
    with open_archive(fd, file_size, caps, _WHERE) as (archive, _record):
        infos = archive.infolist()
        for info in infos:
            _check_member(info)
        _check_unique(infos)
        _check_disjoint(infos, archive.start_dir)
        _check_total(infos, caps, budget_bytes)
        _check_archive_ratio(infos, file_size, caps)
        for info in infos:
            _check_ratio(info, caps)
        entries = [_inspect_member(archive, info, caps) for info in infos]
    return summarize(ModelFormat.NPZ, entries, file_size)


def tensor_name(member: str) -> str:
    """The tensor a member holds: its name without ``.npy`` (as ``numpy.load`` names it)."""
    return member.removesuffix(".npy")


def _member(info: zipfile.ZipInfo) -> str:
    return f"member {show(info.orig_filename)}"


def _check_member(info: zipfile.ZipInfo) -> None:
    name = info.orig_filename
    stem = name.removesuffix(".npy")
    if (
        name == stem
        or stem in ("", ".", "..")
        or any(c in name for c in "/\\\0")
        or any(ord(c) < 0x20 for c in name)
    ):
        raise invalid(
            _WHERE,
            "bad_member_name",
            f"{_member(info)} is not a plain NAME.npy (no folders, no control characters)",
        )
    if info.flag_bits & _ENCRYPTED or info.compress_type not in _METHODS:
        what = "encrypted" if info.flag_bits & _ENCRYPTED else f"method {info.compress_type}"
        raise invalid(
            _WHERE,
            "unsupported_compression",
            f"{_member(info)} is {what}; numpy writes stored or deflated members only",
        )
    if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
        raise invalid(
            _WHERE,
            "data_size_mismatch",
            f"stored {_member(info)} declares {info.file_size} bytes "
            f"but occupies {info.compress_size}",
        )


def _check_ratio(info: zipfile.ZipInfo, caps: InspectionCaps) -> None:
    if (
        info.file_size > RATIO_EXEMPT_BYTES
        and info.file_size > info.compress_size * caps.max_compression_ratio
    ):
        raise invalid(
            _WHERE,
            "compression_ratio",
            f"{_member(info)} inflates {info.compress_size} bytes to {info.file_size}, "
            f"over the ratio cap of {caps.max_compression_ratio:g} (a zip bomb?)",
        )


def _check_archive_ratio(
    infos: list[zipfile.ZipInfo], file_size: int, caps: InspectionCaps
) -> None:
    """The whole archive's ratio: members under the per-member exemption still add up."""
    total = sum(info.file_size for info in infos)
    if total > caps.archive_ratio_exempt_bytes and total > file_size * caps.max_compression_ratio:
        raise invalid(
            _WHERE,
            "compression_ratio",
            f"{len(infos)} members inflate a {file_size}-byte archive to {total} bytes, "
            f"over the ratio cap of {caps.max_compression_ratio:g} (a zip bomb?)",
        )


def _check_unique(infos: list[zipfile.ZipInfo]) -> None:
    seen: set[str] = set()
    for info in infos:
        if info.orig_filename in seen:
            raise invalid(_WHERE, "duplicate_key", f"{_member(info)} appears twice")
        seen.add(info.orig_filename)


def _check_disjoint(infos: list[zipfile.ZipInfo], directory_start: int) -> None:
    """No two members share bytes, and none runs into the central directory."""
    if not infos:
        return
    ordered = sorted(infos, key=lambda i: i.header_offset)
    nexts = [(_member(i), i.header_offset) for i in ordered[1:]]
    for info, (other, limit) in zip(
        ordered, [*nexts, ("the central directory", directory_start)], strict=True
    ):
        encoding = "utf-8" if info.flag_bits & _UTF8_NAME else "cp437"
        # The smallest a member can be: fixed local header, its name, its data.
        end = (
            info.header_offset
            + _LOCAL_HEADER_BYTES
            + len(info.orig_filename.encode(encoding, "replace"))
            + info.compress_size
        )
        if info.header_offset < 0 or end > limit:
            raise invalid(
                _WHERE,
                "overlapping_members",
                f"{_member(info)} [{info.header_offset}, {end}) overlaps {other} at byte {limit}",
            )


def _check_total(
    infos: list[zipfile.ZipInfo], caps: InspectionCaps, budget_bytes: int | None
) -> None:
    total = sum(info.file_size for info in infos)
    if budget_bytes is not None and total > budget_bytes:
        raise over_budget(_WHERE, total, budget_bytes, "bytes once its members are inflated")
    if total > caps.max_total_bytes:
        raise invalid(
            _WHERE,
            "too_large",
            f"members inflate to {total} bytes, over the cap of {caps.max_total_bytes}",
        )


def _inspect_member(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, caps: InspectionCaps
) -> tuple[str, str, list[int], int, int]:
    where = f"{_WHERE} {_member(info)}"
    try:
        with archive.open(info) as stream:
            # read(n) inflates at most n bytes: only the header is ever decompressed.
            header = npy.parse_header(stream.read, caps, where)
    except ZIP_MEMBER_ERRORS as exc:
        raise invalid(where, "bad_zip", f"unreadable: {exc}") from exc
    declared = header.header_bytes + header.data_bytes
    if declared != info.file_size:
        raise invalid(
            where,
            "data_size_mismatch",
            f"its header declares {declared} bytes ({header.dtype} {header.shape}), "
            f"the directory says {info.file_size}",
        )
    return npy.entry(tensor_name(info.orig_filename), header)
