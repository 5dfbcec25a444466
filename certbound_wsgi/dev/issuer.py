"""A DEVELOPMENT-ONLY OAuth 2.0 issuer of certificate-bound access tokens.

**Never deploy this.** It authenticates any client that presents a certificate
the TLS server accepted, keeps its signing key in memory only, and has no
client registry, consent, revocation or rate limiting. It exists so that
``certbound-wsgi demo`` and the tests can show the middleware working without
a real authorization server or network access.

What it does implement, so that the middleware sees what a real issuer sends:

- ``/.well-known/openid-configuration`` (and the RFC 8414 alias
  ``/.well-known/oauth-authorization-server``) with the RFC 8705 section 3.3
  and section 5 metadata;
- ``/jwks``: one public ES256 key with a ``kid``;
- ``/token``: the ``client_credentials`` grant with ``self_signed_tls_client_auth``
  (RFC 8705 section 2.2), minting RFC 9068 JWT access tokens bound to the
  client certificate with ``cnf.x5t#S256`` (RFC 8705 section 3.1).

The client certificate is read from ``environ["SSL_CLIENT_CERT"]`` (PEM, possibly
URL-escaped as nginx's ``$ssl_client_escaped_cert``; empty or absent means none),
which :mod:`certbound_wsgi.dev.server` fills in from the TLS handshake.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from joserfc import jwt
from joserfc.jwk import ECKey
from werkzeug.wrappers import Request, Response

from ..types import StartResponse, WSGIEnvironment

__all__ = ["DevIssuer"]

_logger = logging.getLogger(__name__)

ALGORITHM = "ES256"
DEFAULT_LIFETIME = 300
DEFAULT_SCOPE = "demo"


class _ClientError(Exception):
    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status


def _json(body: dict[str, Any], status: int = 200, *, no_store: bool = False) -> Response:
    response = Response(json.dumps(body, indent=2) + "\n", status=status, mimetype="application/json")
    if no_store:
        # RFC 6749 section 5.1: token responses MUST carry Cache-Control: no-store.
        response.headers["Cache-Control"] = "no-store"
        response.headers["Pragma"] = "no-cache"
    return response


def _client_certificate(environ: WSGIEnvironment) -> x509.Certificate:
    pem = str(environ.get("SSL_CLIENT_CERT") or "").strip()
    if not pem:
        raise _ClientError("invalid_client", "a TLS client certificate is required (self_signed_tls_client_auth)")
    if "%" in pem:
        pem = unquote(pem)
    try:
        return x509.load_pem_x509_certificate(pem.encode("ascii"))
    except ValueError as exc:
        raise _ClientError("invalid_client", "the TLS client certificate could not be parsed") from exc


def _thumbprint(certificate: x509.Certificate) -> str:
    # RFC 8705 section 3.1: base64url-encoded SHA-256 of the DER certificate, no padding.
    digest = hashlib.sha256(certificate.public_bytes(Encoding.DER)).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _common_name(certificate: x509.Certificate) -> str:
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else ""
    name = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    if not name:
        raise _ClientError("invalid_client", "the TLS client certificate has no subject CN to use as client_id")
    return name


class DevIssuer:
    """DEVELOPMENT ONLY: a WSGI app issuing certificate-bound access tokens.

    :param issuer: the issuer identifier, exactly as tokens carry it in ``iss``
        and as resource servers are configured with it (``https://host:port``).
    :param audience: the ``aud`` of every token; a single value is emitted as a
        string, several as a list (RFC 7519 section 4.1.3).
    :param lifetime: seconds from ``iat`` to ``exp``.
    :param key: the ES256 signing key; a fresh P-256 key by default. Its ``kid``
        is the RFC 7638 thumbprint unless the key already has one.
    """

    def __init__(
        self,
        issuer: str,
        *,
        audience: str | Sequence[str],
        lifetime: int = DEFAULT_LIFETIME,
        key: ECKey | None = None,
    ) -> None:
        self.issuer = issuer.rstrip("/")
        self.audience: tuple[str, ...] = (audience,) if isinstance(audience, str) else tuple(audience)
        if not self.audience:
            raise ValueError("DevIssuer needs at least one audience")
        self.lifetime = lifetime
        if key is None:
            key = ECKey.generate_key("P-256", parameters={"alg": ALGORITHM, "use": "sig"}, auto_kid=True)
        key.ensure_kid()
        self.key = key
        self._routes = {
            "/.well-known/openid-configuration": self._metadata,
            "/.well-known/oauth-authorization-server": self._metadata,
            "/jwks": self._jwks,
            "/token": self._token,
        }
        _logger.warning(
            "DEVELOPMENT-ONLY OAuth issuer at %s: in-memory key, no client registry; never use it in production",
            self.issuer,
        )

    @property
    def kid(self) -> str:
        kid = self.key.kid
        if kid is None:  # ensure_kid() ran in __init__; this keeps mypy honest.
            raise RuntimeError("signing key has no kid")
        return kid

    def metadata(self) -> dict[str, Any]:
        """The authorization server metadata (RFC 8414; OpenID Connect Discovery)."""
        token_endpoint = f"{self.issuer}/token"
        return {
            "issuer": self.issuer,
            "jwks_uri": f"{self.issuer}/jwks",
            "token_endpoint": token_endpoint,
            # RFC 8705 section 5: where mTLS-authenticating clients send token
            # requests. This server asks every client for a certificate, so the
            # alias is the endpoint itself.
            "mtls_endpoint_aliases": {"token_endpoint": token_endpoint},
            # RFC 8705 section 3.3.
            "tls_client_certificate_bound_access_tokens": True,
            "id_token_signing_alg_values_supported": [ALGORITHM],
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": ["self_signed_tls_client_auth"],
            "scopes_supported": [DEFAULT_SCOPE],
            "response_types_supported": [],
        }

    def jwks(self) -> dict[str, Any]:
        """The public JWK Set: the signing key without its private part."""
        return {"keys": [self.key.as_dict(private=False)]}

    def issue(self, certificate: x509.Certificate, *, scope: str = DEFAULT_SCOPE, client_id: str | None = None) -> str:
        """Mint an RFC 9068 access token bound to ``certificate`` (RFC 8705 section 3.1)."""
        subject = _common_name(certificate)
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.audience[0] if len(self.audience) == 1 else list(self.audience),
            "client_id": client_id or subject,
            "scope": scope,
            "iat": now,
            "exp": now + self.lifetime,
            "jti": secrets.token_urlsafe(16),
            "cnf": {"x5t#S256": _thumbprint(certificate)},
        }
        # RFC 9068 section 2.1: typ "at+jwt" tells access tokens from ID tokens.
        header = {"alg": ALGORITHM, "typ": "at+jwt", "kid": self.kid}
        token = jwt.encode(header, claims, self.key, algorithms=[ALGORITHM])
        _logger.info(
            "development issuer: token for sub=%s bound to x5t#S256=%s (jti=%s)",
            subject,
            claims["cnf"]["x5t#S256"],
            claims["jti"],
        )
        return token

    def _metadata(self, request: Request) -> Response:
        return _json(self.metadata())

    def _jwks(self, request: Request) -> Response:
        return _json(self.jwks())

    def _token(self, request: Request) -> Response:
        if request.method != "POST":
            raise _ClientError("invalid_request", "the token endpoint accepts POST only", status=405)
        grant_type = request.form.get("grant_type")
        if grant_type != "client_credentials":
            raise _ClientError("unsupported_grant_type", "only grant_type=client_credentials is supported")
        certificate = _client_certificate(request.environ)
        subject = _common_name(certificate)
        # RFC 8705 section 2: the client_id parameter identifies the client; the
        # certificate authenticates it. Without a registry, the CN is the client.
        client_id = request.form.get("client_id") or subject
        if client_id != subject:
            raise _ClientError("invalid_client", "client_id does not match the TLS client certificate's CN")
        scope = request.form.get("scope") or DEFAULT_SCOPE
        token = self.issue(certificate, scope=scope, client_id=client_id)
        return _json(
            {"access_token": token, "token_type": "Bearer", "expires_in": self.lifetime, "scope": scope},
            no_store=True,
        )

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        request = Request(environ)
        route = self._routes.get(request.path)
        if route is None:
            response = _json({"error": "not_found", "error_description": f"no such endpoint: {request.path}"}, 404)
        else:
            try:
                response = route(request)
            except _ClientError as exc:
                response = _json({"error": exc.error, "error_description": exc.description}, exc.status, no_store=True)
                if exc.status == 405:
                    response.headers["Allow"] = "POST"
        return response(environ, start_response)
