"""DPoP: demonstrating proof of possession with a signed proof per request (RFC 9449).

:class:`DPoPVerifier` runs every check of RFC 9449 section 4.3 (and 7.1 for a
proof that accompanies an access token), remembers each proof's ``jti`` per
``htu`` for the proof lifetime so that a proof is accepted once across all
workers and hosts (section 11.1), and issues stateless server nonces
(section 8) that any worker can verify.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import string
import struct
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from .cache.memory import TTLCache
from .cache.seal import derive_key
from .errors import DPoPError, NonceRequired, TemporarilyUnavailable
from .http import request_path
from .jose import (
    PRIVATE_MEMBERS,
    JSONError,
    b64url_decode,
    b64url_encode,
    equal_ascii,
    json_object,
    number,
    segment_object,
)
from .proof_keys import KeyRefused, ProofKey, ProofKeys
from .types import Claims, WSGIEnvironment

# DPoPError and NonceRequired live in errors.py with every other error; re-exported here.
__all__ = ["DPoPError", "DPoPVerifier", "NonceRequired", "ReplayCache", "ath_of"]

MAX_PROOF_LENGTH = 8 * 1024
#: The longest protected header accepted: 4096 bytes, base64url-encoded (a 4096-bit RSA key fits).
MAX_HEADER_SEGMENT = (4096 * 4 + 2) // 3
_DEFAULT_PORTS = {"http": 80, "https": 443}
_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
#: Path characters left as they are when the request's path is quoted for htu (RFC 3986 section 3.3).
_PATH_SAFE = "/;=,:@!$&'()*+~"
_PLAIN_PATH = re.compile(r"[A-Za-z0-9/;=,:@!$&'()*+~._-]*")
#: RFC 3986 section 3.2.2: reg-name or IP-literal characters, and ":" for the port.
_HOST = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=%:\[\]-]+")
#: How long a server nonce stays valid; a fresh one is sent once a third of it is left.
NONCE_LIFETIME = 300
#: Proof headers (a client's typ, alg and key) remembered with their prepared key.
HEADER_MEMO_SIZE = 1024
#: Access tokens whose ``ath`` is remembered (cleared when full: a cheap bound).
ATH_MEMO_SIZE = 1024
#: Seconds a client is asked to wait when the replay store cannot be asked (its circuit breaker is 1 s).
REPLAY_RETRY_AFTER = 2




def ath_of(token: str) -> str:
    """RFC 9449 section 4.2: base64url(SHA-256(ASCII access token))."""
    return b64url_encode(hashlib.sha256(token.encode("ascii")).digest())



def _normalize_uri(uri: str) -> str | None:
    """Scheme-based normalization (RFC 3986 sections 6.2.2 and 6.2.3), without query and fragment."""
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if scheme not in _DEFAULT_PORTS or not host:
        return None
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port in (None, _DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    return urlunsplit((scheme, netloc, _PERCENT.sub(_normalize_escape, parts.path) or "/", "", ""))


def _normalize_escape(match: re.Match[str]) -> str:
    """RFC 3986 section 6.2.2.1 and 6.2.2.2: upper-case escapes, and decode the unreserved ones."""
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else "%" + match.group(1).upper()


_MALFORMED = "the DPoP proof is not a well-formed JWT"
#: What a refused key is told (see :class:`~certbound_wsgi.proof_keys.KeyRefused`).
_KEY_REFUSALS = {
    "kty": "the DPoP proof's jwk is not an asymmetric key",
    "invalid": "the DPoP proof's jwk is not a valid key",
    "mismatch": "the DPoP proof's signature is invalid",
    "curve": "the DPoP proof's key is on a curve this server does not accept",
    "rsa": "the DPoP proof's RSA key is not accepted: it needs e = 65537 and at most 4096 bits",
}


def _required_claims(claims: Claims, with_ath: bool) -> float:
    """4.3 (3): the required claims are there, and well-typed; the proof's ``iat``."""
    for name in ("jti", "htm", "htu", "ath") if with_ath else ("jti", "htm", "htu"):
        value = claims.get(name)
        if not isinstance(value, str) or not value or len(value) > 2048:
            raise DPoPError(f"the DPoP proof's {name} claim is missing or invalid")
    iat = number(claims.get("iat"))
    if iat is None:
        raise DPoPError("the DPoP proof's iat claim is missing or invalid")
    return iat


class ReplayCache:
    """Remembers proof ``jti`` values for the proof lifetime.

    In Redis (``SET NX`` with a TTL) when configured, so that a proof replayed to
    another worker or host is refused; otherwise in process, which protects one
    process only.

    :param redis: an object with ``add_once(key, ttl) -> bool | None`` (``None``: Redis cannot be asked).
    :param fail_open: accept proofs when Redis cannot be asked (``dpop_replay_fail_open``).
    """

    def __init__(self, redis: Any | None, size: int = 100_000, fail_open: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._redis = redis
        self._fail_open = fail_open
        self._clock = clock
        self._seen: TTLCache[bool] = TTLCache(size, clock)

    def first_use(self, key: str, ttl: float) -> bool:
        """True the first time ``key`` is seen within ``ttl`` seconds.

        :raises TemporarilyUnavailable: Redis cannot be asked (down, timed out, out of memory) and failing
            open is not allowed: a server fault, so 503 with ``Retry-After``, never a client error.
        """
        if self._redis is not None:
            if len(self._seen) and self._seen.get(key) is not None:
                # Accepted here while Redis was down (fail open): still a replay now.
                return False
            added = self._redis.add_once(key, ttl)
            if added is not None:
                return bool(added)
            if not self._fail_open:
                raise TemporarilyUnavailable("DPoP replay protection is unavailable; try again shortly",
                                             retry_after=REPLAY_RETRY_AFTER, reason="store_unavailable")
        return self._seen.add(key, True, self._clock() + ttl)


class DPoPVerifier:
    """Verifies DPoP proofs for one middleware instance.

    :param replay: the shared replay cache.
    :param is_trusted_peer: whether the request came through the authenticated channel from the
        proxy (:mod:`certbound_wsgi.channel`), for ``X-Forwarded-Proto``.
    :param key_name: names a replay-cache entry from its parts.
    :param algs: the proof algorithms accepted, in the order offered (``dpop_signing_alg_values_supported``).
    :param proof_lifetime: seconds a proof is accepted after its ``iat`` (``dpop_proof_lifetime``).
    :param leeway: seconds of clock skew allowed (``leeway``).
    :param use_nonce: whether proofs must carry a server nonce (``dpop_use_nonce``).
    :param public_base_url: the scheme and authority clients address, if fixed (``public_base_url``).
    :param allowed_hosts: otherwise, the ``Host`` values for which the URI is rebuilt from the request
        (``dpop_allowed_hosts``); a request for any other host is refused.
    :param secret: keys the nonces, so that every worker accepts every other's (``cache_secret``
        or ``client_secret``); without one, nonces are per process.
    """

    def __init__(self, replay: ReplayCache, is_trusted_peer: Callable[[WSGIEnvironment], bool],
                 key_name: Callable[..., str], *,
                 algs: Iterable[str], proof_lifetime: float, leeway: float, use_nonce: bool,
                 public_base_url: str = "", allowed_hosts: Iterable[str] = (), secret: str | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._alg_list = tuple(algs)
        self._algs = frozenset(self._alg_list)
        self._proof_lifetime = proof_lifetime
        self._leeway = leeway
        self._use_nonce = use_nonce
        self._replay = replay
        self._trusted = is_trusted_peer
        self._key_name = key_name
        self._clock = clock
        self._base = public_base_url.rstrip("/")
        self._lifetime = proof_lifetime + 2 * leeway
        # Section 4.3 (9) compares htu with the URI the client addressed. The client also chooses
        # Host, so a Host is believed only when the operator listed it (issue 11 item 4); every
        # allowed origin is kept normalized, with either scheme (the scheme comes from the proxy).
        self._origins = frozenset(
            origin for host in allowed_hosts for scheme in _DEFAULT_PORTS
            if (origin := _normalize_uri(f"{scheme}://{host}/")) is not None
        )
        self._nonce_key = derive_key(secret, "dpop-nonce")
        self._keys = ProofKeys()
        self._headers: dict[str, tuple[str, ProofKey]] = {}
        self._headers_lock = threading.Lock()
        self._aths: dict[str, str] = {}

    @property
    def algs_param(self) -> str:
        """The ``algs`` auth-param of the DPoP challenge (RFC 9449 section 7.1)."""
        return " ".join(self._alg_list)

    # -- nonces (section 8): a timestamp and its HMAC, so that any worker can check any other's ----

    def new_nonce(self) -> str:
        stamp = struct.pack(">Q", int(self._clock()))
        return b64url_encode(stamp + hmac.new(self._nonce_key, stamp, hashlib.sha256).digest()[:16])

    def _nonce_age(self, nonce: object) -> float | None:
        if not isinstance(nonce, str) or len(nonce) != 32:
            return None
        try:
            raw = b64url_decode(nonce)
        except ValueError:
            return None
        stamp, mac = raw[:8], raw[8:]
        if not hmac.compare_digest(mac, hmac.new(self._nonce_key, stamp, hashlib.sha256).digest()[:16]):
            return None
        age = self._clock() - struct.unpack(">Q", stamp)[0]
        return age if -self._leeway <= age < NONCE_LIFETIME else None

    def nonce_for_response(self, age: float | None) -> str | None:
        """A fresh nonce for a successful response when the client's is about to expire (section 8.2).

        :param age: what :meth:`verify` returned: the age of the proof's nonce, or ``None``.
        """
        if age is not None and age > NONCE_LIFETIME * 2 / 3:
            return self.new_nonce()
        return None

    # -- the proof --------------------------------------------------------------

    def htu(self, environ: WSGIEnvironment) -> str | None:
        """The request's URI without query and fragment, as the client addressed it.

        ``public_base_url`` followed by the path; or, with ``dpop_allowed_hosts``, the
        request's scheme and ``Host`` when that host is listed. ``None``: the request's
        ``Host`` is not one this server answers for.
        """
        raw = request_path(environ)
        if _PLAIN_PATH.fullmatch(raw):
            path = raw  # what quote() would return, at a fraction of its cost
        else:
            # PEP 3333: the path arrives as latin-1-decoded bytes; quote those bytes, not their UTF-8.
            try:
                path = quote(raw.encode("latin-1"), safe=_PATH_SAFE)
            except UnicodeEncodeError:
                path = quote(raw, safe=_PATH_SAFE)
        if self._base:
            return self._base + path
        scheme = str(environ.get("wsgi.url_scheme", "http"))
        if self._trusted(environ):
            forwarded = environ.get("HTTP_X_FORWARDED_PROTO", "").split(",")[0].strip().lower()
            if forwarded in _DEFAULT_PORTS:
                scheme = forwarded
        host = environ.get("HTTP_HOST") or f"{environ.get('SERVER_NAME', '')}:{environ.get('SERVER_PORT', '')}"
        # RFC 9110 section 7.2: Host is uri-host [":" port]; userinfo, a path or spaces make it no Host at all.
        if not _HOST.fullmatch(host):
            return None
        origin = _normalize_uri(f"{scheme}://{host}/")
        if origin is None or origin not in self._origins:
            return None
        return origin[:-1] + path

    def verify(self, environ: WSGIEnvironment, token: str | None, jkt: object) -> float | None:
        """Check the request's DPoP proof for ``token``, bound to ``jkt`` (RFC 9449 sections 4.3 and 7.1).

        ``token`` is ``None`` for a DPoP-bound session, whose proof has no ``ath`` to check.
        The work is one header check per client key (then remembered), one signature
        verification and one claims parse; whatever can be refused without a signature
        is refused first.

        :raises DPoPError: the proof is missing or invalid.
        :raises NonceRequired: nonces are on and the proof lacks a valid one.
        :raises TemporarilyUnavailable: the replay store cannot be asked (503).
        :returns: the age of the proof's server nonce (for :meth:`nonce_for_response`); ``None`` when
            nonces are off.
        :raises DPoPError: (400 ``invalid_request``) more than one DPoP header.
        """
        raw = environ.get("HTTP_DPOP")
        if not raw:
            raise DPoPError("a DPoP proof is required")
        # 4.3 (1): exactly one DPoP header. Servers join repeated headers with commas; JWTs have none.
        if "," in raw:
            raise DPoPError("more than one DPoP header", error="invalid_request", status=400)
        proof = raw.strip()
        # 4.3 (2): a single well-formed JWT.
        if len(proof) > MAX_PROOF_LENGTH or proof.count(".") != 2:
            raise DPoPError(_MALFORMED)
        header_segment, payload_segment, signature_segment = proof.split(".")
        # A client sends the same header (typ, alg, its key) with every proof: its checks are a
        # function of its text, so a header seen before with a usable key skips them all.
        known = self._headers.get(header_segment)
        if known is not None:
            alg, key = known
            if not equal_ascii(jkt, key.thumbprint):
                raise DPoPError("the DPoP proof's key does not match the token's cnf.jkt")
        else:
            alg, key = self._check_header(header_segment, jkt)
        # 4.3 (6): the signature, with the embedded key.
        try:
            signature = b64url_decode(signature_segment)
            payload = b64url_decode(payload_segment)
        except ValueError:
            raise DPoPError("the DPoP proof's signature is invalid") from None
        if not key.verify(alg, proof[: len(header_segment) + 1 + len(payload_segment)].encode("ascii"), signature):
            raise DPoPError("the DPoP proof's signature is invalid")
        try:
            claims = json_object(payload)
        except JSONError as exc:
            raise DPoPError(exc.describe("the DPoP proof's claims", "are")) from None
        nonce_age = self._check_claims(environ, claims, token)
        # 11.1: a proof is used once, by any worker on any host.
        if not self._replay.first_use(self._key_name("dpop", claims["htu"], claims["jti"]), self._lifetime):
            raise DPoPError("the DPoP proof has already been used", reason="dpop_replay")
        return nonce_age

    def _check_header(self, header_segment: str, jkt: object) -> tuple[str, ProofKey]:
        """Section 4.3 checks (2) to (7) on the header, and the key's thumbprint against ``jkt`` (7.1).

        :returns: the algorithm and the prepared key, remembered for the next proof with this header.
        """
        # The header is remembered: no larger than a 4096-bit RSA key needs (joserfc's limit before).
        if len(header_segment) > MAX_HEADER_SEGMENT:
            raise DPoPError(_MALFORMED)
        try:
            header = segment_object(header_segment)
        except JSONError:
            raise DPoPError(_MALFORMED) from None
        # 4.3 (4), (5): typ, and an asymmetric algorithm we support (never "none" or HS*).
        if header.get("typ") != "dpop+jwt":
            raise DPoPError("the DPoP proof's typ is not dpop+jwt")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algs:
            raise DPoPError("the DPoP proof's algorithm is not accepted")
        if "crit" in header:
            raise DPoPError("the DPoP proof has critical header parameters this server does not understand")
        # 4.3 (7): a public key, never a private one.
        jwk = header.get("jwk")
        if not isinstance(jwk, dict):
            raise DPoPError("the DPoP proof has no jwk header")
        if PRIVATE_MEMBERS & jwk.keys():
            raise DPoPError("the DPoP proof's jwk contains a private key")
        # 7.1: the token is bound to this very key (RFC 7638 thumbprint), compared before the
        # key is imported or the signature checked: another key costs one hash, not a verification.
        try:
            key = self._keys.get(jwk, alg, jkt)
        except KeyRefused as refused:
            raise DPoPError(_KEY_REFUSALS[refused.problem]) from None
        if key is None:
            raise DPoPError("the DPoP proof's key does not match the token's cnf.jkt")
        with self._headers_lock:
            if len(self._headers) >= HEADER_MEMO_SIZE:
                self._headers.pop(next(iter(self._headers)), None)  # the oldest: dicts keep insertion order
            self._headers[header_segment] = (alg, key)
        return alg, key

    def _ath(self, token: str) -> str:
        """:func:`ath_of`, remembered for the last tokens: a client sends one token with many proofs."""
        ath = self._aths.get(token)
        if ath is None:
            ath = ath_of(token)
            if len(self._aths) >= ATH_MEMO_SIZE:
                self._aths.clear()
            self._aths[token] = ath
        return ath

    def _check_claims(self, environ: WSGIEnvironment, claims: Claims, token: str | None) -> float | None:
        iat = _required_claims(claims, token is not None)
        # 4.3 (8), (9): the method and the URI of this request.
        if claims["htm"] != environ.get("REQUEST_METHOD"):
            raise DPoPError("the DPoP proof's htm does not match the request method")
        expected = self.htu(environ)
        if expected is None:
            raise DPoPError("the request's Host is not one this server accepts DPoP proofs for")
        # The same text is the same URI; only a different spelling needs normalizing (RFC 3986 section 6.2).
        if claims["htu"] != expected:
            normalized = _normalize_uri(expected)
            if normalized is None or _normalize_uri(claims["htu"]) != normalized:
                raise DPoPError("the DPoP proof's htu does not match the request URI")
        # 4.3 (10): the nonce, when this server requires one.
        age: float | None = None
        if self._use_nonce:
            age = self._nonce_age(claims.get("nonce"))
            if age is None:
                raise NonceRequired(self.new_nonce())
        # 4.3 (11): freshness.
        now = self._clock()
        leeway = self._leeway
        if iat > now + leeway or iat < now - self._proof_lifetime - leeway:
            raise DPoPError("the DPoP proof's iat is outside the accepted window")
        # 4.3 (12) / 7.1: the proof is for this access token.
        if token is not None and not equal_ascii(claims["ath"], self._ath(token)):
            raise DPoPError("the DPoP proof's ath does not match the access token")
        return age
