"""This resource server's own keys for ``private_key_jwt``: the assertions it signs, and the JWKS it publishes.

RFC 7523 section 2.2 and OpenID Connect Core section 9: the client authenticates
with a JWT signed by its private key; the issuer verifies it with the client's
public keys, registered inline or, as here, downloaded from the client's
``jwks_uri`` (OpenID Connect Dynamic Client Registration section 2). Publishing
them lets the key be rotated without a manual step at the issuer:

1. ``client_jwk_next`` is published beside ``client_jwk`` but signs nothing;
2. once the issuer has fetched the JWKS again (its cache, and our ``max-age``),
   the next key becomes ``client_jwk``: every assertion it signs carries its
   ``kid``, which the issuer already holds.

The JWKS holds public members only (RFC 7517 section 4 and RFC 7518 section 6):
the private key never leaves the file it was read from.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from joserfc import jwt
from joserfc.errors import JoseError

from .errors import ConfigurationError
from .jose import KEY_TYPES, PRIVATE_MEMBERS, AsymmetricKey
from .settings import Settings
from .types import StartResponse, WSGIEnvironment

__all__ = ["ClientKeys", "JWKS_MAX_AGE", "load_private_key"]

PrivateKey = AsymmetricKey
#: Seconds an issuer (or a cache between) may keep our JWKS: a next key must be published at least
#: this long (and as long as the issuer's own minimum, 60 s for oidc-provider) before it signs.
JWKS_MAX_AGE = 300
#: Seconds a client assertion is valid: long enough for one request, short for a replay.
ASSERTION_LIFETIME = 60


def load_private_key(path: str, option: str = "client_jwk") -> PrivateKey:
    """The private key in ``path`` (a JWK in JSON, or PEM).

    :raises ConfigurationError: naming ``option``, when it holds no usable private key.
    """
    with open(path, "rb") as fh:
        data = fh.read()
    for key_type in KEY_TYPES.values():
        try:
            key = key_type.import_key(json.loads(data) if data.lstrip().startswith(b"{") else data)
        except (JoseError, ValueError, TypeError, KeyError):
            key = None
        if key is not None and key.is_private:
            return key
    raise ConfigurationError(option, f"{path!r} holds no usable private key")


class ClientKeys:
    """Signs client assertions with ``client_jwk``; serves the public JWKS of it and ``client_jwk_next``.

    :param client_id: ``iss`` and ``sub`` of every assertion.
    :param current: the private key that signs (``client_jwk``).
    :param alg: the signing algorithm (``client_alg``).
    :param upcoming: the private key published before it signs (``client_jwk_next``), if any.
    """

    def __init__(self, client_id: str, current: PrivateKey, alg: str, upcoming: PrivateKey | None = None) -> None:
        self._client_id = client_id
        self._key = current
        self._alg = alg
        self.kid = _kid(current)
        try:  # at start-up, not on every request: the key must be able to sign with alg
            jwt.encode({"alg": alg}, {"probe": True}, current, algorithms=[alg])
        except (JoseError, ValueError, TypeError) as exc:
            raise ConfigurationError("client_alg", f"{alg} cannot sign with the client_jwk key ({type(exc).__name__})"
                                     ) from None
        published = [_public(current, alg)]
        if upcoming is not None and _kid(upcoming) != self.kid:
            published.append(_public(upcoming, alg))
        self.jwks: dict[str, Any] = {"keys": published}
        self._body = json.dumps(self.jwks, separators=(",", ":")).encode()

    @classmethod
    def from_files(cls, client_id: str, client_jwk: str, alg: str, client_jwk_next: str = "") -> ClientKeys:
        upcoming = load_private_key(client_jwk_next, "client_jwk_next") if client_jwk_next else None
        return cls(client_id, load_private_key(client_jwk), alg, upcoming)

    @classmethod
    def from_settings(cls, settings: Settings) -> ClientKeys:
        """From ``client_id``, ``client_jwk``, ``client_alg`` and ``client_jwk_next``."""
        return cls.from_files(settings.client_id, settings.client_jwk, settings.client_alg, settings.client_jwk_next)

    def assertion(self, audience: str) -> str:
        """A client assertion for ``audience`` (the endpoint it is sent to), RFC 7523 section 3."""
        now = int(time.time())
        claims = {"iss": self._client_id, "sub": self._client_id, "aud": audience, "jti": uuid.uuid4().hex,
                  "iat": now, "exp": now + ASSERTION_LIFETIME}
        # The kid tells the issuer which published key to use; one it has not seen makes it refetch the JWKS.
        return jwt.encode({"alg": self._alg, "kid": self.kid}, claims, self._key, algorithms=[self._alg])

    def form(self, audience: str) -> dict[str, str]:
        """The form parameters that authenticate this client (RFC 7523 section 2.2)."""
        return {
            "client_id": self._client_id,
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": self.assertion(audience),
        }

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        """The JWKS as a WSGI app: public, unauthenticated and cacheable."""
        method = environ.get("REQUEST_METHOD")
        if method not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD"), ("Content-Type", "application/json"),
                                                      ("Content-Length", "2")])
            return [b"{}"]
        start_response("200 OK", [
            ("Content-Type", "application/jwk-set+json"),  # RFC 7517 section 8.5.1
            ("Cache-Control", f"public, max-age={JWKS_MAX_AGE}"),
            ("Content-Length", str(len(self._body))),
        ])
        return [b"" if method == "HEAD" else self._body]


def _kid(key: PrivateKey) -> str:
    """The key's own ``kid``, else its RFC 7638 thumbprint."""
    kid = key.as_dict(private=False).get("kid")
    return kid if isinstance(kid, str) and kid else key.thumbprint()


def _public(key: PrivateKey, alg: str) -> dict[str, Any]:
    # as_dict(private=False) already leaves them out; PRIVATE_MEMBERS makes sure of it.
    public = {name: value for name, value in key.as_dict(private=False).items() if name not in PRIVATE_MEMBERS}
    public.update(kid=_kid(key), use="sig", alg=alg)
    return public
