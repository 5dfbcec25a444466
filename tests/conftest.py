"""Fixtures shared by the unit tests (tests/e2e/ has its own conftest).

A session-scoped development CA issues alice's and mallory's client
certificates; a :class:`TestIssuer` mints tokens; :func:`make_client` wraps an
app in :class:`CertBoundMiddleware` fed by :class:`StaticDiscovery`, so that no
test here touches the network.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from werkzeug.test import Client

from certbound_wsgi.channel import UWSGI_SECRET_VAR
from certbound_wsgi.dev.echo import echo_app
from certbound_wsgi.dev.pki import DevCA, Issued
from certbound_wsgi.middleware import CertBoundMiddleware
from certbound_wsgi.settings import Settings
from certbound_wsgi.types import StartResponse, WSGIApplication, WSGIEnvironment
from tests.support.redis_server import RedisServer
from tests.support.tokens import AUDIENCE, ISSUER, StaticDiscovery, TestIssuer


def independent_thumbprint(pem: str) -> str:
    """RFC 8705 section 3.1 computed without the code under test: cryptography's DER, hashlib's SHA-256."""
    der = x509.load_pem_x509_certificate(pem.encode("ascii")).public_bytes(Encoding.DER)
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).decode("ascii").rstrip("=")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def cert_env(pem: str | None) -> dict[str, str]:
    """The uWSGI variable nginx sets with ``uwsgi_param SSL_CLIENT_CERT $ssl_client_escaped_cert``."""
    return {} if pem is None else {"SSL_CLIENT_CERT": pem}


class CountingApp:
    """A WSGI app that records every environ it is called with, then answers like the echo app."""

    def __init__(self, inner: WSGIApplication = echo_app) -> None:
        self.inner = inner
        self.calls: list[WSGIEnvironment] = []

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        self.calls.append(environ)
        return self.inner(environ, start_response)


class MakeClient(Protocol):
    def __call__(
        self, app: WSGIApplication = ..., *, discovery: StaticDiscovery | None = ..., **overrides: Any
    ) -> Client: ...


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevCA:
    return DevCA(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def alice(pki: DevCA) -> Issued:
    return pki.client("alice")


@pytest.fixture(scope="session")
def mallory(pki: DevCA) -> Issued:
    return pki.client("mallory")


@pytest.fixture(scope="session")
def alice_x5t(alice: Issued) -> str:
    return independent_thumbprint(alice.cert_pem)


@pytest.fixture(scope="session")
def mallory_x5t(mallory: Issued) -> str:
    return independent_thumbprint(mallory.cert_pem)


@pytest.fixture()
def issuer() -> TestIssuer:
    return TestIssuer()


@pytest.fixture()
def alice_token(issuer: TestIssuer, alice_x5t: str) -> str:
    """A valid token bound to alice's certificate."""
    return issuer.token(cnf={"x5t#S256": alice_x5t})


def middleware_of(client: Client) -> CertBoundMiddleware:
    """The middleware behind a :func:`make_client` client, typed."""
    application = client.application
    if isinstance(application, ViaProxy):
        application = application.app
    assert isinstance(application, CertBoundMiddleware)
    return application


#: The channel every unit test states: the proxy secret, which :class:`ViaProxy` adds to each request
#: as nginx does for uWSGI. Tests of the channel itself (tests/test_channel.py) choose their own.
TEST_PROXY_SECRET = "unit-test-proxy-secret-0123456789abcdef"


def make_settings(**overrides: Any) -> Settings:
    return Settings(issuer=ISSUER, audience=(AUDIENCE,), **{"proxy_secret": TEST_PROXY_SECRET, **overrides})


class ViaProxy:
    """nginx in front of the app, as far as the channel goes: adds the proxy secret
    (``uwsgi_param CERTBOUND_PROXY_SECRET``) unless the request already carries one."""

    def __init__(self, app: WSGIApplication, secret: str = TEST_PROXY_SECRET) -> None:
        self.app = app
        self.secret = secret

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        environ.setdefault(UWSGI_SECRET_VAR, self.secret)
        return self.app(environ, start_response)


@pytest.fixture()
def make_client(issuer: TestIssuer) -> MakeClient:
    """``make_client(app=echo_app, discovery=None, **settings_overrides)`` -> a Client of the protected app.

    ``client.application`` is :class:`ViaProxy` (the proxy secret) around the :class:`CertBoundMiddleware`
    (:func:`middleware_of`); its ``discovery`` is a :class:`StaticDiscovery` over the ``issuer`` fixture
    unless one is given.
    """

    def make(app: WSGIApplication = echo_app, *, discovery: StaticDiscovery | None = None, **overrides: Any) -> Client:
        settings = make_settings(**overrides)
        middleware = CertBoundMiddleware(app, settings, discovery=discovery or StaticDiscovery(settings, issuer))
        # use_cookies=False: a Cookie header is sent as written, not replaced by the client's cookie jar.
        return Client(ViaProxy(middleware), use_cookies=False)  # type: ignore[arg-type]  # wsgiref vs werkzeug WSGI types

    return make


TokenFactory = Callable[[TestIssuer], str]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server for the module (skips locally, fails in CI, when it is not installed)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()
