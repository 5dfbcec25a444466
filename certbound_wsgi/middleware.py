"""The middleware: authenticate the request, then call the wrapped app.

``__call__`` -> a health or public path? -> an endpoint? -> :meth:`Authenticator.decide`
-> ``environ["certbound.*"]`` -> app. A refusal is an :class:`~certbound_wsgi.errors.AuthError`,
itself the WSGI app that answers it; every one goes through :meth:`CertBoundMiddleware.refuse`,
which writes its audit event and counts it. Nothing here fails open: a request that cannot be
validated is answered with 401 or 503, never passed on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from logging import DEBUG
from time import perf_counter
from typing import Any

from . import metrics
from .audit import auditor_for
from .authenticator import Authenticator, Identity, build
from .cache.redis import make_client, make_replay_client
from .discovery import Discovery
from .endpoints import Endpoints
from .errors import AuthError, Challenges, MissingToken
from .health import Readiness, live
from .http import request_path
from .jose import copy_claims
from .public_paths import PublicPaths
from .settings import Settings
from .types import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["CertBoundMiddleware", "Identity", "OnError"]

log = logging.getLogger("certbound_wsgi")

#: Turns a refusal into the response (starlette's ``on_error``); the error is a WSGI app already.
OnError = Callable[[WSGIEnvironment, AuthError], WSGIApplication]


def _render(environ: WSGIEnvironment, error: AuthError) -> WSGIApplication:
    return error


class CertBoundMiddleware:
    """Accept a request only with an access token bound to the presented client certificate or DPoP key.

    What is believed, and from where (as werkzeug's ``ProxyFix`` states it): the client certificate
    (the uWSGI variable ``SSL_CLIENT_CERT`` or the ``client_cert_header``) and ``X-Forwarded-Proto``
    (for the DPoP ``htu``; not at all with ``public_base_url``) only through the authenticated
    channel from the proxy: the ``proxy_secret`` it adds, or a ``trusted_proxies`` Unix socket or
    address (:mod:`certbound_wsgi.channel`). Nothing else a client sends decides access without a
    signature or a MAC.

    :param app: the WSGI application to protect.
    :param settings: the configuration; :meth:`Settings.from_env` when omitted.
    :param discovery: the issuer's keys; made from ``settings`` when omitted.
    :param clock: wall-clock seconds for expiry decisions; injectable for tests.
    :param on_error: makes the response to a refusal; by default the error answers itself.
    """

    def __init__(
        self,
        app: WSGIApplication,
        settings: Settings | None = None,
        *,
        discovery: Discovery | None = None,
        clock: Callable[[], float] = time.time,
        on_error: OnError = _render,
    ) -> None:
        self.app = app
        self.settings = settings = settings if settings is not None else Settings.from_env()
        self.authenticator = auth = build(settings, discovery=discovery, clock=clock)
        self.on_error = on_error
        self.client_jwks = auth.client_keys if settings.client_jwks_path else None
        self.challenges = Challenges(settings.realm, bearer=settings.proof_of_possession_dpop != "strict",
                                     dpop_algs=auth.dpop.algs_param if auth.dpop is not None else None)
        self.endpoints = (
            Endpoints(auth, auth.sessions, self.refuse, logout_path=settings.logout_path,
                      logout_methods=settings.logout_methods, logout_redirect_uri=settings.logout_redirect_uri)
            if auth.sessions is not None else None
        )
        # The client address and request id are believed through the same channel as the certificate.
        self.auditor = auditor_for(settings, auth.certificates.channel)
        self.public_paths = PublicPaths(settings.public_paths)
        self.readiness = _readiness(settings, auth) if settings.readiness_path else None
        #: The middleware's own unauthenticated answers, by exact path.
        self.health: dict[str, WSGIApplication] = {}
        if self.readiness is not None:
            self.health[settings.readiness_path] = self.readiness
        if settings.liveness_path:
            self.health[settings.liveness_path] = live
        self._open = bool(self.health or self.public_paths)
        # The warm path's look-ups, done once here rather than per request.
        self._unprotected_paths = self._open or self.client_jwks is not None
        self._verdict = auth.certificates.channel.verdict
        self._authenticate = auth.decide
        self._audit_logger = self.auditor.logger
        #: Counts an accepted decision and its latency: made on the first accepted request (in the
        #: worker, not in a master that preloads the app); does nothing without prometheus_client.
        self._record_accepted: Callable[[float], None] | None = None

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        # First, on every path: take the proxy secret out of the environ, so that no app can echo it.
        self._verdict(environ)
        if self._unprotected_paths:
            unprotected = self._unprotected(environ)
            if unprotected is not None:
                return unprotected(environ, start_response)
        started = perf_counter()
        if self.endpoints is not None:
            endpoint = self.endpoints.match(environ)
            if endpoint is not None:
                environ["certbound.started"] = started  # for the refusals the endpoint answers itself
                return endpoint(environ, start_response)
        decided = self._decide(environ, started)
        if not isinstance(decided, Identity):
            return decided(environ, start_response)
        identity = decided
        # The accepted event is DEBUG: nothing is formatted, nor even called, unless DEBUG is on.
        if self._audit_logger.isEnabledFor(DEBUG):
            self.auditor.accepted(environ, identity)
        record = self._record_accepted
        if record is None:
            record = self._record_accepted = metrics.recorder("accepted", "ok") or _no_metrics
        record(perf_counter() - started)
        # A copy: the claims are memoized, and the app must not be able to change them.
        environ["certbound.claims"] = copy_claims(identity.claims)
        environ["certbound.token"] = identity.token
        environ["certbound.thumbprint"] = identity.thumbprint
        environ["certbound.method"] = identity.method
        sub = identity.claims.get("sub")
        if isinstance(sub, str):
            environ["REMOTE_USER"] = sub
        if identity.set_cookie is None and identity.dpop_nonce is None:
            return self.app(environ, start_response)
        return self.app(environ, _start_response_for(identity, start_response))

    def _unprotected(self, environ: WSGIEnvironment) -> WSGIApplication | None:
        """What answers with no credential at all: our JWKS, the health paths, the public paths."""
        if self.client_jwks is not None and request_path(environ) == self.settings.client_jwks_path:
            return self.client_jwks  # public: the issuer downloads it unauthenticated
        if self._open:
            own = self.health.get(request_path(environ))
            if own is not None:
                return own
            if self.public_paths(environ):
                return self.app
        return None

    def _decide(self, environ: WSGIEnvironment, started: float) -> Identity | WSGIApplication:
        """The request's identity, or the answer that refuses it.

        :param started: when the middleware began deciding, for the refusal's latency metric.
        """
        try:
            return self._authenticate(environ)
        except MissingToken as error:
            environ["certbound.started"] = started
            login = self.endpoints.login_page(environ) if self.endpoints is not None else None
            return login or self.refuse(environ, error)
        except AuthError as error:
            environ["certbound.started"] = started
            return self.refuse(environ, error, error.scheme)
        except Exception:
            # A bug, not bad input: fail closed; the traceback goes to the log, the event says internal_error.
            log.exception("certbound: internal error while authenticating")
            internal = AuthError("internal error", error="server_error", status=500, reason="internal_error")
            environ["certbound.started"] = started
            return self.refuse(environ, internal)

    def refuse(self, environ: WSGIEnvironment, error: AuthError, scheme: str | None = None) -> WSGIApplication:
        """The response to ``error``, once its audit event is written and it is counted: its
        challenges decided by :attr:`challenges`, then ``on_error``.

        :param error: what refuses the request; its ``claims`` and ``presented`` thumbprint, when
            the authenticator got that far, go into the audit event.
        :param scheme: the scheme of the request's credential (``Bearer`` or ``DPoP``), if it had one.
        """
        reason = self.auditor.refused(environ, error, claims=error.claims, presented=error.presented)
        started = environ.pop("certbound.started", None)
        seconds = time.perf_counter() - started if isinstance(started, float) else None
        metrics.request("fault" if error.status >= 500 else "refused", reason, seconds, error.status)
        return self.on_error(environ, self.challenges.bind(error, scheme))

    def authenticate(self, environ: WSGIEnvironment) -> Identity:
        """Validate the request's credential and its bindings, as ``__call__`` does (for tools and tests).

        :raises AuthError: the request may not pass; the error says how to answer.
        """
        return self.authenticator.authenticate(environ, self.authenticator.credentials.read(environ))

    def stats(self) -> dict[str, int]:
        """Counters of this instance: cache hits and misses per level, introspections, errors."""
        return self.authenticator.stats.snapshot()

    # The components, as built by :func:`~certbound_wsgi.authenticator.build` (read-only views).
    discovery = property(lambda self: self.authenticator.discovery)
    certificates = property(lambda self: self.authenticator.certificates)
    credentials = property(lambda self: self.authenticator.credentials)
    jwt = property(lambda self: self.authenticator.jwt)
    introspection = property(lambda self: self.authenticator.introspection)
    dpop = property(lambda self: self.authenticator.dpop)
    sessions = property(lambda self: self.authenticator.sessions)
    login = property(lambda self: self.authenticator.login)


def _readiness(settings: Settings, auth: Authenticator) -> Readiness:
    """The checks of ``readiness_path``: keys (JWT validation only), the issuer, and Redis, which
    makes the worker unready only when requests need it (sessions, or DPoP replay protection
    that does not fail open); as the second-level introspection cache it can be done without."""
    dpop = settings.proof_of_possession_dpop != "off"
    clients = [make_client(settings)] if settings.uses_redis else []
    if dpop and settings.dpop_replay_redis_url:
        clients.append(make_replay_client(settings))  # the replay store's own Redis
    needs_redis = "session" in settings.auth_methods or (dpop and not settings.dpop_replay_fail_open)
    return Readiness(
        keys_loaded=auth.discovery.keys_loaded if auth.jwt is not None else None,
        issuer_reachable=auth.discovery.reachable if settings.issuer else None,
        redis=(lambda: all(client.ping() for client in clients)) if clients else None,
        redis_required=needs_redis,
    )


def _no_metrics(seconds: float) -> None:
    """The accepted path's recorder without ``prometheus_client``."""


def _start_response_for(identity: Identity, start_response: StartResponse) -> StartResponse:
    """``start_response``, adding the session cookie and a fresh DPoP nonce."""
    extra = [("Set-Cookie", identity.set_cookie)] if identity.set_cookie is not None else []
    if identity.dpop_nonce is not None:
        extra.append(("DPoP-Nonce", identity.dpop_nonce))

    def wrapped(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        return start_response(status, [*headers, *extra], exc_info)

    return wrapped
