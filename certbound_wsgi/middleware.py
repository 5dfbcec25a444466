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
from .cache.memory import MemoryCache
from .cache.seal import Sealer
from .certificates import CertificateReader
from .credentials import CredentialReader
from .discovery import Discovery
from .errors import AuthError, InsufficientScope, InvalidToken, MissingToken, challenge
from .introspection import IntrospectionClient, IntrospectionValidator
from .jwt_tokens import JWTValidator, looks_like_jwt
from .settings import Settings
from .stats import Stats
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
        self._stats = Stats()
        methods = settings.auth_methods
        self.jwt = JWTValidator(settings, self.discovery) if "bearer" in methods else None
        self.introspection = (
            _introspection(settings, self.discovery, self._stats) if "introspection" in methods else None
        )
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
        token = credential.token
        if self.jwt is not None and (self.introspection is None or looks_like_jwt(token)):
            claims = self.jwt.validate(token)
            method = "bearer"
            if self.introspection is not None and self.settings.introspect_jwt_tokens:
                # Locally valid, but is it revoked? Only the issuer knows.
                self.introspection.validate(token)
        elif self.introspection is not None:
            claims = self.introspection.validate(token)
            method = "introspection"
        else:  # pragma: no cover - Settings requires at least one method
            raise InvalidToken("no enabled method can validate this token")
        # RFC 8705 section 3: on every request, whether the claims came from a cache or not.
        check_mtls(self.settings.proof_of_possession_mtls, claims, thumbprint)
        if self._scopes_required and not self._scopes_required <= token_scopes(claims, self.settings.scopes_claim):
            raise InsufficientScope(
                "the token lacks a required scope", scope=" ".join(sorted(self._scopes_required))
            )
        return Identity(claims, token, thumbprint, method)

    def stats(self) -> dict[str, int]:
        """Counters of this instance: cache hits and misses per level, introspections, errors."""
        return self._stats.snapshot()


def _introspection(settings: Settings, discovery: Discovery, stats: Stats) -> IntrospectionValidator:
    l2 = None
    sealer = Sealer(settings.cache_secret or settings.client_secret or None, "intro")
    if settings.uses_redis:
        from .cache.redis import RedisCache, make_client

        l2 = RedisCache(make_client(settings), sealer, stats, lock_ttl=2 * settings.http_timeout + 1)
    l1 = MemoryCache(settings.cache_l1_size, max_age=settings.cache_l1_ttl if l2 is not None else None)
    endpoint_id = settings.introspection_endpoint or settings.issuer
    return IntrospectionValidator(
        settings,
        IntrospectionClient(settings, discovery if settings.issuer else None),
        l1,
        l2,
        lambda token: sealer.key_name(endpoint_id, token),
        stats,
    )
