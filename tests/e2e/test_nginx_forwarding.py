"""The shipped nginx configurations, end to end: real nginx, real gunicorn and uWSGI.

The application is :mod:`tests.support.environ_app`, which answers with its
environ, so these tests see exactly what the application server hands to a
WSGI application, independent of the middleware. What they establish is the
contract the middleware relies on: the certificate variable carries the
certificate of the TLS handshake and nothing a client can write.
"""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import pytest
import requests

from certbound_wsgi.dev.pki import DevCA, Issued, self_signed_client
from certbound_wsgi.nginx_config import Upstream
from tests.support.procs import require_binary
from tests.support.servers import (
    PROXY_SECRET,
    SERVER_NAME,
    UWSGI,
    Gunicorn,
    Nginx,
    start_gunicorn,
    start_nginx,
    start_uwsgi,
)

ENVIRON_APP = "tests.support.environ_app:application"


@dataclass(frozen=True)
class PKI:
    ca: DevCA
    server: Issued
    alice: Issued
    # Issued by the same CA: a certificate a forger might paste into a header.
    bob: Issued
    # RFC 8705 section 2.2: self-signed, accepted by optional_no_ca.
    mallory: Issued


@dataclass(frozen=True)
class Stack:
    upstream: Upstream
    nginx: Nginx
    cert_var: str
    verify_var: str
    secret_var: str


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    directory = tmp_path_factory.mktemp("pki")
    ca = DevCA(directory)
    return PKI(ca, ca.server(), ca.client("alice"), ca.client("bob"), self_signed_client(directory, "mallory"))


@pytest.fixture(scope="module", params=[pytest.param("gunicorn", id="gunicorn"), pytest.param("uwsgi", id="uwsgi")])
def stack(request: pytest.FixtureRequest, pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    upstream: Upstream = request.param
    require_binary("nginx", "/usr/sbin/nginx")
    logs = tmp_path_factory.mktemp(f"{upstream}-logs")
    app: Gunicorn | UWSGI
    if upstream == "gunicorn":
        app = start_gunicorn({}, module=ENVIRON_APP, log_dir=logs)
        cert_var, verify_var = "HTTP_X_SSL_CLIENT_CERT", "HTTP_X_SSL_CLIENT_VERIFY"
        secret_var = "HTTP_X_CERTBOUND_PROXY_SECRET"
    else:
        app = start_uwsgi({}, module=ENVIRON_APP, log_dir=logs)
        cert_var, verify_var = "SSL_CLIENT_CERT", "SSL_CLIENT_VERIFY"
        secret_var = "CERTBOUND_PROXY_SECRET"
    try:
        nginx = start_nginx(tmp_path_factory.mktemp(f"{upstream}-nginx"), upstream, app.backend, pki.server,
                            proxy_secret=PROXY_SECRET)
        try:
            yield Stack(upstream, nginx, cert_var, verify_var, secret_var)
        finally:
            nginx.stop()
    finally:
        app.stop()


def _session() -> requests.Session:
    session = requests.Session()
    # The machine's REQUESTS_CA_BUNDLE and proxy variables must not apply; verify= is always given.
    session.trust_env = False
    return session


def echo(nginx: Nginx, pki: PKI, *, cert: Issued | None, headers: dict[str, str] | None = None,
         path: str = "/echo?x=1") -> dict[str, str]:
    """GET ``path`` through nginx over HTTPS and return the application's environ."""
    with _session() as session:
        response = session.get(nginx.url + path, headers=headers or {}, cert=cert.pair if cert else None,
                               verify=str(pki.ca.cert_path), timeout=10)
    assert response.status_code == 200, (response.status_code, response.text, nginx.output())
    environ: dict[str, str] = response.json()
    return environ


@pytest.mark.parametrize("client", [pytest.param("alice", id="ca-issued"), pytest.param("mallory", id="self-signed")])
def test_client_certificate_reaches_app_url_escaped(stack: Stack, pki: PKI, client: str) -> None:
    issued: Issued = getattr(pki, client)
    value = echo(stack.nginx, pki, cert=issued)[stack.cert_var]
    # $ssl_client_escaped_cert: the PEM percent-encoded, newlines as %0A, so it fits one header line.
    assert value.startswith("-----BEGIN%20CERTIFICATE-----%0A")
    assert "\n" not in value and " " not in value
    assert unquote(value) == issued.cert_pem


@pytest.mark.parametrize(
    ("client", "expected"),
    [
        pytest.param("alice", "FAILED:", id="ca-issued"),
        pytest.param("mallory", "FAILED:", id="self-signed"),
        pytest.param(None, "NONE", id="no-certificate"),
    ],
)
def test_verify_status_under_optional_no_ca(stack: Stack, pki: PKI, client: str | None, expected: str) -> None:
    # Without a CA nothing is verified, so a presented certificate reads FAILED:<reason>:
    # the binding is the proof, not this variable (RFC 8705 section 2.2).
    environ = echo(stack.nginx, pki, cert=getattr(pki, client) if client else None)
    assert environ[stack.verify_var].startswith(expected)


def test_no_certificate_means_no_value(stack: Stack, pki: PKI) -> None:
    environ = echo(stack.nginx, pki, cert=None)
    # gunicorn: nginx sends no header at all for an empty value. uWSGI: the variable is there, empty.
    assert environ.get(stack.cert_var, "") == ""
    assert "HTTP_X_SSL_CLIENT_CERT" not in environ or stack.upstream == "gunicorn"


FORGED_HEADERS = [
    pytest.param("X-SSL-Client-Cert", id="exact-name"),
    pytest.param("x-ssl-client-cert", id="lower-case"),
    pytest.param("X-SSL-CLIENT-CERT", id="upper-case"),
    pytest.param("X-SSL_Client-Cert", id="underscore-in-name"),
    pytest.param("X_SSL_CLIENT_CERT", id="all-underscores"),
    pytest.param("SSL_CLIENT_CERT", id="uwsgi-variable-name"),
]


@pytest.mark.parametrize("header", FORGED_HEADERS)
@pytest.mark.parametrize("client", [pytest.param("alice", id="with-cert"), pytest.param(None, id="without-cert")])
def test_forged_certificate_header_never_reaches_app(stack: Stack, pki: PKI, header: str, client: str | None) -> None:
    forged = quote(pki.bob.cert_pem, safe="")
    environ = echo(stack.nginx, pki, cert=getattr(pki, client) if client else None,
                   headers={header: forged, "X-SSL-Client-Verify": "SUCCESS"})
    assert all(forged not in value for value in environ.values()), {
        key: value for key, value in environ.items() if forged in value
    }
    expected = quote(pki.alice.cert_pem, safe="") if client else ""
    assert unquote(environ.get(stack.cert_var, "")) == unquote(expected)
    assert environ[stack.verify_var] != "SUCCESS"
    if stack.upstream == "uwsgi":
        # Behind nginx, uWSGI gets the certificate only as SSL_CLIENT_CERT; the header is removed.
        assert "HTTP_X_SSL_CLIENT_CERT" not in environ


@pytest.mark.parametrize("client", [pytest.param("alice", id="with-cert"), pytest.param(None, id="without-cert")])
def test_client_cannot_name_the_uwsgi_variable(stack: Stack, pki: PKI, client: str | None) -> None:
    """A header is always HTTP_<NAME>: "SSL-Client-Cert" arrives as HTTP_SSL_CLIENT_CERT (which
    nothing reads), never as the SSL_CLIENT_CERT variable nginx sets for uWSGI."""
    forged = quote(pki.bob.cert_pem, safe="")
    environ = echo(stack.nginx, pki, cert=getattr(pki, client) if client else None, headers={"SSL-Client-Cert": forged})
    assert [key for key, value in environ.items() if forged in value] == ["HTTP_SSL_CLIENT_CERT"]
    assert unquote(environ.get(stack.cert_var, "")) == (pki.alice.cert_pem if client else "")


def test_duplicate_forged_headers_are_all_replaced(stack: Stack, pki: PKI) -> None:
    """Two copies of the header, sent raw (requests cannot repeat a header)."""
    context = ssl.create_default_context(cafile=str(pki.ca.cert_path))
    request = (
        f"GET /echo HTTP/1.1\r\nHost: {SERVER_NAME}\r\nConnection: close\r\n"
        "X-SSL-Client-Cert: forged-one\r\nX-SSL-Client-Cert: forged-two\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", stack.nginx.port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=SERVER_NAME) as tls:
            tls.sendall(request.encode())
            response = b""
            while chunk := tls.recv(65536):
                response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    if b"chunked" in head.lower():
        body = _unchunk(body)
    environ: dict[str, Any] = json.loads(body)
    assert all("forged" not in value for value in environ.values())
    assert environ.get(stack.cert_var, "") == ""


def _unchunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2:]
    return out


def test_forwarded_headers_are_nginx_s_not_the_client_s(stack: Stack, pki: PKI) -> None:
    environ = echo(stack.nginx, pki, cert=None, headers={
        "X-Forwarded-Proto": "http", "X-Forwarded-Host": "evil.example", "X-Forwarded-Port": "80",
        "X-Forwarded-Prefix": "/evil", "X-Forwarded-Ssl": "off", "X-Forwarded-Protocol": "http",
        "Forwarded": "proto=http",
    })
    assert environ["HTTP_X_FORWARDED_PROTO"] == "https"
    assert environ["HTTP_X_FORWARDED_HOST"] == SERVER_NAME
    assert environ["HTTP_X_FORWARDED_PORT"] == str(stack.nginx.port)
    assert environ["wsgi.url_scheme"] == "https"
    for name in ("HTTP_X_FORWARDED_PREFIX", "HTTP_FORWARDED", "HTTP_X_FORWARDED_SSL", "HTTP_X_FORWARDED_PROTOCOL"):
        assert name not in environ
    # The last X-Forwarded-For entry is the address nginx saw (what ProxyFix x_for=1 reads).
    assert environ["HTTP_X_FORWARDED_FOR"].split(",")[-1].strip() == "127.0.0.1"


def test_request_line_and_host_are_passed(stack: Stack, pki: PKI) -> None:
    environ = echo(stack.nginx, pki, cert=None, path="/a/b%20c?x=1&y=%2F")
    assert environ["PATH_INFO"] == "/a/b c"
    assert environ["QUERY_STRING"] == "x=1&y=%2F"
    assert environ["REQUEST_METHOD"] == "GET"
    # The port survives, so URLs the application rebuilds match what the client used.
    assert environ["HTTP_HOST"] == f"{SERVER_NAME}:{stack.nginx.port}"


# --- the proxy secret ---------------------------------------------------------

SECRET_FORGERIES = [
    pytest.param({}, id="none-sent"),
    pytest.param({"X-Certbound-Proxy-Secret": "forged"}, id="header"),
    pytest.param({"x-certbound-proxy-secret": "forged"}, id="header-lower-case"),
    pytest.param({"Certbound-Proxy-Secret": "forged"}, id="uwsgi-variable-lookalike"),
    pytest.param({"X-Certbound-Proxy_Secret": "forged"}, id="underscore-in-name"),
]


@pytest.mark.parametrize("headers", SECRET_FORGERIES)
def test_the_secret_arrives_from_nginx_only(stack: Stack, pki: PKI, headers: dict[str, str]) -> None:
    """The secret reaches the worker in exactly one place, always nginx's value; a client's copy is
    replaced (gunicorn) or removed (uWSGI), and no header can become the uwsgi variable."""
    environ = echo(stack.nginx, pki, cert=pki.alice, headers=headers)
    assert environ[stack.secret_var] == PROXY_SECRET
    assert [key for key, value in environ.items() if value == PROXY_SECRET] == [stack.secret_var]
    assert "forged" not in environ.get("HTTP_X_CERTBOUND_PROXY_SECRET", "")
    assert [key for key, value in environ.items() if value == "forged"] in ([], ["HTTP_CERTBOUND_PROXY_SECRET"])


# --- ssl_verify_client on (--client-ca) --------------------------------------

@pytest.fixture(scope="module")
def gunicorn_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    require_binary("nginx", "/usr/sbin/nginx")
    app = start_gunicorn({}, workers=1, module=ENVIRON_APP, log_dir=tmp_path_factory.mktemp("ca-gunicorn"))
    try:
        yield app.backend
    finally:
        app.stop()


def _status(nginx: Nginx, pki: PKI, cert: Issued | None) -> int:
    with _session() as session:
        response = session.get(nginx.url + "/", cert=cert.pair if cert else None, verify=str(pki.ca.cert_path),
                               timeout=10)
    return response.status_code


def test_client_ca_requires_a_certificate_from_it(gunicorn_backend: str, pki: PKI, tmp_path: Path) -> None:
    nginx = start_nginx(tmp_path / "nginx", "gunicorn", gunicorn_backend, pki.server, proxy_secret=PROXY_SECRET)
    try:
        # optional_no_ca first: all three get through.
        assert [_status(nginx, pki, cert) for cert in (pki.alice, pki.mallory, None)] == [200, 200, 200]
        nginx.reload(client_ca=pki.ca.cert_path)
        environ = echo(nginx, pki, cert=pki.alice)
        assert environ["HTTP_X_SSL_CLIENT_VERIFY"] == "SUCCESS"
        assert unquote(environ["HTTP_X_SSL_CLIENT_CERT"]) == pki.alice.cert_pem
        # nginx answers 400 itself ("No required SSL certificate was sent" / "certificate error").
        assert _status(nginx, pki, pki.mallory) == 400
        assert _status(nginx, pki, None) == 400
    finally:
        nginx.stop()
