"""An in-memory issuer for unit tests: signing keys, JWKS and minted tokens.

Unit tests feed :class:`StaticDiscovery` documents instead of HTTP; the real
fetching is exercised by the end-to-end tests against oidc-provider.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from joserfc import jwt
from joserfc.jwk import ECKey, OctKey, RSAKey

from certbound_wsgi.discovery import Discovery, DiscoveryError
from certbound_wsgi.settings import Settings

ISSUER = "https://issuer.test"
AUDIENCE = "https://api.test"


class TestIssuer:
    __test__ = False

    def __init__(self, kid: str = "k1") -> None:
        self.key = ECKey.generate_key("P-256", parameters={"kid": kid, "use": "sig", "alg": "ES256"}, private=True)
        self.kid = kid
        self.metadata: dict[str, Any] = {
            "issuer": ISSUER,
            "jwks_uri": ISSUER + "/jwks",
            "id_token_signing_alg_values_supported": ["ES256", "RS256"],
        }
        self.down = False

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.key.as_dict(private=False)]}

    def rotate(self, kid: str) -> None:
        self.__init__(kid)  # type: ignore[misc]

    def token(self, *, header: dict[str, Any] | None = None, key: Any = None, **overrides: Any) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 300,
                                  "scope": "read write"}
        claims.update(overrides)
        claims = {k: v for k, v in claims.items() if v is not None}
        hdr = {"alg": "ES256", "typ": "at+jwt", "kid": self.kid}
        hdr.update(header or {})
        return jwt.encode(hdr, claims, key or self.key, algorithms=[hdr["alg"]])


class StaticDiscovery(Discovery):
    """Discovery whose documents come from a :class:`TestIssuer` instead of HTTP."""

    def __init__(self, settings: Settings, issuer: TestIssuer, **kwargs: Any) -> None:
        # Inline refreshes unless a test asks for the background ones: assertions follow at once.
        kwargs.setdefault("background", False)
        super().__init__(settings, **kwargs)
        self.issuer = issuer
        self.fetches = 0

    def _get_json(self, url: str) -> dict[str, Any]:
        if self.issuer.down:
            raise DiscoveryError(f"{url}: ConnectionError")
        if url.endswith("/jwks"):
            self.fetches += 1
            return self.issuer.jwks()
        if url.endswith("/.well-known/openid-configuration"):
            return self.issuer.metadata
        raise DiscoveryError(f"{url} answered 404")


def other_keys() -> dict[str, Any]:
    return {
        "ec": ECKey.generate_key("P-256", parameters={"kid": "k1"}, private=True),
        "rsa": RSAKey.generate_key(2048, parameters={"kid": "k1"}, private=True),
        "oct": OctKey.generate_key(256, parameters={"kid": "k1"}),
    }


def b64url(data: bytes | str | dict[str, Any] | list[Any]) -> str:
    """base64url without padding; a dict or list is JSON-encoded first (non-ASCII as \\u escapes)."""
    if isinstance(data, (dict, list)):
        data = json.dumps(data)
    if isinstance(data, str):
        data = data.encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign_es256(key: ECKey, header: Any, payload: Any) -> str:
    """A compact JWS signed by hand, for headers and payloads that joserfc refuses to write.

    :param header: a dict or list (JSON-encoded here), or the exact text or bytes of the protected header.
    :param payload: a dict or list (JSON-encoded here), or the exact text or bytes of the payload.
    """
    signing_input = f"{b64url(header)}.{b64url(payload)}"
    private = key.private_key
    if not isinstance(private, ec.EllipticCurvePrivateKey):
        raise TypeError("sign_es256 needs a private P-256 key")
    r, s = decode_dss_signature(private.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    return signing_input + "." + b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
