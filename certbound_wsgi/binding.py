"""Proof of possession: what a token or session is bound to, and the rules for each mode.

RFC 8705 section 3 (``cnf.x5t#S256``, a certificate) and RFC 9449 section 6.1
(``cnf.jkt``, a DPoP key) side by side. Checked on every request, whether the
token's validation came from a memo or a cache or not: a stolen token must fail
with every certificate or key but its own.
"""

from __future__ import annotations

from .errors import DPoPError, InvalidToken
from .jose import equal_ascii
from .types import Claims

__all__ = [
    "CLAIM_MISSING", "CERT_MISSING", "THUMBPRINT_MISMATCH", "check_dpop_mode", "check_mtls", "cnf_jkt", "cnf_x5t",
]

# Kong's messages, so that operators moving from Kong recognise them.
CLAIM_MISSING = "x5t#S256 claim required but not found"
CERT_MISSING = "client certificate was not specified"
THUMBPRINT_MISMATCH = "the client certificate thumbprint does not match the x5t#S256 claim"


def cnf_x5t(claims: Claims) -> object | None:
    """The token's ``cnf.x5t#S256`` confirmation (RFC 8705 section 3.1), or ``None``; as the issuer sent it."""
    cnf = claims.get("cnf")
    return cnf.get("x5t#S256") if isinstance(cnf, dict) else None


def cnf_jkt(claims: Claims) -> object | None:
    """The token's ``cnf.jkt`` confirmation (RFC 9449 section 6.1), or ``None``; as the issuer sent it."""
    cnf = claims.get("cnf")
    return cnf.get("jkt") if isinstance(cnf, dict) else None


def check_mtls(mode: str, cnf_x5t: object | None, thumbprint: str | None) -> None:
    """Enforce ``proof_of_possession_mtls`` for one request (RFC 8705 section 3).

    :param mode: ``strict``, ``optional`` or ``off``.
    :param cnf_x5t: the confirmation the token (or session) is bound to, or ``None`` when unbound.
    :param thumbprint: the presented certificate's x5t#S256, or ``None``.
    :raises InvalidToken: the token is not bound to the presented certificate.
    """
    if mode == "off":
        return
    if cnf_x5t is None:
        if mode == "strict":
            raise InvalidToken(CLAIM_MISSING, reason="claim_missing")
        # optional: an unbound token passes; a bound one is always checked below.
        return
    if thumbprint is None:
        raise InvalidToken(CERT_MISSING, reason="cert_missing")
    if not equal_ascii(cnf_x5t, thumbprint):
        raise InvalidToken(THUMBPRINT_MISMATCH, reason="cert_mismatch")


def check_dpop_mode(mode: str, cnf_jkt: object | None, *, dpop_scheme: bool, what: str = "token") -> bool:
    """The ``proof_of_possession_dpop`` rules, for tokens and sessions alike (RFC 9449 section 7).

    :param mode: ``strict``, ``optional`` or ``off``.
    :param cnf_jkt: the key the token (or session) is bound to, or ``None``.
    :param dpop_scheme: whether the credential came with the DPoP scheme (a session: whether it is DPoP-bound).
    :param what: ``token`` or ``session``, for the messages.
    :returns: whether a DPoP proof must now be verified against ``cnf_jkt``.
    :raises AuthError: the rules refuse the request.
    """
    if dpop_scheme:
        if mode == "off":
            raise InvalidToken(f"the {what} is DPoP-bound but DPoP is off")
        if cnf_jkt is None:
            # Section 7.1: the DPoP scheme is for DPoP-bound tokens.
            raise InvalidToken(f"the {what} is not DPoP-bound")
        return True
    if cnf_jkt is not None:
        # Section 7.2: a DPoP-bound token must not be accepted as a bearer token.
        raise InvalidToken(f"a DPoP-bound {what} must be sent with the DPoP scheme")
    if mode == "strict":
        raise DPoPError(f"a DPoP-bound {what} and proof are required")
    return False
