"""A built-in app that answers with what it was sent, like httpbin's ``/anything``.

It serves ``certbound_wsgi.wsgi:application`` when ``CERTBOUND_APP`` is unset,
so that a deployment can be tried before the real app is wired in.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from ..types import StartResponse, WSGIEnvironment

__all__ = ["echo_app"]

# Never echoed back: credentials and the certificate itself.
_HIDDEN = frozenset({"HTTP_AUTHORIZATION", "HTTP_COOKIE", "HTTP_DPOP", "HTTP_X_SSL_CLIENT_CERT"})


def echo_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """Answer 200 with JSON describing the request and the validated token."""
    headers = {
        key[5:].replace("_", "-").title(): value
        for key, value in environ.items()
        if key.startswith("HTTP_") and key not in _HIDDEN
    }
    body = json.dumps(
        {
            "method": environ.get("REQUEST_METHOD"),
            "path": environ.get("PATH_INFO", ""),
            "query": environ.get("QUERY_STRING", ""),
            "headers": headers,
            "remote_user": environ.get("REMOTE_USER"),
            "auth_method": environ.get("certbound.method"),
            "thumbprint": environ.get("certbound.thumbprint"),
            "claims": environ.get("certbound.claims"),
        },
        indent=2,
        sort_keys=True,
        default=str,
    ).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
