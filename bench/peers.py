"""The peer: authlib's RFC 9068 resource protection, as a plain WSGI middleware.

authlib ships a ``ResourceProtector`` for Flask, Django and Starlette but none
for plain WSGI, so this is the few lines its Flask integration runs per request
(``acquire_token``): wrap the request, ``validate_request``, answer the
error or call the app. authlib cannot bind a token to a certificate (RFC 8705),
so it validates the same ES256 token without the binding.

It is given the issuer's keys as an already imported ``KeySet`` (its
``get_jwks`` hook would usually fetch and cache them): the cheapest setup
authlib allows, so that the comparison flatters the peer, not us.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from authlib.oauth2 import OAuth2Error, ResourceProtector
from authlib.oauth2.rfc6749.requests import JsonRequest
from authlib.oauth2.rfc9068 import JWTBearerTokenValidator
from joserfc.jwk import KeySet
from werkzeug.datastructures import EnvironHeaders

from certbound_wsgi.types import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["AuthlibMiddleware", "authlib_protector"]


class _Validator(JWTBearerTokenValidator):  # type: ignore[misc]
    def __init__(self, issuer: str, resource_server: str, jwks: KeySet) -> None:
        super().__init__(issuer, resource_server, realm="api")
        self._jwks = jwks

    def get_jwks(self) -> KeySet:
        return self._jwks


def authlib_protector(issuer: str, audience: str, jwks: dict[str, object]) -> ResourceProtector:
    """A ``ResourceProtector`` with authlib's RFC 9068 validator for ``issuer`` and ``audience``."""
    protector = ResourceProtector()
    protector.register_token_validator(_Validator(issuer, audience, KeySet.import_key_set(jwks)))
    return protector


class AuthlibMiddleware:
    """Accept a request only with a valid JWT access token, the authlib way."""

    def __init__(self, app: WSGIApplication, protector: ResourceProtector) -> None:
        self.app = app
        self.protector = protector

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        request = JsonRequest(environ["REQUEST_METHOD"], environ.get("PATH_INFO", "/"), EnvironHeaders(environ))
        try:
            token = self.protector.validate_request(scopes=None, request=request)
        except OAuth2Error as error:
            body = json.dumps(dict(error.get_body())).encode()
            start_response(f"{error.status_code} Unauthorized",
                           [*error.get_headers(), ("Content-Type", "application/json")])
            return [body]
        environ["authlib.claims"] = dict(token)
        return self.app(environ, start_response)
