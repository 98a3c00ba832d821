"""``hf://ORG/NAME[@REVISION]``: a model already in the local Hugging Face hub cache, offline.

The layout is huggingface_hub's (``file_download.py``)::

    <cache>/models--ORG--NAME/refs/<branch or tag>    a 40-hex commit hash, nothing else
                             /snapshots/<commit>/<file> -> ../../blobs/<etag>
                             /blobs/<etag>             sha256 for LFS files, git sha1 otherwise

``<cache>`` is ``SOURCES__HF_CACHE_DIR``, else huggingface_hub's own rule:
``HF_HUB_CACHE``, ``HUGGINGFACE_HUB_CACHE``, ``HF_HOME/hub``,
``$XDG_CACHE_HOME/huggingface/hub``, ``~/.cache/huggingface/hub``.

Why not ``huggingface_hub.try_to_load_from_cache``: it returns a path through
the snapshot's symlink, checked with ``os.path.isfile`` (which follows any
symlink, to ``/etc/passwd`` as readily as to a blob), and leaves the open to us
by path, racing any swap. We read the layout ourselves with descriptors:
every component opened ``O_NOFOLLOW`` relative to its parent, a snapshot entry
followed only when it is a relative symlink of the exact form
``../../blobs/<hex>`` and then opened inside that repository's ``blobs/``
descriptor. The cache is an allowed root for ``hf://`` sources only. It also
keeps huggingface_hub out of the worker's dependencies (the tests use it to lay
out caches). ``.no_exist/`` (files the hub said do not exist) is not needed:
we never ask the hub, and a file missing from a snapshot is simply missing.

A shard whose blob is named by a sha256 is checked against that name by the
supervisor's hash, taken while the child loads: a corrupted cached blob ends
``invalid`` (``sha256_mismatch``). The index, a small file stored in git, has a
blob named by its git sha1, checked when it is read (``blob_mismatch``).
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from loadwarden.producer.errors import InvalidModel, SourceRefused, SourceUnavailable
from loadwarden.producer.sources import COMMIT, parse_hf
from loadwarden.worker._files import OpenedModel, Shard
from loadwarden.worker._xdg import xdg_dir
from loadwarden.worker.config import InspectionCaps, SourcePolicy
from loadwarden.worker.formats._common import read_at
from loadwarden.worker.sources._checkpoint import open_folder, open_regular
from loadwarden.worker.sources._local import SPECIAL_TREES

# What huggingface_hub writes as a snapshot entry at the top of the snapshot.
_BLOB_LINK = re.compile(r"^\.\./\.\./blobs/([0-9a-f]{40}|[0-9a-f]{64})$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# A refs/ file holds 40 characters; anything much longer is not one.
_MAX_REF_BYTES = 256
_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def cache_dir(policy: SourcePolicy) -> Path:
    """The hub cache to read: the setting, else huggingface_hub's environment rule."""
    if policy.hf_cache_dir is not None:
        return policy.hf_cache_dir
    env = os.environ
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(name):
            return Path(os.path.expanduser(env[name]))
    if env.get("HF_HOME"):
        return Path(os.path.expanduser(env["HF_HOME"])) / "hub"
    return xdg_dir("XDG_CACHE_HOME", ".cache") / "huggingface" / "hub"


def parse(source: str) -> tuple[str, str]:
    """``(repo_id, revision)`` of an ``hf://`` source; ``SourceRefused`` (``bad_hf_name``)."""
    try:
        return parse_hf(source)
    except ValueError as exc:
        raise SourceRefused(f"{source!r}: {exc}", code="bad_hf_name") from None


def open_hf(source: str, policy: SourcePolicy, caps: InspectionCaps) -> OpenedModel:
    """Open the checkpoint of the cached snapshot ``source`` names; the caller closes it."""
    repo_id, revision = parse(source)
    cache = os.path.realpath(cache_dir(policy))
    if any(cache == tree or cache.startswith(tree + "/") for tree in SPECIAL_TREES):
        raise SourceRefused(f"the hub cache {cache!r} is under {cache[:4]}", code="special_path")
    repo_name = "models--" + repo_id.replace("/", "--")
    held: list[int] = []

    def enter(parent: int | None, name: str, what: str) -> int:
        try:
            fd = os.open(name, _DIR if parent is not None else _DIR & ~os.O_NOFOLLOW, dir_fd=parent)
        except OSError as exc:
            raise SourceUnavailable(
                f"{source!r} is not in the Hugging Face cache {cache!r}: no {what}"
                f" ({exc.strerror}); download it first (huggingface-cli download {repo_id})",
                code="not_found",
            ) from exc
        held.append(fd)
        return fd

    try:
        repo = enter(enter(None, cache, "cache folder"), repo_name, repo_name)
        commit = revision if COMMIT.match(revision) else _read_ref(repo, revision, source)
        snapshots = enter(repo, "snapshots", "snapshots/")
        try:
            snapshot = os.open(commit, _DIR, dir_fd=snapshots)
        except OSError as exc:
            raise InvalidModel(
                f"{source!r}: revision {revision!r} is commit {commit}, which has no snapshot in "
                f"{cache!r}/{repo_name} ({exc.strerror}): the cache is incomplete or damaged",
                code="missing_snapshot",
            ) from exc
        held.append(snapshot)
        blobs = enter(repo, "blobs", "blobs/")
        listing = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=snapshot)
        held.append(listing)
        folder = os.path.join(cache, repo_name, "snapshots", commit)

        def open_entry(name: str) -> Shard:
            return _open_snapshot_entry(listing, blobs, folder, name, source)

        return open_folder(listing, folder, source, caps, open_entry)
    finally:
        for fd in reversed(held):
            os.close(fd)


def _read_ref(repo: int, revision: str, source: str) -> str:
    """The commit a ``refs/`` file names, each component opened without following symlinks."""
    parts = ["refs", *revision.split("/")]
    fd = None
    try:
        for part in parts[:-1]:
            nxt = os.open(part, _DIR, dir_fd=repo if fd is None else fd)
            if fd is not None:
                os.close(fd)
            fd = nxt
        st = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            raise SourceRefused(
                f"{source!r}: refs/{revision} is not a regular file", code="not_regular_file"
            )
        ref = os.open(
            parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd
        )
        try:
            raw = read_at(ref, _MAX_REF_BYTES + 1, 0)
        finally:
            os.close(ref)
    except FileNotFoundError as exc:
        raise SourceUnavailable(
            f"{source!r}: the cache has no revision {revision!r} (no refs/{revision})",
            code="not_found",
        ) from exc
    except OSError as exc:
        raise SourceUnavailable(
            f"{source!r}: refs/{revision} cannot be read: {exc.strerror}", code="unreadable"
        ) from exc
    finally:
        if fd is not None:
            os.close(fd)
    text = raw.decode("ascii", errors="replace").strip()
    if not COMMIT.match(text):
        raise InvalidModel(
            f"{source!r}: refs/{revision} does not hold a commit hash", code="bad_ref"
        )
    return text


def _open_snapshot_entry(snapshot: int, blobs: int, folder: str, name: str, source: str) -> Shard:
    """A snapshot's file: a relative symlink into ``blobs/`` (followed there, and only there),
    or a regular file (a cache written where symlinks are not supported)."""
    path = os.path.join(folder, name)
    try:
        st = os.stat(name, dir_fd=snapshot, follow_symlinks=False)
        target = os.readlink(name, dir_fd=snapshot) if stat.S_ISLNK(st.st_mode) else None
    except OSError as exc:
        raise SourceUnavailable(
            f"{path!r} (of {source!r}) cannot be read: {exc.strerror}",
            code="not_found" if isinstance(exc, FileNotFoundError) else "unreadable",
        ) from exc
    if target is None:
        return Shard(name, open_regular(snapshot, name, path, source))
    blob = _BLOB_LINK.match(target)
    if blob is None:
        raise SourceRefused(
            f"{path!r} (of {source!r}) is a symlink to {target!r}, not into its repository's"
            " blobs/: refused",
            code="outside_blobs",
        )
    etag = blob[1]
    opened = open_regular(blobs, etag, os.path.join(folder, target), source)
    if _SHA256.match(etag):
        return Shard(name, opened, expected_sha256=etag)
    return Shard(name, opened, expected_git_sha1=etag)
