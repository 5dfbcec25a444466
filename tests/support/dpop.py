"""A DPoP client for tests: proofs built with joserfc (RFC 9449 section 4.2)."""

from __future__ import annotations

import base64
import hashlib
import time
import uuid
from typing import Any

from joserfc import jws
from joserfc.jwk import ECKey, RSAKey


def ath(token: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(token.encode()).digest()).rstrip(b"=").decode()


class DPoPKey:
    """A client's DPoP key pair."""

    def __init__(self, kty: str = "EC") -> None:
        self.key: ECKey | RSAKey = (
            ECKey.generate_key("P-256", private=True) if kty == "EC" else RSAKey.generate_key(2048, private=True)
        )
        self.alg = "ES256" if kty == "EC" else "PS256"

    @property
    def jkt(self) -> str:
        return self.key.thumbprint()

    def proof(self, htm: str, htu: str, token: str | None = None, *, nonce: str | None = None,
              iat: float | None = None, jti: str | None = None, header: dict[str, Any] | None = None,
              claims: dict[str, Any] | None = None, private_jwk: bool = False, key: Any = None) -> str:
        """A signed proof; ``header``/``claims`` override (a value of None removes the member)."""
        body: dict[str, Any] = {"jti": jti or uuid.uuid4().hex, "htm": htm, "htu": htu,
                                "iat": int(time.time() if iat is None else iat)}
        if token is not None:
            body["ath"] = ath(token)
        if nonce is not None:
            body["nonce"] = nonce
        body.update(claims or {})
        hdr: dict[str, Any] = {"typ": "dpop+jwt", "alg": self.alg, "jwk": self.key.as_dict(private=private_jwk)}
        hdr.update(header or {})
        hdr = {k: v for k, v in hdr.items() if v is not None}
        body = {k: v for k, v in body.items() if v is not None}
        import json

        payload = json.dumps(body).encode()
        return jws.serialize_compact(hdr, payload, key or self.key, algorithms=[hdr["alg"]])
