"""The development HTTPS server: a real TLS handshake on a loopback port fills ``SSL_CLIENT_CERT``."""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import pytest
import requests

from certbound_wsgi.dev.pki import DevCA, Issued
from certbound_wsgi.dev.server import DevServer, server_ssl_context

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment


def _reflect(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    seen = {key: environ.get(key) for key in ("SSL_CLIENT_CERT", "HTTP_SSL_CLIENT_CERT", "wsgi.url_scheme")}
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(seen).encode()]


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> DevCA:
    return DevCA(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def context(ca: DevCA) -> ssl.SSLContext:
    server = ca.server()
    return server_ssl_context(server.cert_path, server.key_path, client_ca=ca.cert_path)


@pytest.fixture(scope="module")
def server(context: ssl.SSLContext) -> Iterator[DevServer]:
    with DevServer(context) as running:
        yield running.start(_reflect)


def _get(server: DevServer, ca: DevCA, cert: Issued | None, headers: dict[str, str] | None = None) -> dict[str, str]:
    with requests.Session() as session:
        session.trust_env = False
        response = session.get(
            server.url, verify=str(ca.cert_path), cert=cert.pair if cert else None, headers=headers, timeout=10
        )
    assert response.status_code == 200
    body: dict[str, str] = response.json()
    return body


def test_client_certificate_reaches_the_app_as_pem(server: DevServer, ca: DevCA) -> None:
    alice = ca.client("alice")
    seen = _get(server, ca, alice)
    assert ssl.PEM_cert_to_DER_cert(seen["SSL_CLIENT_CERT"]) == ssl.PEM_cert_to_DER_cert(alice.cert_pem)
    assert seen["wsgi.url_scheme"] == "https"


@pytest.mark.parametrize("headers", [
    pytest.param(None, id="nothing"),
    pytest.param({"SSL-Client-Cert": "forged"}, id="dashed-header"),
    pytest.param({"SSL_CLIENT_CERT": "forged"}, id="underscored-header"),
])
def test_without_a_certificate_the_variable_is_empty_and_unforgeable(
    server: DevServer, ca: DevCA, headers: dict[str, str] | None
) -> None:
    assert _get(server, ca, None, headers)["SSL_CLIENT_CERT"] == ""


def test_port_in_use_is_an_oserror(server: DevServer, context: ssl.SSLContext) -> None:
    with pytest.raises(OSError, match=str(server.port)):
        DevServer(context, port=server.port)


def test_shutdown_is_idempotent_and_works_before_start(context: ssl.SSLContext) -> None:
    never_started = DevServer(context)
    never_started.shutdown()
    started = DevServer(context).start(_reflect)
    started.shutdown()
    started.shutdown()
