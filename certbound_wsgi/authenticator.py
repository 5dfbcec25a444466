"""The policy: credential -> validator -> bindings -> scopes, and :func:`build`, which wires it.

For each kind of credential the path is short and flat:

- a token: :meth:`Authenticator.authenticate` -> the validator (JWT or introspection) -> the DPoP
  and certificate bindings (:mod:`.binding`) -> the required scopes;
- no token: the session cookie -> the same bindings, from what the session remembers -> the scopes.

Nothing here writes the environ: what a request established is returned as an :class:`Identity`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from .accepted import AcceptedMemo
from .binding import check_dpop_mode, check_mtls, cnf_jkt, cnf_x5t
from .cache.memory import MemoryCache
from .cache.redis import RedisCache, check_replay_store, make_client, make_replay_client
from .cache.seal import Sealer
from .certificates import CertificateReader
from .channel import ProxyChannel, check_at_start_up, uwsgi_listeners
from .client_keys import ClientKeys
from .credentials import Credential, CredentialReader
from .discovery import Discovery
from .dpop import DPoPVerifier, ReplayCache
from .errors import AuthError, InsufficientScope, InvalidToken, MissingToken, TemporarilyUnavailable
from .introspection import IntrospectionClient, IntrospectionValidator
from .issuers import IssuerRouter, build_router, shared_keys
from .jose import expiry
from .jwt_tokens import looks_like_jwt
from .oidc_login import BrowserLogin
from .sessions import Session, Sessions
from .settings import Settings
from .shared_keys import SharedKeys
from .stats import Stats
from .types import Claims, WSGIEnvironment

__all__ = ["Authenticator", "Identity", "build", "token_scopes"]

log = logging.getLogger("certbound_wsgi")


class Identity(NamedTuple):
    """What a successful authentication established.

    :param claims: the validated claims.
    :param token: the access token.
    :param thumbprint: the presented certificate's x5t#S256, if any.
    :param method: the auth method that validated it (``bearer``, ``introspection`` or ``session``).
    :param set_cookie: a session cookie to send with the response (a new or renewed session).
    :param dpop_nonce: a fresh ``DPoP-Nonce`` to send with the response (RFC 9449 section 8.2).
    """

    claims: Claims
    token: str | None
    thumbprint: str | None
    method: str
    set_cookie: str | None = None
    dpop_nonce: str | None = None


def _scheme(credential: Credential | None) -> str | None:
    """The challenge scheme of a credential: ``DPoP`` or ``Bearer`` (``None`` without one)."""
    if credential is None:
        return None
    return "DPoP" if credential.scheme == "dpop" else "Bearer"


def token_scopes(claims: Claims, claim: str) -> frozenset[str]:
    """Scopes from a space-separated string (RFC 9068 section 2.2.3) or a list (``scp``)."""
    value = claims.get(claim)
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list):
        return frozenset(v for v in value if isinstance(v, str))
    return frozenset()


@dataclass(kw_only=True, slots=True)
class Authenticator:
    """Decides whether a request may pass, and as whom. :func:`build` makes one from the settings.

    :param credentials: finds the request's access token (RFC 6750 section 2).
    :param certificates: the presented certificate's thumbprint, from an authenticated channel only.
    :param jwt: validates JWT access tokens (``bearer`` in ``auth_methods``), each with the keys of the
        issuer it names (``issuer``, ``issuers_allowed``).
    :param introspection: validates tokens at the issuer (``introspection`` in ``auth_methods``).
    :param dpop: verifies DPoP proofs; ``None`` when ``proof_of_possession_dpop`` is ``off``.
    :param sessions: the session store (``session`` in ``auth_methods``).
    :param login: the browser login (``authorization_code``); used by the endpoints, not here.
    :param discovery: the issuer's metadata and keys, shared by the validators.
    :param client_keys: our ``private_key_jwt`` keys, whose public JWKS is served at ``client_jwks_path``.
    :param stats: the counters of this instance.
    :param mtls: ``proof_of_possession_mtls``.
    :param dpop_mode: ``proof_of_possession_dpop``.
    :param scopes_required: ``scopes_required``; ``scopes_claim``: where the token carries them.
    :param introspect_jwt: also ask the issuer whether a locally valid JWT is revoked
        (``introspect_jwt_tokens``, with both validators on).
    :param accepted: accepted bearer JWT decisions, remembered (:mod:`.accepted`); ``None`` where a
        decision depends on more than the header, the certificate and time (see :func:`build`).
    """

    credentials: CredentialReader
    certificates: CertificateReader
    jwt: IssuerRouter | None
    introspection: IntrospectionValidator | None
    dpop: DPoPVerifier | None
    sessions: Sessions | None
    login: BrowserLogin | None
    discovery: Discovery
    client_keys: ClientKeys | None
    stats: Stats
    mtls: str
    dpop_mode: str
    scopes_required: frozenset[str]
    scopes_claim: str
    introspect_jwt: bool
    accepted: AcceptedMemo[Identity] | None = None

    def decide(self, environ: WSGIEnvironment) -> Identity:
        """The request's identity: its decision remembered (:mod:`.accepted`), or its credential (or,
        without one, its session) validated with every binding.

        :raises AuthError: the request may not pass; the error says how to answer, and its
            ``scheme`` which scheme the request's credential used.
        """
        try:
            thumbprint = self.certificates.thumbprint(environ)
        except AuthError as error:
            # A malformed credential is refused first, as it always was; else the certificate's error,
            # with the scheme that says which challenge to answer it with.
            error.scheme = _scheme(self.credentials.read(environ))
            raise
        accepted = self.accepted
        if accepted is None:
            credential = self.credentials.read(environ)
            try:
                return self._identity(environ, credential, thumbprint)
            except AuthError as error:
                error.scheme = _scheme(credential)
                raise
        remembered = accepted.recall(environ.get("HTTP_AUTHORIZATION"), thumbprint)
        return remembered if remembered is not None else self._decide_to_remember(environ, thumbprint, accepted)

    def _decide_to_remember(self, environ: WSGIEnvironment, thumbprint: str | None,
                            accepted: AcceptedMemo[Identity]) -> Identity:
        """:meth:`decide` where the memo is on: tokens are JWTs from the header only, no sessions."""
        # A JWT that verifies is a well-formed b64token: its syntax is checked only when it is refused
        # (then as RFC 6750 section 2.1 asks: a malformed token is a malformed request, 400).
        credential = self.credentials.read(environ, checked=False)
        if credential is None:
            return self._identity(environ, None, thumbprint)  # no sessions here: refused, no token
        # A bearer token verified by an earlier request (in the memo of verified tokens) is on its second
        # use at least: only such a token's acceptance is remembered, so that a token used once costs the
        # memo of accepted decisions neither time nor memory. A DPoP request (a new proof each time) never is.
        standing = (self.jwt.standing(credential.token)
                    if credential.scheme == "bearer" and self.jwt is not None else None)
        try:
            identity = self._token_identity(environ, credential, thumbprint)
        except AuthError as error:
            self.credentials.check(credential)
            error.scheme, error.presented = _scheme(credential), thumbprint
            raise
        # Remembered: a bearer token's acceptance, which no proof but the certificate's went into. The
        # standing was read before validation: were the keys refreshed meanwhile, its older generation
        # makes the next recall miss, and the request after that remembers anew.
        if standing is not None and identity.dpop_nonce is None and identity.set_cookie is None:
            accepted.remember(environ["HTTP_AUTHORIZATION"], thumbprint, identity, *standing)
        return identity

    def authenticate(self, environ: WSGIEnvironment, credential: Credential | None) -> Identity:
        """Validate the request's credential (or, without one, its session) and every binding, in full.

        :param credential: what :meth:`CredentialReader.read` found in the request.
        :raises AuthError: the request may not pass; the error says how to answer.
        """
        return self._identity(environ, credential, self.certificates.thumbprint(environ))

    def _identity(self, environ: WSGIEnvironment, credential: Credential | None, thumbprint: str | None) -> Identity:
        try:
            if credential is None:
                return self._session_identity(environ, thumbprint)
            return self._token_identity(environ, credential, thumbprint)
        except AuthError as error:
            error.presented = thumbprint  # for the audit event: what came with the refused request
            raise

    def _token_identity(self, environ: WSGIEnvironment, credential: Credential, thumbprint: str | None) -> Identity:
        token = credential.token
        if self.introspection is None and self.jwt is not None:
            claims, method = self.jwt.validate(token), "bearer"  # the usual case: JWTs only
        else:
            claims, method = self._validate(token)
        try:
            # Both bindings, on every request, whether the claims came from a cache or not.
            nonce_age = self._check_bindings(environ, credential, claims, thumbprint)
            if self.scopes_required:
                self._check_scopes(claims, "token")
        except AuthError as error:
            error.claims = claims  # whom the refused token names, once validated
            raise
        set_cookie = self._open_session(environ, token, method, claims) if self.sessions is not None else None
        fresh = self._fresh_nonce(nonce_age) if nonce_age is not None else None
        return Identity(claims, token, thumbprint, method, set_cookie, fresh)

    def _check_bindings(self, environ: WSGIEnvironment, credential: Credential, claims: Claims,
                        thumbprint: str | None) -> float | None:
        """RFC 9449 and RFC 8705 section 3 for a token; the DPoP nonce age, if a proof was checked."""
        # The one cnf look-up that cnf_x5t and cnf_jkt would each do (RFC 8705 section 3.1, RFC 9449 section 6.1).
        cnf = claims.get("cnf")
        x5t, jkt = (cnf.get("x5t#S256"), cnf.get("jkt")) if isinstance(cnf, dict) else (None, None)
        nonce_age = None
        dpop_scheme = credential.scheme == "dpop"
        # check_dpop_mode asks for nothing of an unbound bearer token unless DPoP is strict.
        if (jkt is not None or dpop_scheme or self.dpop_mode == "strict") and check_dpop_mode(
                self.dpop_mode, jkt, dpop_scheme=dpop_scheme):
            if self.dpop is None:  # pragma: no cover - check_dpop_mode asks for no proof when DPoP is off
                raise InvalidToken("DPoP is not accepted here")
            nonce_age = self.dpop.verify(environ, credential.token, jkt)
        check_mtls(self.mtls, x5t, thumbprint)
        return nonce_age

    def _session_identity(self, environ: WSGIEnvironment, thumbprint: str | None) -> Identity:
        sessions = self.sessions
        session = sessions.load(environ) if sessions is not None else None
        if session is None or sessions is None:
            raise MissingToken("an access token is required")
        record = session.record
        try:
            nonce_age = self.check_session_proofs(environ, session, thumbprint)
            # A login's scope is what the token response granted, kept beside the ID token's claims.
            self._check_scopes(record.claims, "session",
                               granted=frozenset(record.scope.split()) if record.scope is not None else None)
            # Revocation: a kept token is asked about again (the validator's cache: cache_ttl_max).
            sessions.recheck(session)
            # Only now, with every proof checked, may the use renew or touch the session.
            session = sessions.touch(session)
        except AuthError as error:
            error.claims = record.claims
            raise
        fresh = self._fresh_nonce(nonce_age) if nonce_age is not None else None
        return Identity(session.record.claims, None, thumbprint, "session", session.set_cookie, fresh)

    def check_session_proofs(self, environ: WSGIEnvironment, session: Session, thumbprint: str | None) -> float | None:
        """The session demands the same proofs as the token that made it (logout too).

        :returns: the DPoP nonce age, as :meth:`DPoPVerifier.verify` returns it.
        """
        record = session.record
        if not record.pop:
            return None
        check_mtls(self.mtls, record.x5t or None, thumbprint)
        if not check_dpop_mode(self.dpop_mode, record.jkt, dpop_scheme=record.jkt is not None, what="session"):
            return None
        if self.dpop is None:  # pragma: no cover - check_dpop_mode asks for no proof when DPoP is off
            raise InvalidToken("DPoP is not accepted here")
        return self.dpop.verify(environ, None, record.jkt)

    def _validate(self, token: str) -> tuple[Claims, str]:
        if self.jwt is not None and (self.introspection is None or looks_like_jwt(token)):
            claims = self.jwt.validate(token)
            if self.introspect_jwt and self.introspection is not None:
                # Locally valid, but is it revoked? Only the issuer knows.
                self.introspection.validate(token)
            return claims, "bearer"
        if self.introspection is not None:
            return self.introspection.validate(token), "introspection"
        raise InvalidToken("no enabled method can validate this token")  # pragma: no cover

    def _fresh_nonce(self, nonce_age: float) -> str | None:
        return self.dpop.nonce_for_response(nonce_age) if self.dpop is not None else None

    def _check_scopes(self, claims: Claims, what: str, *, granted: frozenset[str] | None = None) -> None:
        """RFC 6750 section 3.1: 403 ``insufficient_scope`` unless every required scope is granted.

        :param granted: the scopes granted, when not the claims' (a login's token response).
        """
        if not self.scopes_required:
            return
        if granted is None:
            granted = token_scopes(claims, self.scopes_claim)
        if not self.scopes_required <= granted:
            raise InsufficientScope(f"the {what} lacks a required scope", scope=" ".join(sorted(self.scopes_required)))

    def _open_session(self, environ: WSGIEnvironment, token: str, method: str, claims: Claims) -> str | None:
        """As in Kong, a successful token login opens a session (one per token); it remembers the
        token's bindings and demands them on every later use. The ``Set-Cookie`` value, if any."""
        if self.sessions is None:
            return None
        x5t, jkt = cnf_x5t(claims), cnf_jkt(claims)
        # Kept only when it can be asked about again: then its revocation ends the session.
        keep = self.introspection is not None and (method == "introspection" or self.introspect_jwt)
        try:
            return self.sessions.for_token(
                environ, token, method, claims, x5t=x5t if isinstance(x5t, str) else None,
                jkt=jkt if isinstance(jkt, str) else None, token_exp=expiry(claims), keep_token=keep,
            )
        except TemporarilyUnavailable:
            # The token is valid; the session is a convenience: serve the request without one.
            return None


def build(settings: Settings, *, discovery: Discovery | None = None,
          clock: Callable[[], float] = time.time) -> Authenticator:
    """Wire every component of the request path from ``settings``: the one place that does.

    :param discovery: the issuer's keys; made from ``settings`` when omitted.
    :param clock: wall-clock seconds for expiry decisions; injectable for tests.
    """
    certificates = _certificates(settings)
    channel = certificates.channel
    stats = Stats()
    secret = settings.shared_secret or None
    # One sealer for introspection entries, in Redis and in the key names alike.
    intro_sealer = Sealer(secret, "intro")
    redis, shared = _redis(settings, intro_sealer, stats)
    discovery = discovery or Discovery(settings, shared=shared(settings.issuer) if shared is not None else None)
    methods = settings.auth_methods
    client_keys = ClientKeys.from_settings(settings) if settings.client_jwk else None
    introspection = (
        _introspection(settings, discovery, redis, intro_sealer, stats, clock, client_keys)
        if "introspection" in methods else None
    )
    dpop = _dpop(settings, channel, secret, stats, clock) if settings.proof_of_possession_dpop != "off" else None
    sessions, login = _sessions(settings, redis, discovery, introspection, client_keys, clock)
    jwt = build_router(settings, discovery, shared, clock) if "bearer" in methods else None
    # Before any I/O, so that an error about another option is reported first and fast.
    check_at_start_up(channel, settings.proof_of_possession_mtls)
    if jwt is not None:
        jwt.start()  # the keys are fetched as the worker starts; an issuer down then is not fatal
    return Authenticator(
        credentials=CredentialReader(
            settings.bearer_token_param_type, cookie_name=settings.bearer_token_cookie_name,
            dpop=settings.proof_of_possession_dpop != "off",
        ),
        certificates=certificates,
        jwt=jwt,
        introspection=introspection,
        dpop=dpop,
        sessions=sessions,
        login=login,
        discovery=discovery,
        client_keys=client_keys,
        stats=stats,
        mtls=settings.proof_of_possession_mtls,
        dpop_mode=settings.proof_of_possession_dpop,
        scopes_required=frozenset(settings.scopes_required),
        scopes_claim=settings.scopes_claim,
        introspect_jwt=settings.introspect_jwt_tokens and jwt is not None and introspection is not None,
        accepted=_accepted(settings, clock) if jwt is not None and introspection is None and sessions is None else None,
    )


def _accepted(settings: Settings, clock: Callable[[], float]) -> AcceptedMemo[Identity] | None:
    """The memo of accepted decisions, where a decision depends on nothing but the ``Authorization``
    header, the certificate and time: tokens in the header only, validated as JWTs only (no
    introspection, whose answers expire on their own terms), no sessions. DPoP proofs are never
    remembered (each is new), nor is anything a proof went into."""
    if set(settings.bearer_token_param_type) != {"header"}:
        return None
    return AcceptedMemo(settings.token_cache_size, clock)


def _redis(settings: Settings, sealer: Sealer,
           stats: Stats) -> tuple[RedisCache | None, Callable[[str], SharedKeys] | None]:
    """The shared Redis cache, and the makers of each issuer's shared key copy (issue 14); none without Redis."""
    if not settings.uses_redis:
        return None, None
    client = make_client(settings)
    return RedisCache(client, sealer, stats), shared_keys(settings, client, stats)


def _sessions(settings: Settings, redis: RedisCache | None, discovery: Discovery,
              introspection: IntrospectionValidator | None, client_keys: ClientKeys | None,
              clock: Callable[[], float]) -> tuple[Sessions | None, BrowserLogin | None]:
    """Sessions, re-checking introspectable tokens (issue 12), and the browser login that opens them."""
    if "session" not in settings.auth_methods:
        return None, None
    sessions = Sessions(settings, redis, clock, recheck=introspection.validate if introspection is not None else None)
    login = (
        BrowserLogin(settings, discovery, sessions, clock, client_keys=client_keys)
        if "authorization_code" in settings.auth_methods else None
    )
    return sessions, login


def _certificates(settings: Settings) -> CertificateReader:
    """The client certificate's reader, believing only what comes through the proxy channel (issue 11)."""
    channel = ProxyChannel(
        secret=settings.proxy_secret, secret_header=settings.proxy_secret_header,
        trusted_proxies=settings.trusted_proxies, uwsgi=uwsgi_listeners(),
    )
    return CertificateReader(
        client_cert_header=settings.client_cert_header,
        client_cert_verify_header=settings.client_cert_verify_header,
        channel=channel,
        cert_format=settings.client_cert_format,
        xfcc_hops=settings.client_cert_xfcc_hops,
        cache_size=settings.cert_cache_size,
    )


def _dpop(settings: Settings, channel: ProxyChannel, secret: str | None, stats: Stats,
          clock: Callable[[], float]) -> DPoPVerifier:
    """The DPoP proof verifier (RFC 9449), with its replay store and nonce key."""
    return DPoPVerifier(
        _replay_cache(settings, secret, stats, clock), lambda environ: channel.verdict(environ).trusted,
        Sealer(secret, "dpop").key_name,
        algs=settings.dpop_signing_alg_values_supported, proof_lifetime=settings.dpop_proof_lifetime,
        leeway=settings.leeway, use_nonce=settings.dpop_use_nonce, public_base_url=settings.public_base_url,
        allowed_hosts=settings.dpop_allowed_hosts, secret=secret, clock=clock,
    )


def _replay_cache(settings: Settings, secret: str | None, stats: Stats, clock: Callable[[], float]) -> ReplayCache:
    """The DPoP replay store (RFC 9449 section 11.1): in Redis when there is one, with a client and a
    circuit breaker of its own, checked now for a ``maxmemory-policy`` that would forget proofs early.

    :raises ConfigurationError: the store's Redis evicts keys.
    """
    store = None
    if settings.dpop_replay_redis_url or settings.uses_redis:
        client = make_replay_client(settings)
        warning = check_replay_store(client)
        if warning is not None:
            log.warning("certbound: %s", warning)
        meanwhile = ("accepting DPoP proofs with this process's replay protection only"
                     if settings.dpop_replay_fail_open else "refusing DPoP proofs with 503")
        store = RedisCache(client, Sealer(secret, "dpop"), stats, clock=clock, meanwhile=meanwhile)
    return ReplayCache(store, fail_open=settings.dpop_replay_fail_open)


def _introspection(settings: Settings, discovery: Discovery, redis: RedisCache | None, sealer: Sealer,
                   stats: Stats, clock: Callable[[], float], client_keys: ClientKeys | None) -> IntrospectionValidator:
    l1 = MemoryCache(settings.cache_l1_size, max_age=settings.cache_l1_ttl if redis is not None else None,
                     clock=clock)
    endpoint_id = settings.introspection_endpoint or settings.issuer
    return IntrospectionValidator(
        settings,
        IntrospectionClient(settings, discovery if settings.issuer else None, client_keys=client_keys),
        l1,
        redis,
        lambda token: sealer.key_name(endpoint_id, token),
        stats,
        clock,
    )
