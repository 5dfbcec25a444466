"""Token introspection (RFC 7662) and its cache policy.

The answer for a token is looked up in the in-process L1 cache, then in the
shared Redis L2 cache, and only then asked of the issuer: by one thread per
process and, through a short Redis lock, by one worker across all hosts.
The binding is not checked here but by the caller, on every request, cache
hit or not.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import requests

from . import http
from .cache import Entry
from .cache.memory import MemoryCache
from .cache.redis import RedisCache
from .client_keys import ClientKeys
from .discovery import Discovery, DiscoveryError
from .errors import InvalidToken, TemporarilyUnavailable
from .jose import TimeClaimError, check_time_claims, expiry, issued_by, meant_for
from .settings import Settings
from .stats import Stats
from .types import Claims

__all__ = ["IntrospectionClient", "IntrospectionError", "IntrospectionValidator", "is_access_token"]

log = logging.getLogger("certbound_wsgi")

MAX_RESPONSE = 256 * 1024
#: How often a worker waiting on another worker's introspection looks in Redis.
POLL_SECONDS = 0.01


class IntrospectionError(Exception):
    """The issuer could not give an answer (unreachable, 5xx, refused us, or sent garbage)."""


class IntrospectionClient:
    """Asks the issuer's introspection endpoint about one token (RFC 7662 section 2).

    :param settings: supplies ``introspection_endpoint``, ``introspection_hint``, the client authentication
        (``introspection_endpoint_auth_method``, ``client_id``, ``client_secret``, ``client_jwk``, ``client_alg``,
        ``tls_client_auth_cert_file``, ``tls_client_auth_key_file``), ``ssl_verify``, ``ca_file``, ``http_timeout``.
    :param discovery: finds the endpoint in the issuer's metadata when it is not configured.
    :param session: a :class:`requests.Session` to reuse (one is made otherwise).
    :param client_keys: signs the ``private_key_jwt`` assertions (read from ``client_jwk`` when omitted).
    """

    def __init__(
        self, settings: Settings, discovery: Discovery | None, session: requests.Session | None = None,
        *, client_keys: ClientKeys | None = None,
    ) -> None:
        self._settings = settings
        self._discovery = discovery
        self._http = http.JSONClient(verify=settings.tls_verify, timeout=settings.http_timeout,
                                     max_body=MAX_RESPONSE, session=session)
        method = settings.introspection_endpoint_auth_method
        self._keys = (client_keys or ClientKeys.from_settings(settings)) if method == "private_key_jwt" else None
        self._cert = (
            (settings.tls_client_auth_cert_file, settings.tls_client_auth_key_file)
            if method == "tls_client_auth"
            else None
        )

    def endpoint(self) -> str:
        if self._settings.introspection_endpoint:
            return self._settings.introspection_endpoint
        if self._discovery is None:
            raise IntrospectionError("no introspection endpoint")
        try:
            endpoint = self._discovery.metadata(needs="introspection_endpoint").get("introspection_endpoint")
        except DiscoveryError as exc:
            raise IntrospectionError(str(exc)) from None
        if not isinstance(endpoint, str):
            raise IntrospectionError("the issuer's metadata has no introspection_endpoint")
        return endpoint

    def _client_auth(self, endpoint: str, data: dict[str, str]) -> tuple[str, str] | None:
        settings = self._settings
        method = settings.introspection_endpoint_auth_method
        if method == "client_secret_basic":
            # RFC 6749 section 2.3.1: both are form-urlencoded before Basic encoding.
            return (quote(settings.client_id, safe=""), quote(settings.client_secret, safe=""))
        data["client_id"] = settings.client_id
        if method == "client_secret_post":
            data["client_secret"] = settings.client_secret
        elif method == "private_key_jwt" and self._keys is not None:
            data.update(self._keys.form(endpoint))  # RFC 7523 section 2.2 / OpenID Connect Core section 9
        return None

    def introspect(self, token: str) -> dict[str, Any]:
        """The introspection response.

        :raises IntrospectionError: no usable answer could be had.
        """
        endpoint = self.endpoint()
        data = {"token": token}
        if self._settings.introspection_hint:
            data["token_type_hint"] = self._settings.introspection_hint
        auth = self._client_auth(endpoint, data)
        try:
            answer = self._http.post(endpoint, data, auth=auth, cert=self._cert)
        except http.Unreachable as exc:
            raise IntrospectionError(str(exc)) from None
        except http.TooLarge:
            raise IntrospectionError("introspection response too large") from None
        if answer.status != 200:
            raise IntrospectionError(f"introspection answered {answer.status}")
        document = answer.document
        if document is None and answer.problem != "not a JSON object":
            raise IntrospectionError(f"introspection response is {answer.problem}")
        # RFC 7662 section 2.2: "active" is REQUIRED, a boolean.
        if document is None or not isinstance(document.get("active"), bool):
            raise IntrospectionError("introspection response has no boolean active member")
        return document


class _Flight:
    """One in-process introspection that other threads wait for."""

    __slots__ = ("done", "entry")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.entry: Entry | None = None


class IntrospectionValidator:
    """Validates tokens by introspection, through the L1 and L2 caches.

    :param settings: the cache policy (``cache_introspection``, ``cache_ttl*``), ``introspection_check_active``,
        ``audience``, ``issuer``, ``leeway``, and ``http_timeout`` (how long to wait for another's answer).
    :param client: asks the issuer.
    :param l1: the in-process cache.
    :param l2: the shared Redis cache, if any.
    :param key_name: names a token's cache entry (an HMAC of endpoint and token).
    """

    def __init__(self, settings: Settings, client: IntrospectionClient, l1: MemoryCache, l2: RedisCache | None,
                 key_name: Callable[[str], str], stats: Stats, clock: Callable[[], float] = time.time) -> None:
        self._settings = settings
        self._client = client
        self._l1 = l1
        self._l2 = l2
        self._key_name = key_name
        self._stats = stats
        self._clock = clock
        self._audience = frozenset(settings.audience)
        self._inflight: dict[str, _Flight] = {}
        self._inflight_lock = threading.Lock()
        self._wait = settings.http_timeout + 0.5

    def validate(self, token: str) -> Claims:
        """The introspected claims of an active, valid token.

        :raises InvalidToken: the token is inactive or its claims are not acceptable.
        :raises TemporarilyUnavailable: the issuer cannot be asked and nothing usable is cached.
        """
        if not self._settings.cache_introspection:
            return self._decide(self._ask(token, None, self._clock()), token)
        # L1 never leaves the process, so it is keyed by the token itself; the HMAC key
        # name, which Redis sees, is computed on a miss only.
        entry = self._l1.get(token)
        if entry is not None and self._clock() < entry.fresh_until:
            self._stats.incr("l1_hits")
            return self._decide(entry, token)
        self._stats.incr("l1_misses")
        l2 = self._l2
        if l2 is None:
            return self._decide(self._single_flight(token, entry, None), token)
        # An L2 hit, the common case of a worker's first sight of a token, is one GET and
        # nothing else: no flight to join, and no lock (both are for asking the issuer).
        key = self._key_name(token)
        shared = l2.get(key)
        if shared is not None and self._clock() < shared.fresh_until:
            self._stats.incr("l2_hits")
            self._l1.set(token, shared)
            return self._decide(shared, token)
        return self._decide(self._single_flight(token, _newer(entry, shared), key), token)

    # -- single flight ----------------------------------------------------------

    def _single_flight(self, token: str, stale: Entry | None, key: str | None) -> Entry:
        """The answer for ``token`` from L2 or the issuer, asked by one thread of this process at a time.

        :param key: the token's L2 key name, already looked up once (``None`` without L2).
        """
        with self._inflight_lock:
            flight = self._inflight.get(token)
            leader = flight is None
            if flight is None:
                flight = self._inflight[token] = _Flight()
        if not leader:
            # Another thread of this process is asking: share its answer, or its failure,
            # so that an outage costs the issuer one call per process, not one per thread.
            if flight.done.wait(self._wait):
                if flight.entry is not None:
                    return flight.entry
                raise TemporarilyUnavailable("the token cannot be introspected now", retry_after=5)
            return self._shared(token, stale, key)  # the leader is stuck: don't wait forever
        try:
            flight.entry = self._shared(token, stale, key)
            return flight.entry
        finally:
            with self._inflight_lock:
                del self._inflight[token]
            flight.done.set()

    def _shared(self, token: str, stale: Entry | None, key: str | None) -> Entry:
        l2 = self._l2
        if l2 is None or key is None:
            return self._ask(token, stale, self._clock(), cache=True)
        # validate() found no fresh entry; whoever writes one meanwhile holds the lock while doing so.
        self._stats.incr("l2_misses")
        deadline = time.monotonic() + self._wait
        lock = l2.lock(key)
        while lock is False and time.monotonic() < deadline and l2.available:
            # Another worker, here or on another host, is asking: wait for its answer, or
            # for its lock to go (it failed), and then try to take the lock ourselves.
            time.sleep(POLL_SECONDS)
            entry = self._fresh_from_l2(l2, key, token)
            if entry is not None:
                return entry
            lock = l2.lock(key)
        try:
            if isinstance(lock, str):
                # Double-check: the previous holder may have written just before we locked.
                entry = self._fresh_from_l2(l2, key, token)
                if entry is not None:
                    return entry
            return self._ask(token, stale, self._clock(), cache=True, key=key)
        finally:
            if isinstance(lock, str):
                l2.unlock(key, lock)

    def _fresh_from_l2(self, l2: RedisCache, key: str, token: str) -> Entry | None:
        entry = l2.get(key)
        if entry is None or self._clock() >= entry.fresh_until:
            return None
        self._stats.incr("l2_hits")
        self._l1.set(token, entry)
        return entry

    # -- asking the issuer --------------------------------------------------------

    def _ask(self, token: str, stale: Entry | None, now: float, *, cache: bool = False,
             key: str | None = None) -> Entry:
        try:
            answer = self._client.introspect(token)
        except IntrospectionError as exc:
            self._stats.incr("idp_errors")
            log.warning("certbound: introspection failed: %s", exc)
            if stale is not None and stale.active and now < stale.stale_until:
                # cache_ttl_resurrect: the issuer is down; a recent positive answer still stands.
                self._stats.incr("resurrected")
                return stale
            raise TemporarilyUnavailable("the token cannot be introspected now", retry_after=5) from None
        self._stats.incr("introspections")
        entry = self._entry(answer, now)
        if cache and entry.stale_until > now:
            l2 = self._l2
            # With Redis down, L1 keeps the answer its whole life: each worker would otherwise
            # ask the issuer again every cache_l1_ttl, and lose what it could resurrect.
            if l2 is not None and key is not None:
                l2.set(key, entry)
            self._l1.set(token, entry, alone=l2 is None or not l2.available)
        return entry

    def _entry(self, answer: dict[str, Any], now: float) -> Entry:
        """Apply the TTL policy: never past ``exp``, at most ``cache_ttl_max``."""
        s = self._settings
        if answer.get("active") is not True:
            until = now + s.cache_ttl_neg
            return Entry(False, until, until)
        exp = expiry(answer)
        ttl = float(s.cache_ttl) if exp is None else exp - now
        if s.cache_ttl_max:
            ttl = min(ttl, s.cache_ttl_max)
        ttl = max(ttl, s.cache_ttl_min)
        stale = ttl + s.cache_ttl_resurrect
        if exp is not None:
            ttl = min(ttl, exp - now)
            stale = min(stale, exp - now)
        return Entry(True, now + ttl, now + max(ttl, stale), answer)

    # -- the decision ------------------------------------------------------------

    def _decide(self, entry: Entry, token: str) -> Claims:
        settings = self._settings
        claims = entry.claims
        if settings.introspection_check_active and not entry.active:
            raise InvalidToken("the token is not active", reason="token_inactive")
        if entry.active and not is_access_token(claims, required=settings.introspection_token_type_required):
            raise InvalidToken("the introspection answer does not say the token is an access token")
        try:
            # RFC 7662 section 2.2: exp and nbf are optional; iat says nothing about validity here.
            check_time_claims(claims, self._clock(), settings.leeway, required=(), checked=("exp", "nbf"))
        except TimeClaimError as exc:
            raise InvalidToken(exc.describe("the token"), reason=exc.reason) from None
        if claims.get("iss") is not None and settings.issuer and not issued_by(claims, settings.issuer):
            raise InvalidToken("the token was issued by another issuer", reason="issuer_mismatch")
        if not meant_for(claims, self._audience):
            raise InvalidToken("the token is not meant for this audience", reason="audience_mismatch")
        return claims


#: RFC 6749 section 7.1 and RFC 9449 section 5: the access token types (case-insensitive, section 5.1).
ACCESS_TOKEN_TYPES = frozenset({"bearer", "dpop"})
#: Keycloak's ``typ`` claim for what is not an access token (its introspection copies the token's claims).
_KEYCLOAK_OTHER_TYPES = frozenset({"refresh", "offline", "id", "logout", "serialized-id"})


def is_access_token(answer: Claims, *, required: bool = True) -> bool:
    """Whether an active introspection answer is for an access token (issue 11 item 8).

    An issuer introspects every token it issued, refresh tokens too, and a refresh token's
    answer can carry the same ``aud`` and ``cnf`` as its access token. What issuers say:

    - RFC 7662 section 2.2 ``token_type``: ``Bearer`` or ``DPoP`` for access tokens.
      panva's oidc-provider omits it for refresh tokens, and only for them;
      Keycloak sets it to the token's ``typ``: ``Refresh`` or ``Offline`` for refresh tokens.
    - Keycloak's ``typ`` claim, and Ory Hydra's ``token_use`` (``access_token``/``refresh_token``).

    :param required: refuse an answer without ``token_type`` (``introspection_token_type_required``).
    """
    token_type = answer.get("token_type")
    if token_type is None:
        if required:
            return False
    elif not isinstance(token_type, str) or token_type.lower() not in ACCESS_TOKEN_TYPES:
        return False
    typ = answer.get("typ")
    if isinstance(typ, str) and typ.lower() in _KEYCLOAK_OTHER_TYPES:
        return False
    token_use = answer.get("token_use")
    return token_use in (None, "access_token")


def _newer(a: Entry | None, b: Entry | None) -> Entry | None:
    if a is None:
        return b
    if b is None:
        return a
    return a if a.stale_until >= b.stale_until else b
