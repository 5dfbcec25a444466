"""Errors and how they are answered (RFC 6750 section 3, RFC 9449 section 7.1).

An :class:`AuthError` is raised anywhere on the request path. It is itself a
WSGI application (as werkzeug's ``HTTPException`` is): a status line, the
``WWW-Authenticate`` challenges and a JSON body. :class:`Challenges`, built
once per middleware, decides which challenge carries the error and renders them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .types import StartResponse, WSGIEnvironment

__all__ = [
    "AuthError",
    "Challenges",
    "ConfigurationError",
    "DPoPError",
    "InvalidRequest",
    "InvalidToken",
    "InsufficientScope",
    "MissingToken",
    "NonceRequired",
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
        self.message = message


class AuthError(Exception):
    """A request that is not let through, and the answer it gets.

    :param error: the RFC 6750 / RFC 9449 error code, or ``None`` when the
        request carried no credentials at all (RFC 6750 section 3.1).
    :param description: a human-readable ``error_description``.
    :param status: the HTTP status.
    :param headers: extra response headers, such as ``Retry-After``.
    :param scope: the ``scope`` auth-param, for ``insufficient_scope``.
    :param reason: the audit reason code (:data:`certbound_wsgi.audit.REASONS`) when it is more
        specific than the class's, e.g. ``cert_mismatch`` for an :class:`InvalidToken`.
    """

    status = 401
    error: str | None = "invalid_token"
    #: The stable audit reason code; the logs and metrics carry it, never the description's text.
    reason = "token_invalid"
    #: The token's claims, when validation got that far (a binding or scope refusal), for the audit event.
    claims: Mapping[str, Any] | None = None
    #: The thumbprint of the certificate that came with the request, for the audit event.
    presented: str | None = None
    #: The scheme of the request's credential (``Bearer`` or ``DPoP``), when it had one: which
    #: challenge answers the refusal (RFC 9449 section 7.1).
    scheme: str | None = None
    #: The ``WWW-Authenticate`` values it answers with; :meth:`Challenges.bind` sets them.
    www_authenticate: Sequence[str] = ()

    def __init__(
        self,
        description: str = "",
        *,
        error: str | None = None,
        status: int | None = None,
        headers: Iterable[tuple[str, str]] = (),
        scope: str | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(description)
        self.description = description
        if error is not None:
            self.error = error
        if status is not None:
            self.status = status
        self.headers = list(headers)
        self.scope = scope
        if reason is not None:
            self.reason = reason

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

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        """The error as a WSGI application, answering with its :attr:`www_authenticate` challenges."""
        return self.respond(start_response, self.www_authenticate)


class MissingToken(AuthError):
    """No access token at all: a bare challenge with no error code (RFC 6750 section 3.1)."""

    error = None
    reason = "token_missing"


class InvalidRequest(AuthError):
    """A malformed request, e.g. two credentials at once (RFC 6750 sections 2 and 3.1)."""

    status = 400
    error = "invalid_request"
    reason = "request_invalid"


class InvalidToken(AuthError):
    """Expired, revoked, malformed, not bound to this client, or otherwise invalid (RFC 6750 section 3.1)."""


class InsufficientScope(AuthError):
    """The token is valid but lacks a required scope (RFC 6750 section 3.1)."""

    status = 403
    error = "insufficient_scope"
    reason = "scope_insufficient"


class TemporarilyUnavailable(AuthError):
    """Validation cannot run now (the issuer is unreachable); fail closed with 503."""

    status = 503
    error = "temporarily_unavailable"
    reason = "issuer_unavailable"

    def __init__(self, description: str, *, retry_after: int = 5, reason: str | None = None) -> None:
        super().__init__(description, headers=[("Retry-After", str(max(1, retry_after)))], reason=reason)

    def challenge_params(self) -> list[tuple[str, str]]:
        # RFC 6750 defines no error code for this; the challenge carries the realm only.
        return []


class DPoPError(AuthError):
    """An invalid DPoP proof: 401 ``invalid_dpop_proof`` (RFC 9449 section 7.1).

    Whatever the request's scheme, its challenge is the DPoP one (see :meth:`Challenges.target`).
    """

    error = "invalid_dpop_proof"
    reason = "dpop_invalid"


class NonceRequired(AuthError):
    """401 ``use_dpop_nonce`` with a fresh ``DPoP-Nonce`` header (RFC 9449 section 9); on the DPoP challenge."""

    error = "use_dpop_nonce"
    reason = "dpop_nonce"

    def __init__(self, nonce: str) -> None:
        super().__init__("a fresh DPoP nonce is required", headers=[("DPoP-Nonce", nonce)])


class Challenges:
    """The ``WWW-Authenticate`` challenges of one protected app, decided once.

    :param realm: the protection space (RFC 9110 section 11.5).
    :param bearer: whether the Bearer scheme is offered (RFC 6750; not with ``proof_of_possession_dpop=strict``).
    :param dpop_algs: the DPoP ``algs`` auth-param (RFC 9449 section 7.1), or ``None`` when DPoP is off.
    """

    def __init__(self, realm: str, *, bearer: bool = True, dpop_algs: str | None = None) -> None:
        schemes: list[tuple[str, list[tuple[str, str]]]] = []
        if bearer:
            schemes.append(("Bearer", []))
        if dpop_algs is not None:
            schemes.append(("DPoP", [("algs", dpop_algs)]))
        if not schemes:
            raise ValueError("a protected app offers at least one scheme")
        self._realm = realm
        self._schemes = schemes
        self.offered = tuple(scheme for scheme, _ in schemes)
        # Every challenge without an error, rendered now: the common refusals reuse them.
        self._bare = [challenge(scheme, realm, params) for scheme, params in schemes]

    def target(self, error: AuthError, scheme: str | None) -> str:
        """The one scheme whose challenge carries ``error``, for a request made with ``scheme``.

        RFC 9449 section 7.1: an error about the DPoP proof goes on the DPoP challenge; any other on
        the challenge of the scheme the request used (a DPoP-bound token sent as Bearer gets a Bearer
        error, section 7.2). Without a credential, or with a scheme not offered, the first one offered.
        """
        wanted = "DPoP" if isinstance(error, (DPoPError, NonceRequired)) else scheme
        return wanted if wanted in self.offered else self.offered[0]

    def render(self, error: AuthError, scheme: str | None = None) -> list[str]:
        """Every offered challenge, the error's parameters on its :meth:`target` only (RFC 6750 section 3)."""
        params = error.challenge_params()
        if not params:
            return self._bare
        target = self.target(error, scheme)
        return [
            challenge(name, self._realm, extra + params) if name == target else bare
            for (name, extra), bare in zip(self._schemes, self._bare, strict=True)
        ]

    def bind(self, error: AuthError, scheme: str | None = None) -> AuthError:
        """``error``, ready to answer as a WSGI app with these challenges.

        :param scheme: the scheme of the request's credential (``Bearer`` or ``DPoP``), if it had one.
        """
        error.www_authenticate = self.render(error, scheme)
        return error
