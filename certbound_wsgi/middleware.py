"""The middleware: authenticate the request, then call the wrapped app.

``__call__`` -> :meth:`CertBoundMiddleware.authenticate` -> ``environ["certbound.*"]`` -> app.
Every refusal is an :class:`~certbound_wsgi.errors.AuthError`, rendered in one
place. Nothing here fails open: a request that cannot be validated is answered
with 401 or 503, never passed on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from .binding import check_mtls
from .certificates import CertificateReader
from .credentials import CredentialReader
from .discovery import Discovery
from .errors import AuthError, InsufficientScope, MissingToken, challenge
from .jwt_tokens import JWTValidator
from .settings import Settings
from .types import Claims, StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["CertBoundMiddleware", "Identity"]

log = logging.getLogger("certbound_wsgi")


@dataclass(frozen=True, slots=True)
class Identity:
    """What a successful authentication established.

    :param claims: the validated claims.
    :param token: the access token.
    :param thumbprint: the presented certificate's x5t#S256, if any.
    :param method: the auth method that validated it (``bearer``).
    """

    claims: Claims
    token: str
    thumbprint: str | None
    method: str


def token_scopes(claims: Claims, claim: str) -> frozenset[str]:
    """Scopes from a space-separated string (RFC 9068 section 2.2.3) or a list (``scp``)."""
    value = claims.get(claim)
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list):
        return frozenset(v for v in value if isinstance(v, str))
    return frozenset()


class CertBoundMiddleware:
    """Accept a request only with an access token bound to the presented client certificate.

    :param app: the WSGI application to protect.
    :param settings: the configuration; :meth:`Settings.from_env` when omitted.
    :param discovery: the issuer's keys; made from ``settings`` when omitted.
    """

    def __init__(
        self,
        app: WSGIApplication,
        settings: Settings | None = None,
        *,
        discovery: Discovery | None = None,
    ) -> None:
        self.app = app
        self.settings = settings = settings if settings is not None else Settings.from_env()
        self.discovery = discovery or Discovery(settings)
        self.certificates = CertificateReader(settings)
        self.credentials = CredentialReader(settings)
        self.jwt = JWTValidator(settings, self.discovery)
        self._scopes_required = frozenset(settings.scopes_required)
        self._challenges = [challenge("Bearer", settings.realm)]

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        try:
            identity = self.authenticate(environ)
        except AuthError as error:
            log.info("certbound: %s %s refused: %s %s", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"),
                     error.status, error.description or error.error)
            return self.refuse(error, start_response)
        except Exception:
            # A bug, not bad input: fail closed, keep the traceback in the log only.
            log.exception("certbound: internal error while authenticating")
            return self.refuse(AuthError("internal error", error="server_error", status=500), start_response)
        environ["certbound.claims"] = dict(identity.claims)
        environ["certbound.token"] = identity.token
        environ["certbound.thumbprint"] = identity.thumbprint
        environ["certbound.method"] = identity.method
        sub = identity.claims.get("sub")
        if isinstance(sub, str):
            environ["REMOTE_USER"] = sub
        return self.app(environ, start_response)

    def refuse(self, error: AuthError, start_response: StartResponse) -> list[bytes]:
        """Answer ``error`` with its status, challenge and JSON body."""
        challenges = [challenge("Bearer", self.settings.realm, error.challenge_params())]
        return error.respond(start_response, challenges)

    def authenticate(self, environ: WSGIEnvironment) -> Identity:
        """Validate the request's token and its binding.

        :raises AuthError: the request may not pass; the error says how to answer.
        """
        credential = self.credentials.read(environ)
        if credential is None:
            raise MissingToken("an access token is required")
        thumbprint = self.certificates.thumbprint(environ)
        claims = self.jwt.validate(credential.token)
        check_mtls(self.settings.proof_of_possession_mtls, claims, thumbprint)
        if self._scopes_required and not self._scopes_required <= token_scopes(claims, self.settings.scopes_claim):
            raise InsufficientScope(
                "the token lacks a required scope", scope=" ".join(sorted(self._scopes_required))
            )
        return Identity(claims, credential.token, thumbprint, "bearer")
