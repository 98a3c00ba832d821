"""Where a model comes from: a local path inside the allowed roots, an http(s) URL, or
``hf://ORG/NAME[@REVISION]`` in the local Hugging Face cache.

``open_model`` turns a request's ``source`` into every open file of the model
(``OpenedModel``: one file, or a checkpoint's shards: see ``_checkpoint`` and
``_hf``); ``open_source`` opens one file. Both raise one of the load errors, each
with a stable ``code``::

    SourceRefused        policy says no (outcome ``refused``)
        outside_root         the path, a ``..`` or a symlink leads out of every allowed root
        special_path         under /proc, /sys or /dev, or on a kernel pseudo-filesystem
                             (proc, sysfs, cgroup, debugfs, ...: fstatfs f_type), whatever
                             the roots say
        hard_link            a file with more than one link, when ``refuse_hard_links``
        not_regular_file     a directory, FIFO, socket or device (checked before any open)
        symlink_loop         more than 40 symlinks on the way
        bad_path             a path with a NUL byte
        file_changed         a component was swapped between its check and its open
        unsupported_scheme   a URL scheme other than http and https
        bad_url              a URL that does not parse or names no host
        host_not_allowed     the URL's host (or a redirect's) is not in ``allow_hosts``
        private_address      the host resolves to a non-public address outside ``allow_networks``
        insecure_redirect    a redirect from https to http
        too_many_redirects   more than ``max_redirects`` hops
        too_large            Content-Length or the streamed body is over ``max_download_bytes``
        content_encoding     the server compressed the body although we asked for identity
        tiny_chunks          the body comes in pieces of under 64 bytes on average (a flood)
        symlink              a file of a checkpoint folder is a symlink (not followed)
        bad_hf_name          an hf:// repository id or revision that is not one
        outside_blobs        a cache snapshot's entry is not a symlink into its repository's blobs/
        signature_*          a required signature is missing, bad, by another signer, or does
                             not match the files (``loadwarden.worker.load.signing``)
    SourceUnavailable    cannot be reached or read, worth retrying (outcome ``unavailable``)
        not_found            no such file (or no such directory on the way)
        unreadable           the file exists but cannot be read (permissions, I/O)
        root_unavailable     an allowed root itself cannot be opened
        dns_failure          the host does not resolve
        connect_failed       no address of the host accepts a connection
        timeout              resolving, connecting or a gap between body reads took too long
        transfer_failed      the connection broke or the server spoke bad HTTP mid-transfer
        http_<status>        any final status but 200 (``http_404``, ``http_503``, ...)
        cache_unwritable     the download cache cannot be created or written
    InvalidModel         (outcome ``invalid``)
        sha256_mismatch      the downloaded bytes do not have the expected digest
        no_checkpoint        a folder with no index, no model.safetensors, no single .safetensors
        ambiguous_checkpoint a folder with several *.safetensors.index.json
        duplicate_shard      two shard names of an index open the same file (a hard link)
        missing_snapshot     an hf:// revision whose commit has no snapshot in the cache
        bad_ref              a cache refs/ file that does not hold a commit hash
        blob_mismatch        a cached index whose content is not the git blob its name says
        (index codes)        see ``loadwarden.worker.formats.index``

Downloads land in ``<cache_dir>/<sha256>/<name>`` (``name``: the URL's last path
segment, reduced to ``[A-Za-z0-9._-]``); a request with a digest that is already
cached is served without any network I/O. Redirects are followed by hand, at most
``max_redirects`` of them, each hop checked against the same host and address rules.
Local files (and hf:// blobs) are not hashed here: the supervisor hashes every file while
the child loads (``loadwarden.worker.load._digest``), outside the loader's reach.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Awaitable, Callable

from loadwarden.producer.errors import SourceRefused
from loadwarden.producer.sources import is_hf, is_url, url_scheme
from loadwarden.worker._files import ModelFile, OpenedModel
from loadwarden.worker.config import InspectionCaps, SourcePolicy
from loadwarden.worker.sources._hf import open_hf
from loadwarden.worker.sources._local import open_local
from loadwarden.worker.sources._ondisk import open_local_inline, open_local_learning

__all__ = ["open_model", "open_model_here", "open_source"]

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


async def open_source(
    source: str, *, expected_sha256: str | None, policy: SourcePolicy
) -> ModelFile:
    """Open ``source`` as a regular, read-only file the policy allows; the caller closes it.

    A path is resolved inside ``policy.allow_roots``; an ``http://`` or ``https://``
    URL is downloaded into (or found in) ``policy.cache_dir`` and checked against
    ``expected_sha256`` when one is given. Raises ``SourceRefused``,
    ``SourceUnavailable`` or ``InvalidModel``; ``ValueError`` for a digest that is not
    64 lower-case hex digits (``LoadRequest`` never lets one through).
    """
    if expected_sha256 is not None and not _SHA256.match(expected_sha256):
        raise ValueError(f"expected_sha256 {expected_sha256!r} is not 64 lower-case hex digits")
    scheme = url_scheme(source)
    if scheme is None:
        return open_local(source, policy.allow_roots, refuse_hard_links=policy.refuse_hard_links)
    if scheme.lower() not in ("http", "https"):
        raise SourceRefused(f"{scheme}:// is not a supported source", code="unsupported_scheme")
    # httpx is imported on the first URL: workers that only load local files stay lean.
    from loadwarden.worker.sources._http import fetch

    return await fetch(source, expected_sha256=expected_sha256, policy=policy)


async def open_model(
    source: str,
    *,
    expected_sha256: str | None,
    policy: SourcePolicy,
    caps: InspectionCaps | None = None,
    before_thread: Callable[[], Awaitable[None]] | None = None,
) -> OpenedModel:
    """Open every file of the model ``source`` names; the caller closes them.

    A local path may name a file, a ``*.safetensors.index.json`` or a folder holding a
    checkpoint; ``hf://ORG/NAME[@REVISION]`` names a snapshot in the hub cache
    (``policy.hf_cache_dir``, else huggingface_hub's rule); a URL names one file.
    Index files are read and checked here (bounded by ``caps``); shards are not
    inspected yet. ``before_thread`` is awaited before any open that is not done at once on
    the event loop (in a thread, or a download).
    """
    checks = caps or InspectionCaps()
    hard_links = policy.refuse_hard_links
    if not is_hf(source) and not is_url(source):
        # A single file under a root on a local disk opens here, on the loop (``_ondisk``):
        # its few syscalls cost less than the thread hop (1-2 ms with the GIL handed over).
        opened = open_local_inline(source, policy.allow_roots, refuse_hard_links=hard_links)
        if opened is not None:
            return opened
    if before_thread is not None:
        await before_thread()
    if is_hf(source):
        return await _off_loop(lambda: open_hf(source, policy, checks))
    if not is_url(source):
        return await _off_loop(
            lambda: open_local_learning(
                source, policy.allow_roots, checks, refuse_hard_links=hard_links
            )
        )
    return OpenedModel.single(
        await open_source(source, expected_sha256=expected_sha256, policy=policy)
    )


def open_model_here(
    source: str, *, policy: SourcePolicy, caps: InspectionCaps | None = None
) -> OpenedModel | None:
    """``open_model`` in this thread, for a process with no event loop to keep free (the
    command line): a local path or ``hf://`` opened as ``open_model`` opens it off the
    loop, blocking; None for a URL, which ``open_model`` downloads."""
    if is_url(source):
        return None
    checks = caps or InspectionCaps()
    if is_hf(source):
        return open_hf(source, policy, checks)
    hard_links = policy.refuse_hard_links
    return open_local_learning(source, policy.allow_roots, checks, refuse_hard_links=hard_links)


async def _off_loop(open_files: Callable[[], OpenedModel]) -> OpenedModel:
    """Run a blocking open (an index may be 16 MiB of JSON) in a thread; if we are
    cancelled meanwhile, wait for it and close what it opened, so no descriptor leaks."""
    import asyncio  # here: the command line's opens (``open_model_here``) need no loop

    future = asyncio.ensure_future(asyncio.to_thread(open_files))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            (await future).close()
        raise
