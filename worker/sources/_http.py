"""Fetch a model over http(s): allowed hosts, public addresses pinned per hop, capped, cached.

The whole download runs under the job's deadline (the supervisor's), not only
httpx's per-read timeouts: a server that sends one byte just inside every read
timeout cannot hold a job past it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import httpx

from loadwarden.producer.errors import LoadError, SourceRefused, SourceUnavailable
from loadwarden.worker._files import ModelFile
from loadwarden.worker.config import SourcePolicy
from loadwarden.worker.sources._cache import Partial, cache_name, cache_root, cached, make_room
from loadwarden.worker.sources._local import Root, open_under

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
#: Chunks are gathered into writes of this size: one write and one hash update per
#: MiB, however small the server's chunks (a 1-byte-chunk flood once cost a syscall each).
_WRITE_BYTES = 1024 * 1024
#: The longest a download holds the event loop before letting other jobs run.
_HOLD_LOOP_S = 0.005
#: A body that arrives in pieces this small on average, once this many have come, is
#: refused: each piece costs the parser tens of microseconds (a 256 KiB body sent in
#: 1-byte chunks took 30 s of a core, bench/download_flood.py), and no real server
#: sends them (a slow TCP link still delivers whole segments, over 500 bytes).
_MIN_MEAN_CHUNK_BYTES = 64
_CHUNKS_BEFORE_CHECK = 4096
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


async def fetch(url: str, *, expected_sha256: str | None, policy: SourcePolicy) -> ModelFile:
    """Download ``url`` into the cache (or find it there) and open the cached file."""
    target = _allowed(url, policy)
    name = cache_name(target.path)
    cache = cache_root(policy.cache_dir)
    if expected_sha256 is not None:
        hit = cached(cache, expected_sha256, name, url)
        if hit is not None:
            return hit
    await asyncio.to_thread(make_room, cache, policy.max_download_bytes, policy.cache_max_bytes)
    try:
        digest = await _download(url, target, name, cache, expected_sha256, policy)
    except httpx.TimeoutException as exc:
        raise SourceUnavailable(f"{url!r} timed out: {type(exc).__name__}", code="timeout") from exc
    except httpx.ConnectError as exc:
        raise SourceUnavailable(f"{url!r} cannot be reached: {exc}", code="connect_failed") from exc
    except httpx.TransportError as exc:
        raise SourceUnavailable(
            f"{url!r} failed mid-transfer: {exc}", code="transfer_failed"
        ) from exc
    return open_under(cache, (digest, name), url)


async def _download(
    url: str,
    target: httpx.URL,
    name: str,
    cache: Root,
    expected_sha256: str | None,
    policy: SourcePolicy,
) -> str:
    timeout = httpx.Timeout(
        connect=policy.connect_timeout_s,
        read=policy.read_timeout_s,  # per read: the longest gap between two chunks
        write=policy.connect_timeout_s,  # we only send a small request
        pool=policy.connect_timeout_s,
    )
    # trust_env=False: a proxy from the environment would connect to a host we never checked.
    async with httpx.AsyncClient(
        timeout=timeout, follow_redirects=False, trust_env=False
    ) as client:
        for _ in range(policy.max_redirects + 1):
            response = await _send(client, target, policy)
            try:
                if response.status_code in _REDIRECTS and "location" in response.headers:
                    target = _redirected(url, target, response.headers["location"], policy)
                    continue
                return await _save(url, response, name, cache, expected_sha256, policy)
            finally:
                await response.aclose()
    raise SourceRefused(
        f"{url!r} redirects more than {policy.max_redirects} times", code="too_many_redirects"
    )


def _allowed(url: str, policy: SourcePolicy) -> httpx.URL:
    try:
        target = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise SourceRefused(f"{url!r} is not a valid URL: {exc}", code="bad_url") from exc
    if target.scheme not in ("http", "https"):
        raise SourceRefused(
            f"{target.scheme}:// is not a supported source", code="unsupported_scheme"
        )
    if not target.host:
        raise SourceRefused(f"{url!r} names no host", code="bad_url")
    spellings = {target.host.lower(), target.raw_host.decode("ascii").lower()}
    if not spellings & set(policy.allow_hosts):
        raise SourceRefused(
            f"host {target.host!r} is not in the allowed hosts", code="host_not_allowed"
        )
    return target


def _redirected(url: str, current: httpx.URL, location: str, policy: SourcePolicy) -> httpx.URL:
    try:
        following = current.join(location)
    except httpx.InvalidURL as exc:
        raise SourceRefused(f"{url!r} redirects to an invalid URL", code="bad_url") from exc
    if current.scheme == "https" and following.scheme == "http":
        raise SourceRefused(f"{url!r} redirects from https to plain http", code="insecure_redirect")
    return _allowed(str(following), policy)


async def _send(
    client: httpx.AsyncClient, target: httpx.URL, policy: SourcePolicy
) -> httpx.Response:
    """GET ``target`` from one of its checked addresses, never from a fresh DNS answer."""
    host = target.raw_host.decode("ascii")
    addresses = await _resolve(host, target.port or _default_port(target), policy)
    # The URL names the address we checked, so DNS cannot be asked again (and answer
    # differently); Host and SNI (also the name the certificate is checked against) keep the name.
    headers = {"Host": target.netloc.decode("ascii"), "Accept-Encoding": "identity"}
    extensions = {"sni_hostname": host} if target.scheme == "https" else {}
    failure: httpx.ConnectError | None = None
    for address in addresses:
        request = client.build_request(
            "GET", target.copy_with(host=address), headers=headers, extensions=extensions
        )
        try:
            return await client.send(request, stream=True)
        except httpx.ConnectError as exc:
            failure = exc
    assert failure is not None  # getaddrinfo never answers with an empty list
    raise failure


async def _resolve(host: str, port: int, policy: SourcePolicy) -> list[str]:
    """Every address ``host`` resolves to, each checked: one non-public address refuses all."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(policy.connect_timeout_s):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except TimeoutError as exc:
        raise SourceUnavailable(f"resolving {host!r} timed out", code="timeout") from exc
    except socket.gaierror as exc:
        raise SourceUnavailable(
            f"{host!r} cannot be resolved: {exc.strerror}", code="dns_failure"
        ) from exc
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    networks = [ipaddress.ip_network(n) for n in policy.allow_networks]
    for address in addresses:
        _check_address(host, address, networks)
    return addresses


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address carries and may be routed to (mapped, 6to4, Teredo, NAT64)."""
    found = [ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())]
    if ip in _NAT64:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return [v4 for v4 in found if v4 is not None]


def _is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    # fec0::/10 (site-local, deprecated but routable inside a site) is not global;
    # 2002::/16 embedding 127.0.0.1 is loopback in disguise.
    if isinstance(ip, ipaddress.IPv6Address) and (
        ip.is_site_local or not all(_is_public(v4) for v4 in _embedded_ipv4(ip))
    ):
        return False
    return ip.is_global and not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


def _check_address(host: str, address: str, networks: list[_Network]) -> None:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    # `in` does not compare versions: an IPv4 address would "match" some IPv6 networks.
    if any(ip.version == net.version and ip in net for net in networks):
        return
    if not _is_public(ip):
        raise SourceRefused(
            f"{host!r} resolves to {address}, which is not a public address"
            " (allow it with sources.allow_networks)",
            code="private_address",
        )


async def _save(
    url: str,
    response: httpx.Response,
    name: str,
    cache: Root,
    expected_sha256: str | None,
    policy: SourcePolicy,
) -> str:
    status = response.status_code
    if status != 200:
        raise SourceUnavailable(f"{url!r} answered HTTP {status}", code=f"http_{status}")
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        # We asked for identity: a compressed body would be hashed and stored compressed.
        raise SourceRefused(
            f"{url!r} was sent with Content-Encoding {encoding!r}", code="content_encoding"
        )
    cap = policy.max_download_bytes
    declared = _content_length(response)
    if declared is not None and declared > cap:
        raise _too_large(f"{url!r} declares {declared} bytes, more than the {cap} byte limit")
    loop = asyncio.get_running_loop()
    with Partial(cache, url) as partial:
        pending = bytearray()
        resume_at = loop.time() + _HOLD_LOOP_S
        chunks = 0
        async for chunk in response.aiter_raw():
            if partial.size + len(pending) + len(chunk) > cap:
                raise _too_large(f"{url!r} sent more than the {cap} byte limit")
            pending += chunk
            chunks += 1
            received = partial.size + len(pending)
            if chunks == _CHUNKS_BEFORE_CHECK and received < chunks * _MIN_MEAN_CHUNK_BYTES:
                raise SourceRefused(
                    f"{url!r} sends its body in pieces of {received / chunks:.0f} bytes "
                    f"on average (a flood of tiny chunks)",
                    code="tiny_chunks",
                )
            if len(pending) >= _WRITE_BYTES:
                partial.write(pending)
                pending.clear()
            # A flood of tiny chunks arrives already buffered: the iteration never waits,
            # so without this it would hold the event loop for as long as the flood lasts.
            if loop.time() >= resume_at:
                await asyncio.sleep(0)
                resume_at = loop.time() + _HOLD_LOOP_S
        partial.write(pending)
        return await partial.commit(name, expected_sha256)


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None  # h11 refuses a malformed length before we see it; the stream cap holds


def _too_large(message: str) -> LoadError:
    return SourceRefused(f"{message} (sources.max_download_bytes)", code="too_large")


def _default_port(target: httpx.URL) -> int:
    return 443 if target.scheme == "https" else 80
