"""Who may call: the bearer token for /v1, a signed session cookie and CSRF tokens for the console.

Everything is derived from the API token with HMAC, so nothing is stored and
rotating the token ends every session. With no token (loopback only) the key is
random per process: forms still carry CSRF tokens, sessions are not needed.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from fastapi import Request

from loadwarden.worker.serve.problems import Problem

SESSION_COOKIE = "loadwarden_session"


class Auth:
    """Checks for one ``serve`` process."""

    def __init__(self, token: str | None, session_s: int) -> None:
        self.token = token
        self.session_s = session_s
        seed = token.encode() if token else secrets.token_bytes(32)
        self._key = hashlib.sha256(b"loadwarden-serve-v1:" + seed).digest()

    @property
    def required(self) -> bool:
        return self.token is not None

    def _sign(self, purpose: str, value: str) -> str:
        return hmac.new(self._key, f"{purpose}:{value}".encode(), hashlib.sha256).hexdigest()

    def bearer_ok(self, request: Request) -> bool:
        if self.token is None:
            return True
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), self.token.encode()
        )

    def require_bearer(self, request: Request) -> None:
        if not self.bearer_ok(request):
            raise Problem(
                401,
                "a valid bearer token is required (Authorization: Bearer <token>)",
                kind="unauthorized",
                headers={"WWW-Authenticate": 'Bearer realm="loadwarden"'},
            )

    def token_matches(self, given: str) -> bool:
        return self.token is not None and hmac.compare_digest(given.encode(), self.token.encode())

    def new_session(self) -> str:
        issued = str(int(time.time()))
        return f"{issued}.{self._sign('session', issued)}"

    def session(self, request: Request) -> str | None:
        """The request's valid console session ("open" when no token is configured)."""
        if self.token is None:
            return "open"
        value = request.cookies.get(SESSION_COOKIE, "")
        issued, _, signature = value.partition(".")
        if not issued.isdigit() or not hmac.compare_digest(
            signature, self._sign("session", issued)
        ):
            return None
        if time.time() - int(issued) > self.session_s:
            return None
        return value

    def csrf_token(self, session: str) -> str:
        return self._sign("csrf", session)

    def csrf_ok(self, session: str, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self.csrf_token(session).encode())
