"""Who may act, and proof that a form was ours: credentials, CSRF tokens, headers.

Reading needs no credentials; an action (retry, cancel) needs the credentials
given at start, from the environment:

    FLOWSMITH_DASHBOARD_PASSWORD   the password (or token); unset: read-only
    FLOWSMITH_DASHBOARD_USER       the user name for HTTP Basic auth (default: admin)

A browser sends them by HTTP Basic auth (it asks once, then repeats them); a
script may send ``Authorization: Bearer <password>`` instead. A browser also
repeats Basic credentials on a form another site makes it post, so every form
carries a CSRF token as well: the HMAC of a random cookie of ours
(SameSite=Strict), keyed by the credentials, so every process that serves the
dashboard with the same credentials accepts it and no other site can make one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

PASSWORD_ENV = "FLOWSMITH_DASHBOARD_PASSWORD"
USER_ENV = "FLOWSMITH_DASHBOARD_USER"
DEFAULT_USER = "admin"
REALM = "FlowSmith dashboard"
CSRF_COOKIE = "flowsmith_csrf"
CSRF_FIELD = "csrf_token"


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str = field(repr=False)

    def __post_init__(self) -> None:
        if not self.password:
            raise ValueError("the dashboard password is empty: set one, or give no credentials")
        if ":" in self.user:
            raise ValueError(f"the dashboard user {self.user!r} contains ':' (HTTP Basic forbids)")

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Credentials | None:
        """The credentials in the environment; None (read-only) without a password."""
        password = environ.get(PASSWORD_ENV, "")
        if not password:
            return None
        return cls(environ.get(USER_ENV) or DEFAULT_USER, password)

    def admit(self, authorization: str | None) -> bool:
        """Whether an Authorization header carries these credentials (Basic or Bearer)."""
        scheme, _, value = (authorization or "").strip().partition(" ")
        if scheme.lower() == "bearer":
            return _same(value.strip(), self.password)
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return False
        user, colon, password = decoded.partition(":")
        # Both compared, always: how long a refusal takes says nothing of which failed.
        return bool(colon) & _same(user, self.user) & _same(password, self.password)

    def csrf_token(self, cookie: str) -> str:
        """The token a form of ours carries for this browser's cookie."""
        key = hashlib.sha256(f"flowsmith-dashboard-csrf\0{self.user}\0{self.password}".encode())
        return hmac.new(key.digest(), cookie.encode(), hashlib.sha256).hexdigest()

    def csrf_valid(self, cookie: str | None, token: str | None) -> bool:
        return bool(cookie and token) and _same(self.csrf_token(cookie or ""), token or "")


def new_csrf_cookie() -> str:
    return secrets.token_urlsafe(32)


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


# Scripts only from our own static folder, no inline script or style, no framing.
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "x-frame-options": "DENY",
}


class SecurityHeaders:
    """ASGI middleware: the headers above on every response of the dashboard."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers += [
                    (name.encode(), value.encode())
                    for name, value in SECURITY_HEADERS.items()
                    if name.encode() not in present
                ]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
