"""The public key in a DPoP proof (RFC 9449 section 4.3, checks 5 to 7): thumbprint first, then the key.

A proof carries its key in the ``jwk`` header, and the access token names the
key it is bound to by its RFC 7638 thumbprint (``cnf.jkt``, RFC 9449 section
6.1). The thumbprint is a SHA-256 over the key's required members alone, so it
is computed here from the JSON members, and compared with ``cnf.jkt`` before
any key is imported or any signature checked: a key the token is not bound to
costs one hash, whatever its size. Keys are refused before import unless they
are ones an honest client uses: RSA with e = 65537 and 2048 to 4096 bits, EC on
the curve of the proof's algorithm, OKP Ed25519 only.

A client signs thousands of proofs with one key, so the key, once imported by
``cryptography``, is kept in a bounded memo under its thumbprint input: a proof
then costs one signature verification.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .jose import Verifier, b64url_decode, b64url_encode, public_verifier

__all__ = ["KeyRefused", "ProofKey", "ProofKeys", "thumbprint_input", "thumbprint_of"]

#: RFC 7518 section 6.3.1.2: 65537 in base64urlUInt, the minimum octets, as every honest client sends it.
RSA_EXPONENT = "AQAB"
RSA_MIN_BITS = 2048
RSA_MAX_BITS = 4096

# RFC 7515 section 2: unpadded base64url. A member made of these needs no JSON escaping, so the
# canonical JSON of RFC 7638 section 3 can be written by hand, and two keys can never share it.
_B64URL = re.compile(r"[A-Za-z0-9_-]+")

# RFC 7518 section 3.4: the curve and the coordinate (and half-signature) size of each ECDSA algorithm.
_EC: dict[str, tuple[str, ec.EllipticCurve, int]] = {
    "ES256": ("P-256", ec.SECP256R1(), 32),
    "ES384": ("P-384", ec.SECP384R1(), 48),
    "ES512": ("P-521", ec.SECP521R1(), 66),
}
#: Each curve, and the base64url length of its coordinates.
_EC_CURVES = {crv: (curve, size, (size * 4 + 2) // 3) for crv, curve, size in _EC.values()}
_RSA_MIN_CHARS = (RSA_MIN_BITS // 8 * 4 + 2) // 3
_RSA_MAX_CHARS = (RSA_MAX_BITS // 8 * 4 + 2) // 3
#: The SHA-2 output sizes of the RSA algorithms (RFC 7518 sections 3.3 and 3.5), by their suffix.
_SHA2 = frozenset({"256", "384", "512"})
#: RFC 8037 section 3.1 (``EdDSA``) and RFC 9864 (the fully specified ``Ed25519``): Ed25519 keys only.
_EDDSA = frozenset({"EdDSA", "Ed25519"})


def _kty_of(alg: str) -> str | None:
    if alg in _EC:
        return "EC"
    if alg[:2] in ("RS", "PS") and alg[2:] in _SHA2:
        return "RSA"
    if alg in _EDDSA:
        return "OKP"
    return None


class KeyRefused(ValueError):
    """The proof's key cannot be used.

    :param problem: ``kty`` (no asymmetric key type), ``invalid`` (malformed members),
        ``mismatch`` (not a key for the proof's algorithm: no signature can verify),
        ``curve`` (a curve we do not accept) or ``rsa`` (an exponent or size we do not accept).
    """

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


def _member(jwk: dict[str, Any], name: str) -> str:
    value = jwk.get(name)
    if not isinstance(value, str) or not _B64URL.fullmatch(value):
        raise KeyRefused("invalid")
    return value


def thumbprint_input(jwk: dict[str, Any], alg: str) -> str:
    """The canonical JSON of ``jwk``'s required members (RFC 7638 section 3.2), for a proof signed with ``alg``.

    Refuses, without decoding any number, what is not a well-formed key, what cannot
    verify ``alg``, and the keys this server does not accept (see the module).

    :raises KeyRefused: it is not an acceptable key for ``alg``.
    """
    kty = jwk.get("kty")
    # Any JSON value may stand here; a list or an object must not reach the dict look-up.
    canonical = _CANONICAL.get(kty) if isinstance(kty, str) else None
    if canonical is None:
        raise KeyRefused("kty")
    return canonical(jwk, alg)


def _curve(jwk: dict[str, Any]) -> str:
    crv = jwk.get("crv")
    if not isinstance(crv, str):
        raise KeyRefused("invalid")
    return crv


def _ec_input(jwk: dict[str, Any], alg: str) -> str:
    crv = _curve(jwk)
    x, y = _member(jwk, "x"), _member(jwk, "y")
    if crv not in _EC_CURVES:
        raise KeyRefused("curve")
    # RFC 7518 section 6.2.1.2: each coordinate is the full size of the curve's field.
    if len(x) != len(y) or len(x) != _EC_CURVES[crv][2]:
        raise KeyRefused("invalid")
    if alg not in _EC or crv != _EC[alg][0]:
        raise KeyRefused("mismatch")
    return f'{{"crv":"{crv}","kty":"EC","x":"{x}","y":"{y}"}}'


def _rsa_input(jwk: dict[str, Any], alg: str) -> str:
    e, n = _member(jwk, "e"), _member(jwk, "n")
    # RFC 7518 section 3.3: "A key of size 2048 bits or larger MUST be used"; 2048 bits take
    # 342 base64url characters (the exact bit length is checked on import).
    if len(n) < _RSA_MIN_CHARS:
        raise KeyRefused("invalid")
    # Our limits: any exponent but 65537, or a larger modulus, makes verification slower
    # than an honest client ever needs (issue 11 item 5).
    if e != RSA_EXPONENT or len(n) > _RSA_MAX_CHARS:
        raise KeyRefused("rsa")
    if _kty_of(alg) != "RSA":
        raise KeyRefused("mismatch")
    return f'{{"e":"{e}","kty":"RSA","n":"{n}"}}'


def _okp_input(jwk: dict[str, Any], alg: str) -> str:
    crv = _curve(jwk)
    x = _member(jwk, "x")
    # RFC 8037 section 2; Ed448 is refused: EdDSA here means Ed25519 (RFC 9864).
    if crv != "Ed25519":
        raise KeyRefused("curve")
    if len(x) != 43:
        raise KeyRefused("invalid")
    if alg not in _EDDSA:
        raise KeyRefused("mismatch")
    return f'{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}'


_CANONICAL: dict[str, Callable[[dict[str, Any], str], str]] = {"EC": _ec_input, "RSA": _rsa_input, "OKP": _okp_input}


@dataclass(frozen=True, slots=True)
class ProofKey:
    """A public key prepared once: its thumbprint and the :class:`~certbound_wsgi.jose.Verifier` that
    checks its signatures (the same code that checks the issuer's, RFC 7515 section 5.2 step 8)."""

    thumbprint: str
    verifier: Verifier

    def verify(self, alg: str, signing_input: bytes, signature: bytes) -> bool:
        """Whether ``signature`` over ``signing_input`` is this key's, with ``alg`` (one
        :func:`thumbprint_input` accepted this key for)."""
        return self.verifier.verify(alg, signing_input, signature)


def _prepare(jwk: dict[str, Any], thumbprint: str) -> ProofKey:
    """Import the key (the members were vetted by :func:`thumbprint_input`).

    :raises KeyRefused: ``invalid``: not a point on the curve, not a modulus of the accepted size.
    """
    kty = jwk["kty"]
    try:
        if kty == "EC":
            curve, size, _ = _EC_CURVES[jwk["crv"]]
            x, y = b64url_decode(jwk["x"]), b64url_decode(jwk["y"])
            if len(x) != size or len(y) != size:
                raise KeyRefused("invalid")
            public: Any = ec.EllipticCurvePublicKey.from_encoded_point(curve, b"\x04" + x + y)
            crv = jwk["crv"]
        elif kty == "RSA":
            n = b64url_decode(jwk["n"])
            # base64urlUInt (RFC 7518 section 2): no leading zero octet.
            if n[0] == 0 or int.from_bytes(n).bit_length() < RSA_MIN_BITS:
                raise KeyRefused("invalid")
            public = rsa.RSAPublicNumbers(65537, int.from_bytes(n)).public_key()
            crv = None
        else:
            x = b64url_decode(jwk["x"])
            if len(x) != 32:
                raise KeyRefused("invalid")
            public = Ed25519PublicKey.from_public_bytes(x)
            crv = "Ed25519"
    except (ValueError, TypeError) as exc:
        if isinstance(exc, KeyRefused):
            raise
        raise KeyRefused("invalid") from None
    return ProofKey(thumbprint, public_verifier(public, kty, crv))


def thumbprint_of(canonical: str) -> str:
    """RFC 7638 section 3: base64url(SHA-256(canonical JSON))."""
    return b64url_encode(hashlib.sha256(canonical.encode("ascii")).digest())


class ProofKeys:
    """A bounded memo from a key's thumbprint input to the key, prepared once.

    Only keys some token was bound to get in (see :meth:`get`), so a flood of
    proofs with made-up keys costs a hash each and leaves the memo alone.

    :param size: the most keys kept; the oldest go first.
    """

    def __init__(self, size: int = 1024) -> None:
        self._size = size
        self._keys: dict[str, ProofKey] = {}
        self._lock = threading.Lock()

    def get(self, jwk: dict[str, Any], alg: str, jkt: object) -> ProofKey | None:
        """The prepared key of ``jwk`` for a proof signed with ``alg``, if its thumbprint is ``jkt``.

        :returns: ``None`` when the thumbprint is not ``jkt`` (compared in constant time); no key is imported then.
        :raises KeyRefused: the key is malformed, not for ``alg``, or not one we accept.
        """
        canonical = thumbprint_input(jwk, alg)
        key = self._keys.get(canonical)
        thumbprint = key.thumbprint if key is not None else thumbprint_of(canonical)
        # RFC 9449 section 6.1 / 7.1: the token is bound to this key; constant time, though both are public.
        if not (isinstance(jkt, str) and jkt.isascii() and hmac.compare_digest(jkt.encode(), thumbprint.encode())):
            return None
        if key is None:
            key = _prepare(jwk, thumbprint)
            with self._lock:
                if len(self._keys) >= self._size:
                    # Dicts keep insertion order: drop the oldest.
                    self._keys.pop(next(iter(self._keys)), None)
                self._keys[canonical] = key
        return key

    def __len__(self) -> int:
        return len(self._keys)

