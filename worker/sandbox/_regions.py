"""Read tensors' byte ranges from a descriptor into fresh arrays: one copy, parallel preads.

Runs in the load child (stdlib, numpy and ml_dtypes only). Every array is
allocated first (untouched memory: nothing is resident yet), then filled by
``os.preadv`` straight from the page cache, in pieces shared by a few threads:
``preadv`` releases the GIL, and what bounds a load is the first touch of fresh
memory (page faults), which two cores take in parallel. Each piece's pages are
faulted in by one ``madvise(MADV_POPULATE_WRITE)`` just before its pread (Linux >=
5.14; skipped silently elsewhere): one call per 16 MiB instead of a fault per page
in the middle of the copy, 7-10% less CPU here (bench/load.py). Nothing maps the file,
so a file truncated under the loader is a short read (``FileChanged``), never a
SIGBUS.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import ml_dtypes  # noqa: F401  (gives numpy bfloat16 and the FP8 types, by name)
import numpy as np

from loadwarden.worker.binary.dtypes import ElementType
from loadwarden.worker.binary.pread import pread_into
from loadwarden.worker.sandbox._linux import populate_write
from loadwarden.worker.sandbox._registry import FileChanged

Array = np.ndarray[Any, Any]

#: Threads that pread at once. Measured with bench/load.py (2 cores, warm page
#: cache, sha256 hashed alongside): see README "How it is built".
READ_THREADS = 2
#: Stack of a pread thread: it only calls preadv, and the default (RLIMIT_STACK, often
#: 8 MiB) would count against the child's address-space limit for nothing.
THREAD_STACK_BYTES = 256 * 1024
#: Largest piece one pread fills: small enough that threads share a big tensor
#: evenly, large enough that syscalls stay few (64 per GiB).
PIECE_BYTES = 16 * 1024 * 1024
#: Fault each piece's pages in by one madvise before its pread (see the module's docstring).
PREFAULT = True
#: Smaller pieces are not worth a system call: tiny loads keep the preads they had.
PREFAULT_MIN_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Region:
    """A tensor's bytes in the file: where, how many, and the array they become."""

    name: str
    offset: int
    nbytes: int
    kind: ElementType
    shape: list[int]


def read_regions(fd: int, regions: Sequence[Region], threads: int | None = None) -> list[Array]:
    """Each region as a fresh array of its kind's array type and shape (flat ``uint8`` bytes
    for a kind with none: packed or block-quantized), in the order given.

    ``threads`` defaults to ``READ_THREADS``.
    """
    threads = READ_THREADS if threads is None else threads
    raws = [np.empty(r.nbytes, dtype=np.uint8) for r in regions]
    pieces = [
        (region, raw, start)
        for region, raw in zip(regions, raws, strict=True)
        for start in range(0, region.nbytes, PIECE_BYTES)
    ]
    if not (threads > 1 and len(pieces) > 1 and _fill_in_threads(fd, pieces, threads)):
        for piece in pieces:
            _fill(fd, *piece)
    return [_as_array(raw, r) for raw, r in zip(raws, regions, strict=True)]


def _fill_in_threads(fd: int, pieces: list[tuple[Region, Array, int]], threads: int) -> bool:
    """Fill every piece from ``threads`` threads; False if they could not be started."""
    previous = threading.stack_size(THREAD_STACK_BYTES)
    try:
        with ThreadPoolExecutor(threads, thread_name_prefix="pread") as pool:
            for _ in pool.map(lambda piece: _fill(fd, *piece), pieces):
                pass
    except RuntimeError:  # "can't start new thread": no room under the address-space limit
        return False
    finally:
        threading.stack_size(previous)
    return True


def _fill(fd: int, region: Region, raw: Array, start: int) -> None:
    view = raw.data[start : start + PIECE_BYTES]
    if PREFAULT and len(view) >= PREFAULT_MIN_BYTES:
        populate_write(raw.ctypes.data + start, len(view))
    if pread_into(fd, view, region.offset + start) != len(view):
        raise FileChanged(f"the file was truncated in tensor {region.name!r}")


def _as_array(raw: Array, region: Region) -> Array:
    if region.kind.array is None:
        return raw
    return raw.view(np.dtype(region.kind.array)).reshape(region.shape)
