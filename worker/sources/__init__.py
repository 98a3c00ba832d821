"""Where a model comes from: a local path inside the allowed roots, or an http(s) URL.

``open_source`` turns a request's ``source`` into an open ``ModelFile`` or raises
one of the load errors, each with a stable ``code``::

    SourceRefused        policy says no (outcome ``refused``)
        outside_root         the path, a ``..`` or a symlink leads out of every allowed root
        special_path         under /proc, /sys or /dev, whatever the roots say
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

Downloads land in ``<cache_dir>/<sha256>/<name>`` (``name``: the URL's last path
segment, reduced to ``[A-Za-z0-9._-]``); a request with a digest that is already
cached is served without any network I/O. Redirects are followed by hand, at most
``max_redirects`` of them, each hop checked against the same host and address rules.
Local files are not hashed here: the sandbox hashes them while it loads.
"""

from __future__ import annotations

import re

from loadwarden.producer.errors import SourceRefused
from loadwarden.producer.settings import SourcePolicy
from loadwarden.worker._files import ModelFile
from loadwarden.worker.sources._local import open_local

__all__ = ["open_source"]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
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
    scheme = _SCHEME.match(source)
    if scheme is None:
        return open_local(source, policy.allow_roots)
    if scheme[1].lower() not in ("http", "https"):
        raise SourceRefused(f"{scheme[1]}:// is not a supported source", code="unsupported_scheme")
    # httpx is imported on the first URL: workers that only load local files stay lean.
    from loadwarden.worker.sources._http import fetch

    return await fetch(source, expected_sha256=expected_sha256, policy=policy)
