"""The download cache: ``<cache_dir>/<sha256>/<name>``, written through a temp file and a rename.

With ``sources.cache_max_bytes`` set, room for the largest allowed download is
made before each download by evicting the least recently used entries (a hit
refreshes an entry's mtime), so the cache never outgrows a volume's size limit
(a Kubernetes emptyDir's ``sizeLimit`` evicts the whole pod when crossed).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Self

from loadwarden.producer.errors import InvalidModel, SourceUnavailable
from loadwarden.worker._files import ModelFile
from loadwarden.worker.sources._local import Root, open_under

#: Temp files of downloads in progress; anything with this prefix is never a cache entry.
PARTIAL_PREFIX = ".partial-"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
# Well under NAME_MAX (255 bytes) so the temp-file affixes and any filesystem fit.
_MAX_NAME = 128


def cache_name(url_path: str) -> str:
    """A safe file name from the last segment of a URL path (``model`` if nothing is left)."""
    name = _UNSAFE.sub("_", url_path.rsplit("/", 1)[-1])[:_MAX_NAME]
    # Leading dots would make "..", "." or a hidden name that looks like one of our temp files.
    name = name.lstrip(".")
    return name or "model"


def cache_root(cache_dir: Path) -> Root:
    """The cache as an allowed root, created (owner-only) if missing."""
    try:
        cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise SourceUnavailable(
            f"the download cache {str(cache_dir)!r} cannot be created: {exc.strerror}",
            code="cache_unwritable",
        ) from exc
    return Root.of(cache_dir)


def cached(cache: Root, sha256: str, name: str, source: str) -> ModelFile | None:
    """The cached file for this digest and name, opened (and marked used), or None."""
    try:
        found = open_under(cache, (sha256, name), source)
    except SourceUnavailable as exc:
        if exc.code == "not_found":
            return None
        raise
    with contextlib.suppress(OSError):  # recency is a hint for eviction, never a failure
        os.utime(os.path.join(cache.real, sha256, name), follow_symlinks=False)
    return found


def _entries(cache: Root) -> tuple[int, list[tuple[float, int, str]]]:
    """Bytes in the cache (partial downloads included) and its entries (mtime, size, path)."""
    used, entries = 0, []
    with os.scandir(cache.real) as top:
        for item in top:
            if item.is_file(follow_symlinks=False):  # a download in progress
                used += item.stat(follow_symlinks=False).st_size
            elif item.is_dir(follow_symlinks=False):
                with os.scandir(item.path) as folder:
                    for entry in folder:
                        if entry.is_file(follow_symlinks=False):
                            st = entry.stat(follow_symlinks=False)
                            used += st.st_size
                            entries.append((st.st_mtime, st.st_size, entry.path))
    return used, entries


def make_room(cache: Root, need_bytes: int, cap_bytes: int | None) -> list[str]:
    """Evict least recently used entries until ``need_bytes`` more fit under ``cap_bytes``.

    Returns the evicted paths. A load that has an evicted file open keeps reading it (the
    inode lives until closed); the next request for it downloads it again.
    """
    if cap_bytes is None:
        return []
    try:
        used, entries = _entries(cache)
    except OSError as exc:
        raise _unwritable(cache, str(cache.real), exc) from exc
    evicted = []
    for _, size, path in sorted(entries):
        if used + need_bytes <= cap_bytes:
            break
        with contextlib.suppress(FileNotFoundError):  # another worker evicted it first
            os.unlink(path)
            evicted.append(path)
        used -= size
        with contextlib.suppress(OSError):  # the digest folder, once empty
            os.rmdir(os.path.dirname(path))
    return evicted


class Partial:
    """A download in progress: a temp file in the cache dir, hashed as it is written.

    Leaving the ``with`` block without ``commit()`` (an error, a cancellation) closes
    and removes the temp file, so a partial download never looks like a finished one.
    """

    def __init__(self, cache: Root, source: str) -> None:
        self.cache = cache
        self.source = source
        self.size = 0
        self._hash = hashlib.sha256()
        try:
            self._fd, self._path = tempfile.mkstemp(dir=cache.real, prefix=PARTIAL_PREFIX)
        except OSError as exc:
            raise _unwritable(cache, source, exc) from exc
        self._done = False

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if not self._done:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)

    def write(self, chunk: bytes | bytearray) -> None:
        """Hash and append one chunk."""
        self._hash.update(chunk)
        view = memoryview(chunk)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            raise _unwritable(self.cache, self.source, exc) from exc
        self.size += len(chunk)

    async def commit(self, name: str, expected_sha256: str | None) -> str:
        """Check the digest, then move the file to ``<sha256>/<name>``; returns the digest."""
        digest = self._hash.hexdigest()
        if expected_sha256 is not None and digest != expected_sha256:
            raise InvalidModel(
                f"{self.source!r} has sha256 {digest}, not the expected {expected_sha256}",
                code="sha256_mismatch",
            )
        try:
            # Durable before it is visible: after a crash the name holds all of it or nothing.
            await asyncio.to_thread(os.fsync, self._fd)
            os.close(self._fd)
            self._fd = -1
            folder = os.path.join(self.cache.real, digest)
            os.makedirs(folder, mode=0o700, exist_ok=True)
            os.replace(self._path, os.path.join(folder, name))
        except OSError as exc:
            raise _unwritable(self.cache, self.source, exc) from exc
        self._done = True
        return digest


def _unwritable(cache: Root, source: str, exc: OSError) -> SourceUnavailable:
    return SourceUnavailable(
        f"cannot write {source!r} to the download cache {cache.real!r}: {exc.strerror}",
        code="cache_unwritable",
    )
