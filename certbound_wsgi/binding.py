"""Proof of possession: certificate-bound access tokens (RFC 8705 section 3).

Checked on every request, whether the token's validation came from a memo or a
cache or not: a stolen token must fail with every certificate but its own.
"""

from __future__ import annotations

from .errors import InvalidToken
from .jose import equal_ascii
from .types import Claims

__all__ = ["CLAIM_MISSING", "CERT_MISSING", "THUMBPRINT_MISMATCH", "check_mtls", "x5t_s256"]

# Kong's messages, so that operators moving from Kong recognise them.
CLAIM_MISSING = "x5t#S256 claim required but not found"
CERT_MISSING = "client certificate was not specified"
THUMBPRINT_MISMATCH = "the client certificate thumbprint does not match the x5t#S256 claim"


def x5t_s256(claims: Claims) -> object | None:
    """The token's ``cnf.x5t#S256`` confirmation (RFC 8705 section 3.1), or ``None``."""
    cnf = claims.get("cnf")
    if not isinstance(cnf, dict):
        return None
    return cnf.get("x5t#S256")


def check_mtls(mode: str, claims: Claims, thumbprint: str | None) -> None:
    """Enforce ``proof_of_possession_mtls`` for one request.

    :param mode: ``strict``, ``optional`` or ``off``.
    :param claims: the validated token's claims.
    :param thumbprint: the presented certificate's x5t#S256, or ``None``.
    :raises InvalidToken: the token is not bound to the presented certificate.
    """
    if mode == "off":
        return
    bound = x5t_s256(claims)
    if bound is None:
        if mode == "strict":
            raise InvalidToken(CLAIM_MISSING)
        # optional: an unbound token passes; a bound one is always checked below.
        return
    if thumbprint is None:
        raise InvalidToken(CERT_MISSING)
    if not equal_ascii(bound, thumbprint):
        raise InvalidToken(THUMBPRINT_MISMATCH)
