"""The sha256 of a model file, computed on the supervisor's side, out of the loader's reach.

A loader child is untrusted code's first target: if it computed the digest that
verifies its own file, a compromised loader could answer with whatever the
request expects. So the supervisor hashes the descriptor it opened itself, in a
thread (hashlib releases the GIL on large buffers, so the hash runs on another
core while the child loads), and compares the digest with the request.

Reads are ``pread`` (the file offset the child shares is never moved) into one
reused buffer, so the supervisor's memory stays at one window per load.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import threading
from collections.abc import Sequence

from loadwarden.producer.errors import InvalidModel, LoadError, SourceUnavailable

#: 256 KiB reads: as fast as 64 KiB ones (1.2-1.4 GB/s, see DESIGN.md's facts), with
#: a quarter of the GIL round trips; larger reads were measured slower.
WINDOW_BYTES = 256 * 1024


class _Stopped(Exception):
    """The hash was abandoned (the load was cancelled or ended first)."""


def sha256_of(fd: int, size: int, stop: threading.Event | None = None) -> str:
    """The sha256 of the first ``size`` bytes of ``fd``; raise if the file is shorter now."""
    digest = hashlib.sha256()
    buffer = bytearray(WINDOW_BYTES)
    view = memoryview(buffer)
    offset = 0
    while offset < size:
        if stop is not None and stop.is_set():
            raise _Stopped
        try:
            got = os.preadv(fd, [view[: min(WINDOW_BYTES, size - offset)]], offset)
        except OSError as exc:
            raise SourceUnavailable(f"read failed: {exc.strerror}", code="unreadable") from exc
        if got == 0:
            raise InvalidModel(
                f"the file was truncated to {offset} bytes while it was being hashed",
                code="file_changed",
            )
        digest.update(view[:got])
        offset += got
    return digest.hexdigest()


async def digest_file(fd: int, size: int) -> str:
    """``sha256_of`` in a thread; cancelling stops the thread within one window, then raises."""
    stop = threading.Event()
    future = asyncio.ensure_future(asyncio.to_thread(sha256_of, fd, size, stop))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        stop.set()  # the thread reads our descriptor: it must be done before the caller closes it
        with contextlib.suppress(BaseException):
            await future
        raise


async def digest_files(files: Sequence[tuple[int, int]]) -> list[str]:
    """Each ``(fd, size)``'s sha256, one file after the other (a checkpoint's shards)."""
    return [await digest_file(fd, size) for fd, size in files]


def check_digest(actual: str, expected: str) -> LoadError | None:
    """The error for a file whose digest is not the one the request pins, else None."""
    if actual == expected:
        return None
    return InvalidModel(
        f"sha256 of the file is {actual}, the request expects {expected}", code="sha256_mismatch"
    )
