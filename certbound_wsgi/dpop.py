"""DPoP: demonstrating proof of possession with a signed proof per request (RFC 9449).

:class:`DPoPVerifier` runs every check of RFC 9449 section 4.3 (and 7.1 for a
proof that accompanies an access token), remembers each proof's ``jti`` per
``htu`` for the proof lifetime so that a proof is accepted once across all
workers and hosts (section 11.1), and issues stateless server nonces
(section 8) that any worker can verify.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import string
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, OKPKey, RSAKey

from .claims import equal_ascii, jws_registry, number
from .errors import DPoPError, NonceRequired
from .settings import Settings
from .types import Claims, WSGIEnvironment

# DPoPError and NonceRequired live in errors.py with every other error; re-exported here.
__all__ = ["DPoPError", "DPoPVerifier", "NonceRequired", "ReplayCache", "ath_of"]

MAX_PROOF_LENGTH = 8 * 1024
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_KEY_TYPES: dict[str, type[ECKey] | type[RSAKey] | type[OKPKey]] = {"EC": ECKey, "RSA": RSAKey, "OKP": OKPKey}
_DEFAULT_PORTS = {"http": 80, "https": 443}
_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
#: How long a server nonce stays valid; a fresh one is sent once a third of it is left.
NONCE_LIFETIME = 300


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def ath_of(token: str) -> str:
    """RFC 9449 section 4.2: base64url(SHA-256(ASCII access token))."""
    return _b64url(hashlib.sha256(token.encode("ascii")).digest())


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


def _json_segment(segment: str) -> dict[str, Any]:
    try:
        value = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)), parse_constant=_reject)
    except (binascii.Error, ValueError, RecursionError):
        raise DPoPError("the DPoP proof is not a well-formed JWT") from None
    if not isinstance(value, dict):
        raise DPoPError("the DPoP proof is not a well-formed JWT")
    return value


def _reject(name: str) -> None:
    raise ValueError(name)


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
        self._size = size
        self._clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def first_use(self, key: str, ttl: float) -> bool:
        """True the first time ``key`` is seen within ``ttl`` seconds.

        :raises DPoPError: Redis cannot be asked and failing open is not allowed.
        """
        if self._redis is not None:
            if self._seen and self._seen_here(key):
                # Accepted here while Redis was down (fail open): still a replay now.
                return False
            added = self._redis.add_once(key, ttl)
            if added is not None:
                return bool(added)
            if not self._fail_open:
                raise DPoPError("DPoP replay protection is unavailable; try again shortly")
        now = self._clock()
        with self._lock:
            expires = self._seen.get(key)
            if expires is not None and expires > now:
                return False
            self._seen[key] = now + ttl
            self._seen.move_to_end(key)
            while self._seen:
                oldest, until = next(iter(self._seen.items()))
                if until > now and len(self._seen) <= self._size:
                    break
                del self._seen[oldest]
        return True


    def _seen_here(self, key: str) -> bool:
        with self._lock:
            expires = self._seen.get(key)
        return expires is not None and expires > self._clock()


class DPoPVerifier:
    """Verifies DPoP proofs for one middleware instance.

    :param settings: supplies ``dpop_*`` options, ``leeway``, ``public_base_url``.
    :param replay: the shared replay cache.
    :param is_trusted_peer: whether ``REMOTE_ADDR`` is a trusted proxy (for ``X-Forwarded-Proto``).
    :param key_name: names a replay-cache entry from its parts.
    """

    def __init__(self, settings: Settings, replay: ReplayCache, is_trusted_peer: Callable[[str], bool],
                 key_name: Callable[..., str], clock: Callable[[], float] = time.time) -> None:
        self._settings = settings
        self._algs = frozenset(settings.dpop_signing_alg_values_supported)
        self._replay = replay
        self._trusted = is_trusted_peer
        self._key_name = key_name
        self._clock = clock
        self._base = settings.public_base_url.rstrip("/")
        secret = settings.shared_secret
        # Without a shared secret, nonces are per process (Settings refuses that with dpop_use_nonce).
        self._nonce_key = HKDF(hashes.SHA256(), 32, None, b"certbound-wsgi/v1/dpop-nonce").derive(
            secret.encode() if secret else os.urandom(32)
        )

    @property
    def algs_param(self) -> str:
        """The ``algs`` auth-param of the DPoP challenge (RFC 9449 section 7.1)."""
        return " ".join(self._settings.dpop_signing_alg_values_supported)

    # -- nonces (section 8): a timestamp and its HMAC, so that any worker can check any other's ----

    def new_nonce(self) -> str:
        stamp = struct.pack(">Q", int(self._clock()))
        return _b64url(stamp + hmac.new(self._nonce_key, stamp, hashlib.sha256).digest()[:16])

    def _nonce_age(self, nonce: object) -> float | None:
        if not isinstance(nonce, str) or len(nonce) != 32:
            return None
        try:
            raw = base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))
        except (binascii.Error, ValueError):
            return None
        stamp, mac = raw[:8], raw[8:]
        if not hmac.compare_digest(mac, hmac.new(self._nonce_key, stamp, hashlib.sha256).digest()[:16]):
            return None
        age = self._clock() - struct.unpack(">Q", stamp)[0]
        return age if -self._settings.leeway <= age < NONCE_LIFETIME else None

    def nonce_for_response(self, age: float | None) -> str | None:
        """A fresh nonce for a successful response when the client's is about to expire (section 8.2).

        :param age: what :meth:`verify` returned: the age of the proof's nonce, or ``None``.
        """
        if age is not None and age > NONCE_LIFETIME * 2 / 3:
            return self.new_nonce()
        return None

    # -- the proof --------------------------------------------------------------

    def htu(self, environ: WSGIEnvironment) -> str:
        """The request's URI without query and fragment, as the client addressed it."""
        # PEP 3333: the path arrives as latin-1-decoded bytes; quote those bytes, not their UTF-8.
        raw = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
        try:
            path = quote(raw.encode("latin-1"), safe="/;=,:@!$&'()*+~")
        except UnicodeEncodeError:
            path = quote(raw, safe="/;=,:@!$&'()*+~")
        if self._base:
            return self._base + path
        scheme = str(environ.get("wsgi.url_scheme", "http"))
        if self._trusted(environ.get("REMOTE_ADDR", "")):
            forwarded = environ.get("HTTP_X_FORWARDED_PROTO", "").split(",")[0].strip().lower()
            if forwarded in _DEFAULT_PORTS:
                scheme = forwarded
        host = environ.get("HTTP_HOST") or f"{environ.get('SERVER_NAME', '')}:{environ.get('SERVER_PORT', '')}"
        return f"{scheme}://{host}{path}"

    def verify(self, environ: WSGIEnvironment, token: str | None, jkt: object) -> float | None:
        """Check the request's DPoP proof for ``token``, bound to ``jkt`` (RFC 9449 sections 4.3 and 7.1).

        ``token`` is ``None`` for a DPoP-bound session, whose proof has no ``ath`` to check.

        :returns: the age of the proof's server nonce (for :meth:`nonce_for_response`); ``None`` when
            nonces are off.

        :raises DPoPError: the proof is missing or invalid.
        :raises NonceRequired: nonces are on and the proof lacks a valid one.
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
            raise DPoPError("the DPoP proof is not a well-formed JWT")
        header = _json_segment(proof.split(".", 1)[0])
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
        if _PRIVATE_MEMBERS & jwk.keys():
            raise DPoPError("the DPoP proof's jwk contains a private key")
        key_type = _KEY_TYPES.get(str(jwk.get("kty")))
        if key_type is None:
            raise DPoPError("the DPoP proof's jwk is not an asymmetric key")
        try:
            key = key_type.import_key(jwk)
        except (JoseError, ValueError, TypeError, KeyError):
            raise DPoPError("the DPoP proof's jwk is not a valid key") from None
        # 4.3 (6): the signature, with the embedded key.
        try:
            payload = jws.deserialize_compact(proof, key, registry=jws_registry(alg)).payload
        except (JoseError, ValueError, TypeError):
            raise DPoPError("the DPoP proof's signature is invalid") from None
        try:
            claims = json.loads(payload, parse_constant=_reject)
        except (ValueError, RecursionError):
            raise DPoPError("the DPoP proof's claims are not JSON") from None
        if not isinstance(claims, dict):
            raise DPoPError("the DPoP proof's claims are not a JSON object")
        nonce_age = self._check_claims(environ, claims, token)
        # 7.1: the token is bound to this very key (RFC 7638 thumbprint).
        if not equal_ascii(jkt, key.thumbprint()):
            raise DPoPError("the DPoP proof's key does not match the token's cnf.jkt")
        # 11.1: a proof is used once, by any worker on any host.
        jti = claims["jti"]
        lifetime = self._settings.dpop_proof_lifetime + 2 * self._settings.leeway
        if not self._replay.first_use(self._key_name("dpop", claims["htu"], jti), lifetime):
            raise DPoPError("the DPoP proof has already been used")
        return nonce_age

    def _check_claims(self, environ: WSGIEnvironment, claims: Claims, token: str | None) -> float | None:
        # 4.3 (3): the required claims.
        for name in ("jti", "htm", "htu", "ath") if token is not None else ("jti", "htm", "htu"):
            value = claims.get(name)
            if not isinstance(value, str) or not value or len(value) > 2048:
                raise DPoPError(f"the DPoP proof's {name} claim is missing or invalid")
        iat = number(claims.get("iat"))
        if iat is None:
            raise DPoPError("the DPoP proof's iat claim is missing or invalid")
        # 4.3 (8), (9): the method and the URI of this request.
        if claims["htm"] != environ.get("REQUEST_METHOD"):
            raise DPoPError("the DPoP proof's htm does not match the request method")
        expected = _normalize_uri(self.htu(environ))
        if expected is None or _normalize_uri(claims["htu"]) != expected:
            raise DPoPError("the DPoP proof's htu does not match the request URI")
        # 4.3 (10): the nonce, when this server requires one.
        age: float | None = None
        if self._settings.dpop_use_nonce:
            age = self._nonce_age(claims.get("nonce"))
            if age is None:
                raise NonceRequired(self.new_nonce())
        # 4.3 (11): freshness.
        now = self._clock()
        leeway = self._settings.leeway
        if iat > now + leeway or iat < now - self._settings.dpop_proof_lifetime - leeway:
            raise DPoPError("the DPoP proof's iat is outside the accepted window")
        # 4.3 (12) / 7.1: the proof is for this access token.
        if token is not None and not equal_ascii(claims["ath"], ath_of(token)):
            raise DPoPError("the DPoP proof's ath does not match the access token")
        return age
