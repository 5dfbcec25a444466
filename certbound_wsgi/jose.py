"""JOSE, once: base64url, strict JSON, JWK import, algorithms and the registered claims.

Access tokens (RFC 9068), DPoP proofs (RFC 9449), ID tokens and introspection
answers (RFC 7662) all decode and check the same things; each of those modules
maps the failures below to its own error and wording.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hmac
import json
import math
import re
from collections.abc import Collection, Mapping
from typing import Any

from joserfc.errors import JoseError
from joserfc.jwk import ECKey, OKPKey, RSAKey
from joserfc.jws import JWSRegistry

from .types import Claims

__all__ = [
    "KEY_TYPES", "MAX_DEPTH", "PRIVATE_MEMBERS", "AsymmetricKey", "JSONError", "JWKError", "PublicKey",
    "TimeClaimError", "audiences", "b64url_decode", "b64url_encode", "check_time_claims", "copy_claims", "copy_json",
    "equal_ascii", "expiry", "issued_by", "json_object", "jws_registry", "meant_for", "number", "public_key",
    "segment_object", "too_deep",
]

#: The deepest nesting accepted in claims. json.loads takes ~1,000 levels; anything walking the
#: claims recursively (the copy handed to the app, the app itself) would not.
MAX_DEPTH = 32

#: The largest protected JWS header accepted, in bytes (a 4096-bit RSA JWK fits easily).
MAX_HEADER_LENGTH = 4096

AsymmetricKey = ECKey | RSAKey | OKPKey
#: What :func:`public_key` returns: an asymmetric key without its private part.
PublicKey = AsymmetricKey
#: The asymmetric key types (RFC 7518 section 6.1, RFC 8037 section 2); ``oct`` is never imported.
KEY_TYPES: dict[str, type[ECKey] | type[RSAKey] | type[OKPKey]] = {"EC": ECKey, "RSA": RSAKey, "OKP": OKPKey}
#: The members that make a JWK private (RFC 7518 sections 6.2.2, 6.3.2, 6.4.1; RFC 8037 section 2).
PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})

# RFC 7515 section 2: base64url without padding; anything else (padding, "+", "/", spaces) is refused.
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


# -- encodings ------------------------------------------------------------------------


def b64url_encode(data: bytes) -> str:
    """Unpadded base64url (RFC 7515 section 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Strict unpadded base64url (RFC 7515 section 2).

    :raises ValueError: ``text`` has characters outside the alphabet, padding, or an impossible length.
    """
    if len(text) % 4 == 1 or not _B64URL.fullmatch(text):
        raise ValueError("not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error:  # pragma: no cover - the pattern and length rule this out
        raise ValueError("not base64url") from None


class JSONError(ValueError):
    """Data that is not a strict JSON object.

    :param problem: ``syntax`` (not JSON, or NaN/Infinity), ``type`` (JSON, not an object)
        or ``depth`` (nested deeper than :data:`MAX_DEPTH`).
    """

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem

    @property
    def phrase(self) -> str:
        """``not JSON``, ``not a JSON object`` or ``nested too deeply``."""
        return _JSON_PHRASES[self.problem]

    def describe(self, subject: str, verb: str = "is") -> str:
        """A sentence for an error description: ``the token's claims`` ``are`` ``not JSON``."""
        return f"{subject} {verb} {self.phrase}"


_JSON_PHRASES = {"syntax": "not JSON", "type": "not a JSON object", "depth": "nested too deeply"}


def _refuse_constant(name: str) -> None:
    # RFC 8259 section 6: NaN and Infinity are not JSON numbers, whatever json.loads accepts.
    raise ValueError(f"{name} is not JSON")


# One decoder: json.loads with any keyword builds a new JSONDecoder per call, which costs more than the parse.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


def json_object(data: bytes | str) -> dict[str, Any]:
    """``data`` as a JSON object, strictly: UTF-8, no NaN or Infinity, at most :data:`MAX_DEPTH` deep.

    :raises JSONError: it is not one.
    """
    try:
        # RFC 8259 section 8.1: JSON exchanged between systems is UTF-8 (json.loads would guess UTF-16 too).
        value = _DECODER.decode(data.decode("utf-8") if isinstance(data, bytes) else data)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise JSONError("syntax") from None
    if not isinstance(value, dict):
        raise JSONError("type")
    if too_deep(value):
        raise JSONError("depth")
    return value


def segment_object(segment: str) -> dict[str, Any]:
    """A compact JWS segment (RFC 7515 section 7.1) as a JSON object.

    :raises JSONError: ``syntax`` also when it is not base64url.
    """
    try:
        raw = b64url_decode(segment)
    except ValueError:
        raise JSONError("syntax") from None
    return json_object(raw)


def too_deep(value: object, limit: int = MAX_DEPTH) -> bool:
    """Whether JSON data nests deeper than ``limit``; iterative, so any depth is safe to ask about."""
    if not isinstance(value, (dict, list)):
        return False
    if limit <= 0:
        return True
    # Only containers are pushed: a flat claims object is one pass over its values.
    stack: list[tuple[dict[str, Any] | list[Any], int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, (dict, list)):
                if depth >= limit:
                    return True
                stack.append((child, depth + 1))
    return False


# -- keys and algorithms ----------------------------------------------------------------


class JWKError(ValueError):
    """A JWK that is not a usable public key.

    :param problem: ``private`` (it has private members), ``kty`` (not an asymmetric key type)
        or ``invalid`` (joserfc cannot import it).
    """

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


def public_key(jwk: Mapping[str, Any]) -> PublicKey:
    """A public JWK as a verification key (RFC 7517 section 4).

    Symmetric (``oct``) keys are never imported: an HMAC key made from public
    material is the classic algorithm-confusion attack (RFC 8725 section 2.1).

    :raises JWKError: it is private, symmetric or malformed.
    """
    if PRIVATE_MEMBERS & jwk.keys():
        raise JWKError("private")
    key_type = KEY_TYPES.get(str(jwk.get("kty")))
    if key_type is None:
        raise JWKError("kty")
    try:
        return key_type.import_key(dict(jwk))
    except (JoseError, ValueError, TypeError, KeyError):
        raise JWKError("invalid") from None


@functools.lru_cache(maxsize=32)
def jws_registry(alg: str) -> JWSRegistry:
    """A joserfc registry allowing only ``alg``, with room for large headers.

    joserfc's default caps a protected header at 512 bytes; a DPoP proof carries its
    public key in the header, and a 2048-bit RSA JWK alone is larger than that.
    """
    registry = JWSRegistry(algorithms=[alg])
    registry.max_header_length = MAX_HEADER_LENGTH
    return registry


# -- claims ------------------------------------------------------------------------------


def number(value: object) -> float | None:
    """``value`` as a finite float, or ``None`` when it is not a JSON number (bools, strings, NaN, 10**400)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        result = float(value)
    except OverflowError:
        return None
    return result if math.isfinite(result) else None


def expiry(claims: Claims) -> float | None:
    """The ``exp`` claim as a number, or ``None`` when it is absent or not a finite number."""
    return number(claims.get("exp"))


class TimeClaimError(ValueError):
    """A time claim that refuses the token.

    :param claim: ``exp``, ``nbf`` or ``iat``.
    :param problem: ``missing``, ``number`` (not a NumericDate) or ``time`` (outside its window).
    """

    def __init__(self, claim: str, problem: str) -> None:
        super().__init__(f"{claim}: {problem}")
        self.claim = claim
        self.problem = problem

    @property
    def reason(self) -> str:
        """The audit reason code: ``token_expired``, ``token_not_yet_valid``, or ``token_invalid`` for a bad claim."""
        if self.problem != "time":
            return "token_invalid"
        return "token_expired" if self.claim == "exp" else "token_not_yet_valid"

    def describe(self, subject: str) -> str:
        """A sentence for an error description: ``subject`` is e.g. ``the token`` or ``the ID token``."""
        if self.problem == "missing":
            return f"{subject} has no {self.claim} claim"
        if self.problem == "number":
            return f"the {self.claim} claim is not a number"
        return {"exp": f"{subject} has expired", "nbf": f"{subject} is not valid yet",
                "iat": f"{subject} was issued in the future"}[self.claim]


_TIME_CLAIMS = ("exp", "nbf", "iat")


def check_time_claims(claims: Claims, now: float, leeway: float, *, required: Collection[str] = ("exp",),
                      checked: Collection[str] = _TIME_CLAIMS) -> None:
    """RFC 7519 sections 4.1.4 (``exp``), 4.1.5 (``nbf``) and 4.1.6 (``iat``, not in the future), with ``leeway``.

    :param required: the claims that must be present.
    :param checked: the claims looked at; the others are ignored, whatever they hold.
    :raises TimeClaimError: the first claim that refuses the token.
    """
    for name in _TIME_CLAIMS:
        if name not in checked:
            continue
        raw = claims.get(name)
        if raw is None:
            if name in required:
                raise TimeClaimError(name, "missing")
            continue
        value = number(raw)
        if value is None:
            raise TimeClaimError(name, "number")
        # exp: "on or after" is expired; nbf: "before" is too early; iat: after now is a forgery or a skew.
        if (now >= value + leeway) if name == "exp" else (now < value - leeway):
            raise TimeClaimError(name, "time")


def issued_by(claims: Claims, issuer: str) -> bool:
    """RFC 7519 section 4.1.1: ``iss`` is exactly the configured issuer (no normalization)."""
    return claims.get("iss") == issuer


def audiences(claims: Claims) -> list[str]:
    """The ``aud`` claim as a list of strings: it may be one string or an array (RFC 7519 section 4.1.3)."""
    aud = claims.get("aud")
    values = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    return [a for a in values if isinstance(a, str)]


def meant_for(claims: Claims, audience: frozenset[str]) -> bool:
    """RFC 7519 section 4.1.3: one of the token's audiences is one of ours."""
    return not audience.isdisjoint(audiences(claims))


def equal_ascii(claimed: object, expected: str) -> bool:
    """Constant-time equality of a claimed value with an ASCII ``expected`` (a thumbprint, a hash).

    Anything that is not an ASCII string (a number, a list, a lone surrogate) is simply unequal.
    """
    return (
        isinstance(claimed, str) and claimed.isascii() and hmac.compare_digest(claimed.encode(), expected.encode())
    )


def copy_claims(claims: Claims) -> Claims:
    """A deep copy of a claims object: a C-speed shallow copy, then only the nested values copied."""
    out = dict(claims)
    for name, value in out.items():
        if type(value) is dict or type(value) is list:
            out[name] = copy_json(value)
    return out


def copy_json(value: Any) -> Any:
    """A deep copy of JSON data (dicts, lists, scalars), several times faster than :func:`copy.deepcopy`."""
    if isinstance(value, dict):
        return {k: copy_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [copy_json(v) for v in value]
    return value
