"""Which Redis a URL names: one server, or a service that Sentinels manage.

URLs::

    redis://[user:pass@]host[:port][/db]       rediss://… (TLS)     unix:///path[?db=N]
    redis+sentinel://[user:pass@]host:port[,host:port…]/service[/db]
    rediss+sentinel://…                        TLS to the Sentinels and to the data nodes

The user and password (or ``?username=`` / ``?password=``) are the data nodes'
(the primary's and replicas'), as in a plain URL; query options are redis-py's
own (``ssl_ca_certs``, ``ssl_cert_reqs``, ``ssl_certfile``, ``ssl_keyfile``, …).
Sentinels with an ACL of their own take ``?sentinel_username=…&sentinel_password=…``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import redis.connection

#: URL schemes that name Sentinels rather than a server.
SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}
#: Sentinels listen on 26379 unless told otherwise (redis.io's sentinel docs).
SENTINEL_DEFAULT_PORT = 26379


@dataclass(frozen=True)
class RedisTarget:
    """A parsed Redis URL: a server (``sentinels`` empty) or a Sentinel-managed service."""

    url: str
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str | None = None
    ssl: bool = False
    #: Connection options for the data nodes (db, username, password, ssl_*), from the URL.
    options: dict[str, Any] = field(default_factory=dict)
    #: Options for the Sentinels themselves (their own ACL, TLS).
    sentinel_options: dict[str, Any] = field(default_factory=dict)

    @property
    def display(self) -> str:
        """The URL with any password masked, for messages and logs."""
        parts = urlsplit(self.url)
        if parts.password is None:
            return self.url
        return self.url.replace(f":{parts.password}@", ":***@", 1)


def _host_port(text: str) -> tuple[str, int]:
    if text.startswith("["):  # [v6]:port
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    if not host:
        raise ValueError(f"no host in {text!r}")
    try:
        return host, int(port) if port else SENTINEL_DEFAULT_PORT
    except ValueError:
        raise ValueError(f"bad port in {text!r}") from None


def parse_redis_url(url: str) -> RedisTarget:
    """Parse any URL loadwarden accepts; ValueError names what is wrong with it."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("redis", "rediss", "unix"):
        return RedisTarget(url=url, ssl=scheme == "rediss")
    if scheme not in SENTINEL_SCHEMES:
        raise ValueError(
            f"unsupported Redis URL scheme {parts.scheme!r}: use redis://, rediss://, "
            "unix://, redis+sentinel:// or rediss+sentinel://"
        )
    ssl = SENTINEL_SCHEMES[scheme]
    userinfo, _, hosts = parts.netloc.rpartition("@")
    sentinels = tuple(_host_port(h.strip()) for h in hosts.split(",") if h.strip())
    if not sentinels:
        raise ValueError("a Sentinel URL names at least one Sentinel: host:port[,host:port…]")
    path = [unquote(p) for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ValueError("a Sentinel URL's path is /SERVICE_NAME[/DB]")
    query = dict(parse_qsl(parts.query))
    options: dict[str, Any] = {}
    sentinel_options: dict[str, Any] = {}
    for key in ("sentinel_username", "sentinel_password"):
        if key in query:
            sentinel_options[key.removeprefix("sentinel_")] = query.pop(key)
    db = query.pop("db", path[1] if len(path) == 2 else "0")
    # The data nodes' credentials and TLS options, read exactly as redis-py reads a plain URL.
    plain = f"{'rediss' if ssl else 'redis'}://{userinfo + '@' if userinfo else ''}sentinel"
    parsed = redis.connection.parse_url(  # type: ignore[no-untyped-call]
        plain + ("?" + urlencode(query) if query else "")
    )
    parsed.pop("host", None)
    parsed.pop("port", None)
    parsed.pop("connection_class", None)
    try:
        options = {**parsed, "db": int(db)}
    except ValueError:
        raise ValueError(f"the database must be a number, not {db!r}") from None
    if ssl:
        sentinel_options |= {k: v for k, v in options.items() if k.startswith("ssl_")}
        sentinel_options["ssl"] = True
    return RedisTarget(
        url=url,
        sentinels=sentinels,
        service=path[0],
        ssl=ssl,
        options=options,
        sentinel_options=sentinel_options,
    )
