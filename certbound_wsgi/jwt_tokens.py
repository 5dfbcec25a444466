"""JWT access tokens (RFC 9068, RFC 7519): signature and claims.

A verified token's claims are memoized by the token text until its ``exp``, so
the signature is checked once per token rather than once per request. The
binding is not part of this module: it is checked on every request, memo hit or
not (see :mod:`certbound_wsgi.binding`).

A token seen for the first time costs one header parse (none for a header seen
before: an issuer sends one per key), one signature verification with the key
prepared once (:class:`~certbound_wsgi.jose.Verifier`), and one parse of the
claims (their depth is walked only when they hold brackets enough to be too deep).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterable

from .discovery import Discovery, DiscoveryError, UnknownKey
from .errors import InvalidToken, TemporarilyUnavailable
from .jose import (
    JSONError,
    PublicKey,
    TimeClaimError,
    Verifier,
    b64url_decode,
    check_time_claims,
    json_object,
    meant_for,
    segment_object,
    verifier,
)
from .types import Claims

__all__ = ["JWTValidator", "looks_like_jwt"]

# RFC 9068 section 2.1 asks for "at+jwt"; plain JWTs (no typ, or "JWT") are
# common and accepted. Anything else (an ID token's, a DPoP proof's "dpop+jwt",
# a logout token) is another kind of JWT and refused: no token confusion.
_ACCEPTED_TYP = frozenset({"at+jwt", "application/at+jwt", "jwt"})
MAX_JWT_LENGTH = 16 * 1024
#: Distinct protected headers remembered, and keys kept prepared. Only headers of tokens that
#: verified and keys of the issuer's JWKS get in; each is emptied when full (a JWKS changed).
MAX_HEADERS = 64
MAX_KEYS = 256

#: A protected header's ``alg``, ``kid`` and lower-cased ``typ``.
_Header = tuple[str, str | None, str | None]


def looks_like_jwt(token: str) -> bool:
    """A compact JWS has exactly three dot-separated parts."""
    return token.count(".") == 2


class JWTValidator:
    """Validates JWT access tokens issued by one issuer.

    :param discovery: the issuer's keys and the algorithms it advertises.
    :param issuer: the ``iss`` a token must carry (``issuer``).
    :param audience: a token must name one of these in ``aud`` (``audience``).
    :param leeway: seconds of clock skew allowed on ``exp``, ``nbf`` and ``iat`` (``leeway``).
    :param signing_algs: the algorithms accepted until the issuer's metadata is known (``token_signing_algs``).
    :param memo_size: how many verified tokens are remembered (``token_cache_size``).
    :param clock: wall-clock seconds; injectable for tests.
    """

    def __init__(self, discovery: Discovery, *, issuer: str, audience: Iterable[str], leeway: float,
                 signing_algs: Iterable[str], memo_size: int, clock: Callable[[], float] = time.time) -> None:
        self._discovery = discovery
        self._issuer = issuer
        self._audience = frozenset(audience)
        self._leeway = leeway
        self._signing_algs = frozenset(signing_algs)
        self._clock = clock
        self._memo: dict[str, tuple[Claims, float]] = {}
        self._memo_size = memo_size
        self._memo_lock = threading.Lock()
        self._headers: dict[str, _Header] = {}
        self._verifiers: dict[int, tuple[PublicKey, Verifier]] = {}

    def validate(self, token: str) -> Claims:
        """The token's claims, once its signature and claims are valid.

        :raises InvalidToken: the token is not valid.
        :raises TemporarilyUnavailable: the issuer's keys cannot be fetched.
        """
        now = self._clock()
        hit = self._memo.get(token)
        if hit is not None:
            claims, expires = hit
            if now < expires:
                return claims
            self._forget(token)
        # The cold path: the signature, then the claims.
        claims = self.signed_claims(token, _ACCEPTED_TYP)
        self._check_claims(claims, now)
        memo = self._memo
        if len(memo) >= self._memo_size:
            self._evict()
        # One dict store: atomic, so no lock is needed for the insert itself.
        memo[token] = (claims, float(claims["exp"]) + self._leeway)
        return claims

    # -- the cold path --------------------------------------------------------

    def signed_claims(self, token: str, accepted_typ: frozenset[str]) -> Claims:
        """The claims of a JWT signed by the issuer, before any claim is checked.

        Nothing the issuer did not sign is decoded but the header: the claims are parsed
        only once the signature holds.

        :param accepted_typ: lower-cased ``typ`` values accepted besides none at all.
        :raises InvalidToken: malformed, or not signed by one of the issuer's keys.
        :raises TemporarilyUnavailable: the issuer's keys cannot be fetched.
        """
        first = token.find(".")
        second = token.find(".", first + 1)
        if len(token) > MAX_JWT_LENGTH or first < 0 or second < 0 or token.find(".", second + 1) >= 0:
            raise InvalidToken("the access token is not a JWT")
        segment = token[:first]
        header = self._check_header(segment, accepted_typ)
        alg, kid, _typ = header
        keys = self._keys_for(kid)
        try:
            # RFC 7515 section 5.2 steps 7 and 8: the signature, over the first two segments as sent.
            raw = token.encode("ascii")
            signing_input = raw[:second]
            signature = b64url_decode(raw[second + 1:])
        except ValueError:
            raise InvalidToken("the token's signature is invalid") from None
        # The claims' bytes are decoded now, while the token is in the CPU's caches (the verification
        # evicts them); they are parsed, and a decoding error reported, only once the signature holds.
        try:
            payload: bytes | None = b64url_decode(raw[first + 1:second])
        except ValueError:
            payload = None
        if not self._verified(keys, alg, signing_input, signature):
            raise InvalidToken("the token's signature is invalid")
        if segment not in self._headers:
            self._remember_header(segment, header)
        if payload is None:  # signed, yet not base64url
            raise InvalidToken("the token's claims are not JSON")
        try:
            return json_object(payload)
        except JSONError as exc:
            raise InvalidToken(exc.describe("the token's claims", "are")) from None

    def _keys_for(self, kid: str | None) -> list[PublicKey]:
        """The issuer's keys named ``kid``: its JWKS only (jku, x5u and jwk headers are ignored)."""
        try:
            return self._discovery.keys_for(kid)
        except UnknownKey:
            raise InvalidToken("the token is signed with an unknown key", reason="key_unknown") from None
        except DiscoveryError:
            raise TemporarilyUnavailable(
                "the issuer's signing keys cannot be fetched", retry_after=self._discovery.retry_after()
            ) from None

    def _verified(self, keys: list[PublicKey], alg: str, signing_input: bytes, signature: bytes) -> bool:
        """Whether one of ``keys``, each prepared once, verifies ``signature``."""
        prepared = self._verifiers
        for key in keys:
            known = prepared.get(id(key))
            each = known[1] if known is not None and known[0] is key else self._prepare(key)
            if each.verify(alg, signing_input, signature):
                return True
        return False

    def _check_header(self, segment: str, accepted_typ: frozenset[str]) -> _Header:
        """The protected header's ``alg``, ``kid`` and ``typ``, once the header is one this validator accepts.

        A header seen on a token that verified is not parsed again; what may have changed since
        (the algorithms the issuer advertises, the ``typ`` this caller accepts) is checked again.
        """
        header = self._headers.get(segment)
        if header is None:
            header = self._read_header(segment, accepted_typ)
        alg, _kid, typ = header
        if alg not in self._allowed_algs():
            raise InvalidToken("the token's signature algorithm is not accepted")
        if typ is not None and typ not in accepted_typ:
            raise InvalidToken("the token's typ is not an access token's")
        return header

    def _read_header(self, segment: str, accepted_typ: frozenset[str]) -> _Header:
        try:
            header = segment_object(segment)
        except JSONError as exc:
            raise InvalidToken("the token's header is not valid base64url JSON" if exc.problem == "syntax"
                               else exc.describe("the token's header")) from None
        alg = header.get("alg")
        # RFC 8725 section 3.1: an explicit allow-list; "none" and HS* are never in it.
        if not isinstance(alg, str) or alg not in self._allowed_algs():
            raise InvalidToken("the token's signature algorithm is not accepted")
        typ = header.get("typ")
        if typ is not None and (not isinstance(typ, str) or typ.lower() not in accepted_typ):
            raise InvalidToken("the token's typ is not an access token's")
        if "crit" in header:
            # RFC 7515 section 4.1.11: we understand no extensions, so must refuse.
            raise InvalidToken("the token has critical header parameters this server does not understand")
        kid = header.get("kid")
        if kid is not None and (not isinstance(kid, str) or len(kid) > 256):
            raise InvalidToken("the token's kid is malformed")
        return alg, kid, typ.lower() if typ is not None else None

    def _allowed_algs(self) -> frozenset[str]:
        algs = self._discovery.algorithms
        if not algs:
            # Nothing fetched yet: the configured list, until the issuer says more.
            self._discovery.refresh()
            algs = self._discovery.algorithms or self._signing_algs
        return algs

    def _prepare(self, key: PublicKey) -> Verifier:
        """``key`` prepared once: the discovery's key objects live as long as the JWKS they came from."""
        prepared = verifier(key)
        with self._memo_lock:
            if len(self._verifiers) >= MAX_KEYS:
                self._verifiers.clear()
            # The key is kept beside its verifier, so that its id cannot be reused while the entry lives.
            self._verifiers[id(key)] = (key, prepared)
        return prepared

    def _remember_header(self, segment: str, header: _Header) -> None:
        with self._memo_lock:
            if len(self._headers) >= MAX_HEADERS:
                self._headers.clear()
            self._headers[segment] = header

    def _check_claims(self, claims: Claims, now: float) -> None:
        # RFC 7519 section 4.1.1: iss exactly the issuer whose keys verified it (no normalization).
        if claims.get("iss") != self._issuer:
            raise InvalidToken("the token was issued by another issuer", reason="issuer_mismatch")
        try:
            check_time_claims(claims, now, self._leeway)
        except TimeClaimError as exc:
            raise InvalidToken(exc.describe("the token"), reason=exc.reason) from None
        if not meant_for(claims, self._audience):
            raise InvalidToken("the token is not meant for this audience", reason="audience_mismatch")
        sub = claims.get("sub")
        if sub is not None and not isinstance(sub, str):
            raise InvalidToken("the sub claim is not a string")

    # -- the memo -------------------------------------------------------------

    def _evict(self) -> None:
        memo = self._memo
        with self._memo_lock:
            # Oldest first (dicts keep insertion order), a tenth at a time: one scan past the
            # dict's dead slots per many inserts, and no OrderedDict links per entry. The keys are
            # listed in one call, which no other thread's insert can interleave with.
            for old in list(itertools.islice(memo, max(1, self._memo_size // 10))):
                memo.pop(old, None)

    def remembered_until(self, token: str) -> float | None:
        """When the memo entry of ``token`` expires (wall-clock seconds), or ``None`` when it has none."""
        hit = self._memo.get(token)
        return None if hit is None else hit[1]

    def _forget(self, token: str) -> None:
        with self._memo_lock:
            self._memo.pop(token, None)

    def memo_size(self) -> int:
        return len(self._memo)
