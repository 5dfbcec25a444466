"""Errors and how they are answered (RFC 6750 section 3, RFC 9449 section 7.1).

An :class:`AuthError` is raised anywhere on the request path and rendered once,
in the middleware, as a status line, a ``WWW-Authenticate`` challenge and a JSON
body. Nothing else on the path writes responses.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence

from .types import StartResponse

__all__ = [
    "AuthError",
    "ConfigurationError",
    "InvalidRequest",
    "InvalidToken",
    "InsufficientScope",
    "MissingToken",
    "TemporarilyUnavailable",
    "challenge",
]

_STATUS_LINES = {
    400: "400 Bad Request",
    401: "401 Unauthorized",
    403: "403 Forbidden",
    500: "500 Internal Server Error",
    503: "503 Service Unavailable",
}

# RFC 6750 section 3: error_description and scope are restricted to
# %x20-21 / %x23-5B / %x5D-7E, so neither a quote nor a backslash may appear.
_NOT_NQSCHAR = re.compile(r'[^\x20\x21\x23-\x5b\x5d-\x7e]')


def _quoted(value: str) -> str:
    """An RFC 9110 section 5.6.4 quoted-string."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _nqs(value: str) -> str:
    return _NOT_NQSCHAR.sub("?", value)


def challenge(scheme: str, realm: str, params: Sequence[tuple[str, str]] = ()) -> str:
    """Render one ``WWW-Authenticate`` challenge, escaping every value.

    :param scheme: ``Bearer`` or ``DPoP``.
    :param realm: the protection space (RFC 9110 section 11.5).
    :param params: further auth-params, in order; values are made safe here.
    """
    parts = [f"realm={_quoted(realm)}"]
    parts.extend(f"{name}={_quoted(_nqs(value))}" for name, value in params)
    return f"{scheme} " + ", ".join(parts)


class ConfigurationError(ValueError):
    """A setting is missing or invalid. Raised at start-up, never per request.

    :param option: the option's name, as in :class:`~certbound_wsgi.Settings`.
    :param message: what is wrong with it.
    """

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option


class AuthError(Exception):
    """A request that is not let through, and the answer it gets.

    :param error: the RFC 6750 / RFC 9449 error code, or ``None`` when the
        request carried no credentials at all (RFC 6750 section 3.1).
    :param description: a human-readable ``error_description``.
    :param status: the HTTP status.
    :param headers: extra response headers, such as ``Retry-After``.
    :param scope: the ``scope`` auth-param, for ``insufficient_scope``.
    :param scheme: the scheme (``Bearer`` or ``DPoP``) whose challenge carries the error.
    """

    status = 401
    error: str | None = "invalid_token"
    #: The authentication scheme whose challenge carries the error (RFC 9449 section 7.1).
    scheme: str | None = None

    def __init__(
        self,
        description: str = "",
        *,
        error: str | None = None,
        status: int | None = None,
        headers: Iterable[tuple[str, str]] = (),
        scope: str | None = None,
        scheme: str | None = None,
    ) -> None:
        super().__init__(description)
        if scheme is not None:
            self.scheme = scheme
        self.description = description
        if error is not None:
            self.error = error
        if status is not None:
            self.status = status
        self.headers = list(headers)
        self.scope = scope

    def challenge_params(self) -> list[tuple[str, str]]:
        params: list[tuple[str, str]] = []
        if self.error:
            params.append(("error", self.error))
            if self.description:
                params.append(("error_description", self.description))
        if self.scope:
            params.append(("scope", self.scope))
        return params

    def body(self) -> bytes:
        payload: dict[str, str] = {"error": self.error or "unauthorized"}
        if self.description:
            payload["error_description"] = self.description
        if self.scope:
            payload["scope"] = self.scope
        return json.dumps(payload, separators=(",", ":")).encode()

    def respond(self, start_response: StartResponse, challenges: Sequence[str]) -> list[bytes]:
        """Start the response and return its body, as a WSGI app would."""
        body = self.body()
        headers = [("WWW-Authenticate", value) for value in challenges]
        headers += [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
        ]
        headers += self.headers
        start_response(_STATUS_LINES[self.status], headers)
        return [body]


class MissingToken(AuthError):
    """No access token at all: a bare challenge with no error code (RFC 6750 section 3.1)."""

    error = None


class InvalidRequest(AuthError):
    """A malformed request, e.g. two credentials at once (RFC 6750 sections 2 and 3.1)."""

    status = 400
    error = "invalid_request"


class InvalidToken(AuthError):
    """Expired, revoked, malformed, not bound to this client, or otherwise invalid (RFC 6750 section 3.1)."""


class InsufficientScope(AuthError):
    """The token is valid but lacks a required scope (RFC 6750 section 3.1)."""

    status = 403
    error = "insufficient_scope"


class TemporarilyUnavailable(AuthError):
    """Validation cannot run now (the issuer is unreachable); fail closed with 503."""

    status = 503
    error = "temporarily_unavailable"

    def __init__(self, description: str, *, retry_after: int = 5) -> None:
        super().__init__(description, headers=[("Retry-After", str(max(1, retry_after)))])

    def challenge_params(self) -> list[tuple[str, str]]:
        # RFC 6750 defines no error code for this; the challenge carries the realm only.
        return []
