"""The middleware: authenticate the request, then call the wrapped app.

``__call__`` -> :meth:`CertBoundMiddleware.authenticate` -> ``environ["certbound.*"]`` -> app.
Every refusal is an :class:`~certbound_wsgi.errors.AuthError`, rendered in one
place. Nothing here fails open: a request that cannot be validated is answered
with 401 or 503, never passed on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from .binding import check_mtls, x5t_s256
from .cache.memory import MemoryCache
from .cache.redis import RedisCache, make_client
from .cache.seal import Sealer
from .certificates import CertificateReader
from .credentials import Credential, CredentialReader
from .discovery import Discovery
from .dpop import DPoPError, DPoPVerifier, ReplayCache, jkt_of
from .errors import AuthError, InsufficientScope, InvalidToken, MissingToken, TemporarilyUnavailable, challenge
from .introspection import IntrospectionClient, IntrospectionValidator
from .jose import copy_claims, expiry
from .jwt_tokens import JWTValidator, looks_like_jwt
from .oidc_login import BrowserLogin, wants_html
from .sessions import Session, Sessions
from .settings import Settings
from .stats import Stats
from .types import Claims, StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["CertBoundMiddleware", "Identity"]

log = logging.getLogger("certbound_wsgi")


class Identity(NamedTuple):
    """What a successful authentication established.

    :param claims: the validated claims.
    :param token: the access token.
    :param thumbprint: the presented certificate's x5t#S256, if any.
    :param method: the auth method that validated it (``bearer``, ``introspection`` or ``session``).
    :param set_cookie: a session cookie to send with the response (a new or renewed session).
    """

    claims: Claims
    token: str | None
    thumbprint: str | None
    method: str
    set_cookie: str | None = None


def token_scopes(claims: Claims, claim: str) -> frozenset[str]:
    """Scopes from a space-separated string (RFC 9068 section 2.2.3) or a list (``scp``)."""
    value = claims.get(claim)
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list):
        return frozenset(v for v in value if isinstance(v, str))
    return frozenset()


class CertBoundMiddleware:
    """Accept a request only with an access token bound to the presented client certificate or DPoP key.

    :param app: the WSGI application to protect.
    :param settings: the configuration; :meth:`Settings.from_env` when omitted.
    :param discovery: the issuer's keys; made from ``settings`` when omitted.
    :param clock: wall-clock seconds for expiry decisions; injectable for tests.
    """

    def __init__(
        self,
        app: WSGIApplication,
        settings: Settings | None = None,
        *,
        discovery: Discovery | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.app = app
        self._clock = clock
        self.settings = settings = settings if settings is not None else Settings.from_env()
        self.discovery = discovery or Discovery(settings)
        self.certificates = CertificateReader(settings)
        self.credentials = CredentialReader(settings.bearer_token_param_type,
                                            cookie_name=settings.bearer_token_cookie_name,
                                            dpop=settings.proof_of_possession_dpop != "off")
        self._stats = Stats()
        secret = settings.shared_secret or None
        # One sealer for introspection entries, in Redis and in the key names alike.
        self._intro_sealer = Sealer(secret, "intro")
        self._redis = (
            RedisCache(make_client(settings), self._intro_sealer, self._stats) if settings.uses_redis else None
        )
        methods = settings.auth_methods
        self.jwt = JWTValidator(
            self.discovery, issuer=settings.issuer, audience=settings.audience, leeway=settings.leeway,
            signing_algs=settings.token_signing_algs, memo_size=settings.token_cache_size, clock=clock,
        ) if "bearer" in methods else None
        self.introspection = self._make_introspection(secret) if "introspection" in methods else None
        self.dpop = self._make_dpop(secret) if settings.proof_of_possession_dpop != "off" else None
        self.sessions = Sessions(settings, self._redis, clock) if "session" in methods else None
        self.login = (
            BrowserLogin(settings, self.discovery, self.sessions, clock)
            if self.sessions is not None and "authorization_code" in methods
            else None
        )
        self._scopes_required = frozenset(settings.scopes_required)
        self._schemes = self._offered_schemes()

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if self.sessions is not None:
            path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
            if path == self.settings.logout_path and environ.get("REQUEST_METHOD") in self.settings.logout_methods:
                return self._logout(self.sessions, environ, start_response)
            if self.login is not None and path == self.login.callback_path:
                return self._login_callback(self.login, environ, start_response)
        try:
            identity = self.authenticate(environ)
        except MissingToken as error:
            if self.login is not None and wants_html(environ):
                return self._start_login(self.login, environ, start_response)
            return self.refuse(error, start_response)
        except AuthError as error:
            log.info("certbound: %s %s refused: %s %s", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"),
                     error.status, error.description or error.error)
            return self.refuse(error, start_response)
        except Exception:
            # A bug, not bad input: fail closed, keep the traceback in the log only.
            log.exception("certbound: internal error while authenticating")
            return self.refuse(AuthError("internal error", error="server_error", status=500), start_response)
        # A deep copy: the claims are memoized, and the app must not be able to change them.
        environ["certbound.claims"] = copy_claims(identity.claims)
        environ["certbound.token"] = identity.token
        environ["certbound.thumbprint"] = identity.thumbprint
        environ["certbound.method"] = identity.method
        sub = identity.claims.get("sub")
        if isinstance(sub, str):
            environ["REMOTE_USER"] = sub
        extra = []
        if identity.set_cookie is not None:
            extra.append(("Set-Cookie", identity.set_cookie))
        if self.dpop is not None and self.settings.dpop_use_nonce:
            nonce = self.dpop.nonce_for_response(environ)
            if nonce is not None:
                extra.append(("DPoP-Nonce", nonce))
        if extra:
            return self.app(environ, _adding_headers(start_response, extra))
        return self.app(environ, start_response)

    def refuse(self, error: AuthError, start_response: StartResponse) -> list[bytes]:
        """Answer ``error`` with its status, challenges and JSON body."""
        offered = [scheme for scheme, _ in self._schemes]
        target = error.scheme if error.scheme in offered else offered[0]
        challenges = [
            challenge(scheme, self.settings.realm, params + error.challenge_params() if scheme == target else params)
            for scheme, params in self._schemes
        ]
        return error.respond(start_response, challenges)

    def authenticate(self, environ: WSGIEnvironment) -> Identity:
        """Validate the request's token and its bindings.

        :raises AuthError: the request may not pass; the error says how to answer.
        """
        credential = self.credentials.read(environ)
        thumbprint = self.certificates.thumbprint(environ)
        if credential is None:
            session = self.sessions.load(environ) if self.sessions is not None else None
            if session is None:
                raise MissingToken("an access token is required")
            return self._session_identity(environ, session, thumbprint)
        scheme = "DPoP" if credential.scheme == "dpop" else "Bearer"
        try:
            claims, method = self._validate(credential.token)
        except AuthError as error:
            error.scheme = error.scheme or scheme
            raise
        # Both bindings, on every request, whether the claims came from a cache or not.
        self._check_dpop(environ, credential, claims)
        try:
            check_mtls(self.settings.proof_of_possession_mtls, claims, thumbprint)  # RFC 8705 section 3
        except AuthError as error:
            error.scheme = scheme
            raise
        self._check_scopes(claims, "token", scheme)
        set_cookie = self._open_session(environ, method, claims) if self.sessions is not None else None
        return Identity(claims, credential.token, thumbprint, method, set_cookie)

    def _open_session(self, environ: WSGIEnvironment, method: str, claims: Claims) -> str | None:
        """As in Kong, a successful token login opens a session; it remembers the token's
        bindings and demands them on every later use. The ``Set-Cookie`` value, if any."""
        sessions = self.sessions
        if sessions is None:
            return None
        try:
            if sessions.is_live(environ):
                return None
            jkt = jkt_of(claims)
            bound = x5t_s256(claims)
            session = sessions.create(
                method, claims, x5t=bound if isinstance(bound, str) else None,
                jkt=jkt if isinstance(jkt, str) else None, pop=True, token_exp=expiry(claims),
            )
        except TemporarilyUnavailable:
            # The token is valid; the session is a convenience: serve the request without one.
            return None
        return session.set_cookie

    def _session_identity(self, environ: WSGIEnvironment, session: Session, thumbprint: str | None) -> Identity:
        self._check_session_proofs(environ, session, thumbprint)
        record = session.record
        self._check_scopes(record.claims, "session")
        # Only now, with every proof checked, may the use renew or touch the session.
        if self.sessions is not None:
            session = self.sessions.touch(session)
        return Identity(record.claims, None, thumbprint, "session", session.set_cookie)

    def _check_scopes(self, claims: Claims, what: str, scheme: str | None = None) -> None:
        """RFC 6750 section 3.1: 403 ``insufficient_scope`` unless every required scope is granted."""
        if self._scopes_required and not self._scopes_required <= token_scopes(claims, self.settings.scopes_claim):
            raise InsufficientScope(
                f"the {what} lacks a required scope", scope=" ".join(sorted(self._scopes_required)), scheme=scheme
            )

    def _check_session_proofs(self, environ: WSGIEnvironment, session: Session, thumbprint: str | None) -> None:
        record = session.record
        if record.pop:
            # The session demands the same proofs as the token that made it.
            check_mtls(
                self.settings.proof_of_possession_mtls, {"cnf": {"x5t#S256": record.x5t}} if record.x5t else {},
                thumbprint,
            )
            if record.jkt is not None:
                if self.dpop is None:
                    raise InvalidToken("the session is DPoP-bound but DPoP is off")
                self.dpop.verify(environ, None, record.jkt)
            elif self.settings.proof_of_possession_dpop == "strict":
                raise DPoPError("a DPoP-bound session and proof are required")

    # -- the session endpoints ------------------------------------------------------

    def _start_login(self, login: BrowserLogin, environ: WSGIEnvironment,
                     start_response: StartResponse) -> Iterable[bytes]:
        try:
            status, headers = login.start(environ)
        except AuthError as error:
            return self.refuse(error, start_response)
        start_response(status, headers)
        return [b""]

    def _login_callback(self, login: BrowserLogin, environ: WSGIEnvironment,
                        start_response: StartResponse) -> Iterable[bytes]:
        try:
            session, location = login.callback(environ)
        except AuthError as error:
            log.info("certbound: login refused: %s", error.description or error.error)
            error.headers.append(("Set-Cookie", login.clear_state_cookie))
            return self.refuse(error, start_response)
        headers = [("Location", location), ("Set-Cookie", login.clear_state_cookie), ("Cache-Control", "no-store")]
        if session.set_cookie:
            headers.append(("Set-Cookie", session.set_cookie))
        start_response("302 Found", headers)
        return [b""]

    def _logout(self, sessions: Sessions, environ: WSGIEnvironment,
                start_response: StartResponse) -> Iterable[bytes]:
        try:
            # Only the session's owner may end it: the same proofs as for using it.
            session = sessions.load(environ)
            if session is not None:
                self._check_session_proofs(environ, session, self.certificates.thumbprint(environ))
                sessions.destroy(environ)
        except AuthError as error:
            return self.refuse(error, start_response)
        headers = [("Set-Cookie", sessions.clear_cookie()), ("Cache-Control", "no-store")]
        if self.settings.logout_redirect_uri:
            start_response("302 Found", [("Location", self.settings.logout_redirect_uri), *headers])
        else:
            start_response("204 No Content", headers)
        return [b""]

    def _validate(self, token: str) -> tuple[Claims, str]:
        if self.jwt is not None and (self.introspection is None or looks_like_jwt(token)):
            claims = self.jwt.validate(token)
            if self.introspection is not None and self.settings.introspect_jwt_tokens:
                # Locally valid, but is it revoked? Only the issuer knows.
                self.introspection.validate(token)
            return claims, "bearer"
        if self.introspection is not None:
            return self.introspection.validate(token), "introspection"
        raise InvalidToken("no enabled method can validate this token")  # pragma: no cover

    def _check_dpop(self, environ: WSGIEnvironment, credential: Credential, claims: Claims) -> None:
        jkt = jkt_of(claims)
        if credential.scheme == "dpop":
            if self.dpop is None:  # pragma: no cover - the reader only yields dpop when it is on
                raise InvalidToken("DPoP is not accepted here")
            if jkt is None:
                # RFC 9449 section 7.1: the DPoP scheme is for DPoP-bound tokens.
                raise InvalidToken("the token is not DPoP-bound", scheme="DPoP")
            self.dpop.verify(environ, credential.token, jkt)
            return
        if jkt is not None:
            # RFC 9449 section 7.2: a DPoP-bound token must not be accepted as a bearer token.
            raise InvalidToken("a DPoP-bound token must be sent with the DPoP scheme", scheme="Bearer")
        if self.settings.proof_of_possession_dpop == "strict":
            raise DPoPError("a DPoP-bound token and proof are required")

    def stats(self) -> dict[str, int]:
        """Counters of this instance: cache hits and misses per level, introspections, errors."""
        return self._stats.snapshot()

    # -- construction ------------------------------------------------------------

    def _offered_schemes(self) -> list[tuple[str, list[tuple[str, str]]]]:
        schemes: list[tuple[str, list[tuple[str, str]]]] = []
        if self.settings.proof_of_possession_dpop != "strict":
            schemes.append(("Bearer", []))
        if self.dpop is not None:
            schemes.append(("DPoP", [("algs", self.dpop.algs_param)]))
        return schemes

    def _make_introspection(self, secret: str | None) -> IntrospectionValidator:
        settings = self.settings
        l1 = MemoryCache(settings.cache_l1_size, max_age=settings.cache_l1_ttl if self._redis is not None else None,
                         clock=self._clock)
        sealer = self._intro_sealer
        endpoint_id = settings.introspection_endpoint or settings.issuer
        return IntrospectionValidator(
            settings,
            IntrospectionClient(settings, self.discovery if settings.issuer else None),
            l1,
            self._redis,
            lambda token: sealer.key_name(endpoint_id, token),
            self._stats,
            self._clock,
        )

    def _make_dpop(self, secret: str | None) -> DPoPVerifier:
        s = self.settings
        replay = ReplayCache(self._redis, fail_open=s.dpop_replay_fail_open)
        return DPoPVerifier(replay, self.certificates.is_trusted_peer, Sealer(secret, "dpop").key_name,
                            algs=s.dpop_signing_alg_values_supported, proof_lifetime=s.dpop_proof_lifetime,
                            leeway=s.leeway, use_nonce=s.dpop_use_nonce, public_base_url=s.public_base_url,
                            secret=secret, clock=self._clock)


def _adding_headers(start_response: StartResponse, extra: list[tuple[str, str]]) -> Any:
    def wrapped(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        return start_response(status, [*headers, *extra], exc_info)

    return wrapped
