"""HAProxy 2.6 and Caddy 2.6 terminating mutual TLS in front of gunicorn, end to end (issue 16).

client -> HAProxy or Caddy (real process, the shipped template from proxies/)
-> gunicorn -> middleware -> echo app, with tokens from the real oidc-provider
bound to alice's certificate.

gunicorn runs the real entry point, ``certbound_wsgi.wsgi:application``,
configured from the environment only, as a user deploys it:
``CERTBOUND_CLIENT_CERT_HEADER`` and ``CERTBOUND_CLIENT_CERT_FORMAT`` name the
proxy's header and its shape (HAProxy ``X-Client-Cert``, ``base64_der``;
Caddy ``Client-Cert``, ``rfc9440``), as :data:`certbound_wsgi.proxy_config.HEADERS`
declares them.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from urllib.parse import quote

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from certbound_wsgi.binding import CERT_MISSING, THUMBPRINT_MISMATCH
from certbound_wsgi.dev.pki import Issued
from certbound_wsgi.proxy_config import HEADERS, Proxy
from tests.support.idp import OidcProvider, x5t_s256
from tests.support.idp_fixtures import Pki
from tests.support.proxies import ProxyServer, start_caddy, start_haproxy
from tests.support.servers import PROXY_SECRET, start_gunicorn

from .conftest import app_env

GUNICORN_MODULE = "certbound_wsgi.wsgi:application"
MALFORMED = "the client certificate could not be parsed"


@pytest.fixture(scope="module", params=[pytest.param("haproxy", id="haproxy"), pytest.param("caddy", id="caddy")])
def proxy(request: pytest.FixtureRequest, idp: OidcProvider, pki: Pki,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyServer]:
    name: Proxy = request.param
    header, fmt = HEADERS[name]
    # The channel: HAProxy and Caddy add the proxy secret, as nginx does (issue 11).
    env = app_env(idp, proxy_secret=PROXY_SECRET, client_cert_header=header, client_cert_format=fmt)
    app = start_gunicorn(env, workers=1, module=GUNICORN_MODULE, log_dir=tmp_path_factory.mktemp(f"{name}-app"))
    try:
        directory = tmp_path_factory.mktemp(name)
        if name == "haproxy":
            server = start_haproxy(directory, app.backend, pki.server, pki.ca_file)
        else:
            server = start_caddy(directory, app.backend, pki.server)
        try:
            yield server
        finally:
            server.stop()
    finally:
        app.stop()


@pytest.fixture(scope="module")
def alice_token(idp: OidcProvider) -> str:
    return idp.token("bound")


def call(proxy: ProxyServer, pki: Pki, token: str, cert: Issued | None,
         headers: dict[str, str] | None = None) -> requests.Response:
    with requests.Session() as session:
        session.trust_env = False  # the machine's proxy and CA variables must not apply
        return session.get(f"{proxy.url}/anything", cert=cert.pair if cert else None, verify=pki.ca_file,
                           headers={"Authorization": f"Bearer {token}", **(headers or {})}, timeout=15)


def assert_refused(response: requests.Response, description: str) -> None:
    assert response.status_code == 401, response.text
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    assert response.json() == {"error": "invalid_token", "error_description": description}


def as_proxy_writes_it(proxy: ProxyServer, cert: Issued) -> str:
    """``cert`` in the shape the proxy itself writes, for a forger to copy."""
    der = x509.load_pem_x509_certificate(cert.cert_pem.encode()).public_bytes(Encoding.DER)
    b64 = base64.b64encode(der).decode("ascii")
    return b64 if proxy.name == "haproxy" else f":{b64}:"


def test_owner_token_with_owner_certificate(proxy: ProxyServer, pki: Pki, alice_token: str) -> None:
    response = call(proxy, pki, alice_token, pki.alice)
    assert response.status_code == 200, (response.text, proxy.output())
    assert response.json()["thumbprint"] == x5t_s256(pki.alice)


def test_stolen_token_with_another_certificate(proxy: ProxyServer, pki: Pki, alice_token: str) -> None:
    assert_refused(call(proxy, pki, alice_token, pki.mallory), THUMBPRINT_MISMATCH)


def test_stolen_token_without_certificate(proxy: ProxyServer, pki: Pki, alice_token: str) -> None:
    assert_refused(call(proxy, pki, alice_token, None), CERT_MISSING)


@pytest.mark.parametrize("spelling", [
    pytest.param(str.__str__, id="as-written"),
    pytest.param(str.lower, id="lower-case"),
    pytest.param(str.upper, id="upper-case"),
])
@pytest.mark.parametrize(("use_mallory", "description"), [
    pytest.param(False, CERT_MISSING, id="no-tls-certificate"),
    pytest.param(True, THUMBPRINT_MISMATCH, id="over-mallory-certificate"),
])
def test_forged_certificate_header_is_replaced(proxy: ProxyServer, pki: Pki, alice_token: str, spelling,  # type: ignore[no-untyped-def]
                                               use_mallory: bool, description: str) -> None:
    """Mallory has alice's token and her (public) certificate, and sends the certificate in the
    header the proxy writes: the proxy removes it, or overwrites it with mallory's own."""
    header, _ = HEADERS[proxy.name]  # type: ignore[index]
    forged = {spelling(header): as_proxy_writes_it(proxy, pki.alice)}
    assert_refused(call(proxy, pki, alice_token, pki.mallory if use_mallory else None, forged), description)


def test_forged_header_spelt_with_underscores_is_not_believed(proxy: ProxyServer, pki: Pki,
                                                              alice_token: str) -> None:
    header, _ = HEADERS[proxy.name]  # type: ignore[index]
    forged = {header.replace("-", "_"): as_proxy_writes_it(proxy, pki.alice)}
    assert_refused(call(proxy, pki, alice_token, None, forged), CERT_MISSING)


def test_forged_escaped_pem_in_the_middleware_s_own_header(proxy: ProxyServer, pki: Pki,
                                                           alice_token: str) -> None:
    forged = {"X-SSL-Client-Cert": quote(pki.alice.cert_pem, safe="")}
    assert_refused(call(proxy, pki, alice_token, None, forged), CERT_MISSING)
