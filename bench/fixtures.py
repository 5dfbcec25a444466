"""What every in-process part shares: a client certificate, an issuer, tokens and two bare apps.

The issuer is the unit tests' in-memory :class:`~tests.support.tokens.TestIssuer`,
served to the middleware by :class:`~tests.support.tokens.StaticDiscovery`, so
that no part of the in-process benchmark touches the network.
"""

from __future__ import annotations

import json
import secrets
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from certbound_wsgi.channel import UWSGI_SECRET_VAR
from certbound_wsgi.dev.pki import DevCA, Issued
from certbound_wsgi.settings import Settings
from certbound_wsgi.types import WSGIEnvironment
from tests.support.idp import x5t_s256
from tests.support.tokens import AUDIENCE, ISSUER, StaticDiscovery, TestIssuer

from .apps import hello_app

__all__ = ["AUDIENCE", "ISSUER", "Workspace", "environ_factory", "hello_app", "start_response"]


def _write(data: bytes) -> None:
    pass


def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
    """A server's start_response that does nothing."""
    return _write


class StatusRecorder:
    """A start_response that remembers the status, for checking a case before timing it."""

    def __init__(self) -> None:
        self.status = ""

    def __call__(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
        self.status = status
        return _write


# What gunicorn puts in every environ, minus the per-request values.
#: The proxy secret nginx adds to every request (issue 11); the middleware compares it per request.
BENCH_PROXY_SECRET = "bench-proxy-secret-0123456789abcdef-ABCDEF"

_TEMPLATE: dict[str, Any] = {
    UWSGI_SECRET_VAR: BENCH_PROXY_SECRET,
    "REQUEST_METHOD": "GET",
    "SCRIPT_NAME": "",
    "PATH_INFO": "/anything",
    "QUERY_STRING": "",
    "SERVER_NAME": "127.0.0.1",
    "SERVER_PORT": "8000",
    "SERVER_PROTOCOL": "HTTP/1.1",
    "REMOTE_ADDR": "127.0.0.1",
    "REMOTE_PORT": "40000",
    "HTTP_HOST": "127.0.0.1:8443",
    "HTTP_USER_AGENT": "certbound-bench",
    "HTTP_ACCEPT": "*/*",
    "HTTP_X_FORWARDED_PROTO": "https",
    "HTTP_X_FORWARDED_FOR": "127.0.0.1",
    "wsgi.version": (1, 0),
    "wsgi.url_scheme": "http",
    "wsgi.multithread": False,
    "wsgi.multiprocess": True,
    "wsgi.run_once": False,
}


def environ_factory(tokens: Sequence[str], cert_value: str | None) -> Callable[[int], WSGIEnvironment]:
    """Request ``i``'s environ, built like a server builds it: a copy of a template plus the
    request's header values, decoded from the bytes received (new ``str`` objects each time, so
    that no hash computed on an earlier request is reused).

    :param tokens: request ``i`` carries ``tokens[i % len(tokens)]``.
    :param cert_value: the URL-escaped PEM in ``SSL_CLIENT_CERT`` (the uWSGI variable), if any.
    """
    template = dict(_TEMPLATE)
    authorizations = [f"Bearer {token}".encode("latin-1") for token in tokens]
    count = len(authorizations)
    cert = cert_value.encode("latin-1") if cert_value else None

    def make(i: int) -> WSGIEnvironment:
        environ = template.copy()
        environ["HTTP_AUTHORIZATION"] = authorizations[i % count].decode("latin-1")
        if cert is not None:
            environ["SSL_CLIENT_CERT"] = cert.decode("latin-1")
        return environ

    return make


@dataclass
class Workspace:
    """A development CA with alice's certificate, and an in-memory issuer."""

    directory: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="certbound-bench-")))

    def __post_init__(self) -> None:
        self.ca = DevCA(self.directory / "pki")
        self.alice: Issued = self.ca.client("alice")
        self.thumbprint = x5t_s256(self.alice)
        #: nginx's $ssl_client_escaped_cert of alice's certificate.
        self.cert_value = quote(self.alice.cert_pem, safe="")
        self.issuer = TestIssuer()

    def settings(self, **options: Any) -> Settings:
        return Settings(issuer=ISSUER, audience=(AUDIENCE,), **{"proxy_secret": BENCH_PROXY_SECRET, **options})

    def discovery(self, settings: Settings) -> StaticDiscovery:
        return StaticDiscovery(settings, self.issuer)

    def tokens(self, count: int, *, bound: bool = True) -> list[str]:
        """``count`` distinct ES256 access tokens with every claim RFC 9068 section 2.2 requires
        (authlib insists on ``client_id``, ``jti`` and ``iat``), bound to alice unless ``bound`` is false."""
        cnf = {"x5t#S256": self.thumbprint} if bound else None
        exp = int(time.time()) + 3600
        return [
            self.issuer.token(cnf=cnf, client_id="bound", jti=secrets.token_urlsafe(12), exp=exp)
            for _ in range(count)
        ]

    def introspection_answer(self, **overrides: Any) -> str:
        """An RFC 7662 response for an active token bound to alice, as the JSON text an issuer sends."""
        answer: dict[str, Any] = {
            "active": True, "iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "client_id": "bound",
            "scope": "read write", "token_type": "Bearer", "iat": int(time.time()), "exp": int(time.time()) + 3600,
            "cnf": {"x5t#S256": self.thumbprint},
        }
        answer.update(overrides)
        return json.dumps(answer)


class FakeIntrospection:
    """Stands in for :class:`~certbound_wsgi.introspection.IntrospectionClient`: the answer is
    parsed from JSON text on every call, as a real response would be, and calls are counted."""

    def __init__(self, answer: str) -> None:
        self._answer = answer
        self.calls = 0

    def introspect(self, token: str) -> dict[str, Any]:
        self.calls += 1
        value: dict[str, Any] = json.loads(self._answer)
        return value


def opaque_tokens(count: int) -> list[str]:
    """Opaque access tokens shaped like oidc-provider's (43 base64url characters)."""
    return [secrets.token_urlsafe(32) for _ in range(count)]
