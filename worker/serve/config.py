"""What ``serve`` runs with: the token, the caps on requests, and the bind rule."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

#: ``?wait=`` is capped here: a proxy's idle timeout is often 60 s, so stay under it; clients
#: loop for longer waits.
MAX_WAIT_S = 55.0
#: The environment variable holding the API token (a file is read with --token-file).
TOKEN_ENV = "LOADWARDEN_API_TOKEN"
#: Shorter tokens are refused: 16 characters of a random token are ~96 bits at least.
MIN_TOKEN_CHARS = 16


class ServeConfigError(ValueError):
    """``serve`` cannot start as configured (a bad token, an open bind without one)."""


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """The settings of one ``serve`` process (everything else comes from ``Settings``)."""

    #: The bearer token every /v1 call and console action must carry; None only on loopback.
    token: str | None = None
    #: A LoadRequest is at most a few KB and a catalog a few hundred lines: 1 MiB is ample
    #: and bounds what one request can make the server hold.
    max_body_bytes: int = 1 << 20
    #: Open event streams at once; each polls Redis a few times a second, so bound them.
    max_event_streams: int = 200
    #: How often an event stream looks at its job: a person notices 250 ms, Redis barely.
    events_poll_s: float = 0.25
    #: A comment line this often keeps proxies from closing an idle stream (they use 30-60 s).
    events_keepalive_s: float = 15.0
    #: A console session lasts a working day; rotating the token ends every session at once.
    session_s: int = 12 * 3600


def load_token(token_file: Path | None = None) -> str | None:
    """The API token from ``--token-file`` or ``LOADWARDEN_API_TOKEN`` (None if neither)."""
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            raise ServeConfigError(f"cannot read the token file {token_file}: {exc}") from None
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
        if not token:
            return None
    if len(token) < MIN_TOKEN_CHARS or not token.isprintable() or " " in token:
        raise ServeConfigError(
            f"the API token must be at least {MIN_TOKEN_CHARS} printable characters, no spaces"
        )
    return token


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server on this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name that may resolve anywhere


def refuse_open_bind(host: str, token: str | None) -> None:
    """Without a token, anything but loopback would hand the queue to the network: refuse."""
    if token is None and not is_loopback(host):
        raise ServeConfigError(
            f"refusing to listen on {host} without an API token: set {TOKEN_ENV} or pass "
            "--token-file (or listen on 127.0.0.1)"
        )
