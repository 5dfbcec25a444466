"""An in-memory issuer for unit tests: signing keys, JWKS and minted tokens.

Unit tests feed :class:`StaticDiscovery` documents instead of HTTP; the real
fetching is exercised by the end-to-end tests against oidc-provider.
"""

from __future__ import annotations

import time
from typing import Any

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
