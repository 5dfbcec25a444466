"""nginx ``auth_request`` protecting an upstream that is not Python, end to end (issue 16).

client -> nginx (mTLS; ``nginx/auth_request.conf`` as ``certbound-wsgi nginx-config --mode
auth_request`` renders it) -> subrequest -> gunicorn running
``certbound_wsgi.auth_request:create_application()`` (configured from ``CERTBOUND_*`` only)
-> nginx -> a second nginx serving static files, which echoes in response headers the
identity headers it received. Tokens come from the real oidc-provider.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
import requests

from certbound_wsgi.binding import CERT_MISSING, THUMBPRINT_MISMATCH
from certbound_wsgi.dev.pki import Issued
from tests.support.dpop import DPoPKey
from tests.support.idp import OidcProvider, decode_jwt, x5t_s256
from tests.support.idp_fixtures import Pki
from tests.support.procs import Process, free_port, require_binary, wait_for_port, wait_until
from tests.support.servers import PROXY_SECRET, SERVER_NAME, Gunicorn, Nginx, start_gunicorn, start_nginx

from .conftest import app_env

AUTH_APP = "certbound_wsgi.auth_request:create_application()"
STATIC = '{"static": "content served by nginx, not Python"}\n'
ALGS = "ES256 ES384 ES512 RS256 RS384 RS512 PS256 PS384 PS512 EdDSA"
BARE = f'Bearer realm="api", DPoP realm="api", algs="{ALGS}"'
# What the upstream saw, echoed back by its add_header lines (an absent header: not received).
SAW = {"sub": "X-Saw-Sub", "client_id": "X-Saw-Client-Id", "scope": "X-Saw-Scope",
       "thumbprint": "X-Saw-Thumbprint", "cert": "X-Saw-Cert", "original_uri": "X-Saw-Original-Uri",
       "secret": "X-Saw-Secret"}

_UPSTREAM_CONF = """\
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log notice;
events {{ worker_connections 64; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body_temp;
    proxy_temp_path {prefix}/proxy_temp;
    fastcgi_temp_path {prefix}/fastcgi_temp;
    uwsgi_temp_path {prefix}/uwsgi_temp;
    scgi_temp_path {prefix}/scgi_temp;
    server {{
        listen 127.0.0.1:{port};
        root {prefix}/site;
        location / {{
            default_type application/json;
            add_header X-Saw-Sub $http_x_certbound_sub always;
            add_header X-Saw-Client-Id $http_x_certbound_client_id always;
            add_header X-Saw-Scope $http_x_certbound_scope always;
            add_header X-Saw-Thumbprint $http_x_certbound_thumbprint always;
            add_header X-Saw-Cert $http_x_ssl_client_cert always;
            add_header X-Saw-Original-Uri $http_x_original_uri always;
            add_header X-Saw-Secret $http_x_certbound_proxy_secret always;
            add_header X-Saw-Request-Id $http_x_request_id always;
            try_files $uri =404;
        }}
    }}
}}
"""


def start_static_upstream(prefix: Path) -> tuple[Process, int]:
    """nginx serving ``STATIC`` at /data.json over plain HTTP on loopback: the non-Python upstream."""
    binary = require_binary("nginx", "/usr/sbin/nginx")
    (prefix / "site").mkdir(parents=True)
    (prefix / "site" / "data.json").write_text(STATIC)
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(_UPSTREAM_CONF.format(prefix=prefix, port=port))
    directives = "daemon off;" + (" user root;" if os.geteuid() == 0 else "")
    process = Process([binary, "-p", str(prefix), "-c", str(conf), "-g", directives], prefix / "nginx.out")
    try:
        wait_for_port(port, proc=process.proc, log=prefix / "error.log")
    except BaseException:
        process.stop()
        raise
    return process, port


@dataclass
class Deployment:
    nginx: Nginx
    auth: Gunicorn
    ca_file: str

    def call(self, token: str | None, cert: Issued | None, *, path: str = "/data.json", method: str = "GET",
             scheme: str = "Bearer", headers: dict[str, str] | None = None) -> requests.Response:
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"{scheme} {token}"
        with requests.Session() as session:
            session.trust_env = False  # the machine's proxy and CA variables must not apply
            return session.request(method, self.nginx.url + path, headers=sent, cert=cert.pair if cert else None,
                                   verify=self.ca_file, timeout=15)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    process, port = start_static_upstream(tmp_path_factory.mktemp("static-upstream"))
    try:
        yield port
    finally:
        process.stop()


@pytest.fixture(scope="module")
def deployment(idp: OidcProvider, pki: Pki, upstream: int,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    port = free_port()  # nginx's, reserved so that the auth app can be told its public URL
    env = app_env(idp, scopes_required="write", proof_of_possession_mtls="optional",
                  proof_of_possession_dpop="optional", public_base_url=f"https://{SERVER_NAME}:{port}",
                  audit_trust_request_id="true")
    auth = start_gunicorn(env, workers=1, module=AUTH_APP, log_dir=tmp_path_factory.mktemp("auth-app"))
    try:
        nginx = start_nginx(tmp_path_factory.mktemp("nginx-auth-request"), "gunicorn", f"127.0.0.1:{upstream}",
                            pki.server, port=port, proxy_secret=PROXY_SECRET, mode="auth_request",
                            auth_backend=auth.backend)
        try:
            yield Deployment(nginx, auth, pki.ca_file)
        finally:
            nginx.stop()
    finally:
        auth.stop()


@pytest.fixture(scope="module")
def owner_token(idp: OidcProvider) -> str:
    return idp.token("bound", scope="read write")


def saw(response: requests.Response) -> dict[str, str]:
    """The identity headers the upstream received."""
    return {name: response.headers[header] for name, header in SAW.items() if header in response.headers}


def assert_refused(response: requests.Response, status: int, error: str, description: str,
                   scheme: str = "Bearer") -> None:
    """Refused by the auth app, with its challenge and JSON body, and the upstream never reached."""
    assert response.status_code == status, (response.text, response.headers)
    challenge = response.headers["WWW-Authenticate"]
    assert f'{scheme} realm="api"' in challenge
    assert f'error="{error}", error_description="{description}"' in challenge
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["Cache-Control"] == "no-store"
    assert response.json() == {"error": error, "error_description": description}
    assert saw(response) == {}


def test_owner_token_and_certificate_reach_the_static_upstream(deployment: Deployment, pki: Pki,
                                                               owner_token: str) -> None:
    response = deployment.call(owner_token, pki.alice)
    assert response.status_code == 200, (response.text, deployment.nginx.output())
    assert response.text == STATIC
    claims = decode_jwt(owner_token)[1]
    assert saw(response) == {"sub": claims["sub"], "client_id": claims["client_id"], "scope": "read write",
                             "thumbprint": x5t_s256(pki.alice)}


def test_stolen_token_with_another_certificate(deployment: Deployment, pki: Pki, owner_token: str) -> None:
    assert_refused(deployment.call(owner_token, pki.mallory), 401, "invalid_token", THUMBPRINT_MISMATCH)


def test_stolen_token_without_certificate(deployment: Deployment, owner_token: str) -> None:
    assert_refused(deployment.call(owner_token, None), 401, "invalid_token", CERT_MISSING)


@pytest.mark.parametrize("header", ["X-SSL-Client-Cert", "x-ssl-client-cert", "X_SSL_Client_Cert",
                                    "X-SSL_Client-Cert"])
@pytest.mark.parametrize(("use_mallory", "description"), [
    pytest.param(False, CERT_MISSING, id="no-tls-certificate"),
    pytest.param(True, THUMBPRINT_MISMATCH, id="over-mallory-certificate"),
])
def test_forged_certificate_header(deployment: Deployment, pki: Pki, owner_token: str, header: str,
                                   use_mallory: bool, description: str) -> None:
    """Mallory has alice's token and her (public) certificate, and sends it as the header nginx writes."""
    forged = {header: quote(pki.alice.cert_pem, safe="")}
    response = deployment.call(owner_token, pki.mallory if use_mallory else None, headers=forged)
    assert_refused(response, 401, "invalid_token", description)


def test_insufficient_scope(deployment: Deployment, idp: OidcProvider, pki: Pki) -> None:
    token = idp.token("bound", scope="read")
    response = deployment.call(token, pki.alice)
    assert response.status_code == 403, response.text
    challenge = response.headers["WWW-Authenticate"]
    assert 'error="insufficient_scope"' in challenge and 'scope="write"' in challenge
    assert response.json() == {"error": "insufficient_scope", "error_description": "the token lacks a required scope",
                               "scope": "write"}
    assert saw(response) == {}


def test_no_token(deployment: Deployment, pki: Pki) -> None:
    response = deployment.call(None, pki.alice)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == BARE
    assert response.json() == {"error": "unauthorized", "error_description": "an access token is required"}
    assert saw(response) == {}


def test_forged_identity_headers_never_reach_the_upstream(deployment: Deployment, pki: Pki,
                                                          owner_token: str) -> None:
    forged = {"X-Certbound-Sub": "admin", "X-Certbound-Scope": "admin", "X-Certbound-Client-Id": "root",
              "X-Certbound-Thumbprint": x5t_s256(pki.mallory), "X-Original-URI": "/elsewhere",
              "X-Certbound-Proxy-Secret": "a-guess-of-the-secret-0123456789abcdef",
              "X-SSL-Client-Cert": quote(pki.mallory.cert_pem, safe="")}
    response = deployment.call(owner_token, pki.alice, headers=forged)
    assert response.status_code == 200, response.text
    claims = decode_jwt(owner_token)[1]
    assert saw(response) == {"sub": claims["sub"], "client_id": claims["client_id"], "scope": "read write",
                             "thumbprint": x5t_s256(pki.alice)}


def test_the_auth_location_is_not_reachable_from_outside(deployment: Deployment, pki: Pki,
                                                        owner_token: str) -> None:
    assert deployment.call(owner_token, pki.alice, path="/_certbound/auth").status_code == 404


def test_dpop_htm_and_htu_are_the_original_request_s(deployment: Deployment, idp: OidcProvider) -> None:
    key = DPoPKey()
    token = idp.token("unbound", scope="read write", dpop=key.proof("POST", idp.token_endpoint))
    url = deployment.nginx.url + "/data.json"
    ok = deployment.call(token, None, scheme="DPoP", headers={"DPoP": key.proof("GET", url, token)})
    assert ok.status_code == 200, ok.text
    assert ok.text == STATIC and "thumbprint" not in saw(ok)
    # The proof is for another URI: nginx's X-Original-URI is the truth, whatever the client sends.
    other = key.proof("GET", deployment.nginx.url + "/other.json", token)
    for extra in ({}, {"X-Original-URI": "/other.json"}, {"X-Original-Method": "GET"}):
        response = deployment.call(token, None, scheme="DPoP", headers={"DPoP": other, **extra})
        assert_refused(response, 401, "invalid_dpop_proof", "the DPoP proof's htu does not match the request URI",
                       scheme="DPoP")
    # The proof is for another method.
    post = key.proof("POST", url, token)
    response = deployment.call(token, None, scheme="DPoP", headers={"DPoP": post, "X-Original-Method": "POST"})
    assert_refused(response, 401, "invalid_dpop_proof", "the DPoP proof's htm does not match the request method",
                   scheme="DPoP")


def test_auth_app_unreachable_is_503_never_200(tmp_path: Path, pki: Pki, upstream: int, owner_token: str) -> None:
    nginx = start_nginx(tmp_path / "nginx", "gunicorn", f"127.0.0.1:{upstream}", pki.server, mode="auth_request",
                        proxy_secret=PROXY_SECRET, auth_backend=f"127.0.0.1:{free_port()}")
    try:
        response = Deployment(nginx, None, pki.ca_file).call(owner_token, pki.alice)  # type: ignore[arg-type]
    finally:
        nginx.stop()
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"] == "5"
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert json.loads(response.text) == {"error": "temporarily_unavailable",
                                         "error_description": "the authorization service is unavailable"}
    assert saw(response) == {}


def test_invalid_request_keeps_its_400(deployment: Deployment, idp: OidcProvider) -> None:
    """nginx maps every status but 2xx, 401 and 403 to 500; the configuration gives a 400 back its own answer."""
    key = DPoPKey()
    token = idp.token("unbound", scope="read write", dpop=key.proof("POST", idp.token_endpoint))
    proof = key.proof("GET", deployment.nginx.url + "/data.json", token)
    response = deployment.call(token, None, scheme="DPoP", headers={"DPoP": f"{proof},{proof}"})
    assert_refused(response, 400, "invalid_request", "more than one DPoP header", scheme="DPoP")
    assert "Retry-After" not in response.headers


def test_issuer_unreachable_is_the_auth_app_s_503(tmp_path: Path, idp: OidcProvider, pki: Pki, upstream: int,
                                                  owner_token: str) -> None:
    env = {**app_env(idp), "CERTBOUND_ISSUER": f"https://127.0.0.1:{free_port()}"}
    auth = start_gunicorn(env, workers=1, module=AUTH_APP, log_dir=tmp_path / "auth")
    try:
        nginx = start_nginx(tmp_path / "nginx", "gunicorn", f"127.0.0.1:{upstream}", pki.server,
                            proxy_secret=PROXY_SECRET, mode="auth_request", auth_backend=auth.backend)
        try:
            response = Deployment(nginx, auth, pki.ca_file).call(owner_token, pki.alice)
        finally:
            nginx.stop()
    finally:
        auth.stop()
    assert response.status_code == 503, response.text
    assert int(response.headers["Retry-After"]) >= 1
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="api"'
    body = response.json()
    # The auth app's own description, not the configuration's fallback for an auth app that is down.
    assert body["error"] == "temporarily_unavailable"
    assert body["error_description"] not in ("", "the authorization service is unavailable")
    assert saw(response) == {}


def test_a_dpop_nonce_challenge_reaches_the_client(tmp_path: Path, idp: OidcProvider, pki: Pki,
                                                   upstream: int) -> None:
    """RFC 9449 section 9: 401 use_dpop_nonce with a DPoP-Nonce header, through nginx's 401 location."""
    port = free_port()
    env = app_env(idp, proof_of_possession_mtls="optional", proof_of_possession_dpop="optional",
                  public_base_url=f"https://{SERVER_NAME}:{port}", dpop_use_nonce="true",
                  cache_secret="auth-request-e2e-0123456789abcdef")
    auth = start_gunicorn(env, workers=1, module=AUTH_APP, log_dir=tmp_path / "auth")
    try:
        nginx = start_nginx(tmp_path / "nginx", "gunicorn", f"127.0.0.1:{upstream}", pki.server, port=port,
                            proxy_secret=PROXY_SECRET, mode="auth_request", auth_backend=auth.backend)
        try:
            deployment = Deployment(nginx, auth, pki.ca_file)
            key = DPoPKey()
            token = idp.token("unbound", scope="read write", dpop=key.proof("POST", idp.token_endpoint))
            url = nginx.url + "/data.json"
            first = deployment.call(token, None, scheme="DPoP", headers={"DPoP": key.proof("GET", url, token)})
            nonce = first.headers.get("DPoP-Nonce", "")
            second = deployment.call(token, None, scheme="DPoP",
                                     headers={"DPoP": key.proof("GET", url, token, nonce=nonce)})
        finally:
            nginx.stop()
    finally:
        auth.stop()
    assert first.status_code == 401, first.text
    assert 'error="use_dpop_nonce"' in first.headers["WWW-Authenticate"]
    assert first.json()["error"] == "use_dpop_nonce"
    assert len(nonce) == 32
    assert second.status_code == 200, second.text
    assert second.text == STATIC


def test_straight_to_the_auth_app_nothing_is_believed(deployment: Deployment, pki: Pki, owner_token: str) -> None:
    """A process that reaches the auth app without nginx does not know the proxy secret: its certificate
    header and its X-Original-* are not believed, and it gets no 2xx to replay anywhere."""
    forged = {"Authorization": f"Bearer {owner_token}", "X-SSL-Client-Cert": quote(pki.alice.cert_pem, safe=""),
              "X-Original-Method": "GET", "X-Original-URI": "/data.json", "Host": f"{SERVER_NAME}:443"}
    for extra in ({}, {"X-Certbound-Proxy-Secret": "a-guess-of-the-secret-0123456789abcdef"}):
        response = requests.get(f"http://{deployment.auth.backend}/_certbound/auth", headers={**forged, **extra},
                                timeout=15)
        assert response.status_code == 400, response.text
        assert response.json() == {"error": "invalid_request",
                                   "error_description": "auth_request subrequests are accepted from the proxy only"}
        assert "X-Certbound-Sub" not in response.headers


def test_the_auth_app_audits_the_original_request_with_nginx_s_request_id(deployment: Deployment, pki: Pki,
                                                                          owner_token: str) -> None:
    """One audit event per refusal (on stderr, with no logging configured) about the request being
    authorized, not the subrequest; the request id is nginx's, for the upstream too, never the client's."""
    forged = {"X-Request-Id": "forged-by-the-client"}
    accepted = deployment.call(owner_token, pki.alice, path="/data.json?q=1", headers=forged)
    assert re.fullmatch(r"[0-9a-f]{32}", accepted.headers["X-Saw-Request-Id"])
    assert deployment.call(owner_token, pki.mallory, path="/data.json?q=2", headers=forged).status_code == 401

    def refusals() -> list[str]:
        return [line for line in deployment.auth.output().splitlines()
                if "outcome=refused" in line and "path=/data.json" in line and "reason=cert_mismatch" in line]

    assert wait_until(lambda: bool(refusals()))
    refusal = refusals()[-1]
    assert "method=GET" in refusal and "status=401" in refusal and "_certbound" not in refusal
    assert re.search(r"request_id=[0-9a-f]{32}\b", refusal) and "forged-by-the-client" not in refusal
