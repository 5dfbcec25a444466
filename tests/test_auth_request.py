"""certbound_wsgi.auth_request: the nginx auth_request endpoint, and the template that calls it.

The endpoint runs through werkzeug's test client with the subrequest nginx sends
(``nginx/auth_request.conf``): the client's headers, the certificate header, and
``X-Original-Method`` / ``X-Original-URI``. tests/e2e/test_auth_request.py runs the
same with real nginx processes.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.test import Client, TestResponse

from certbound_wsgi.audit import LOGGER_NAME
from certbound_wsgi.auth_request import (
    ERROR_HEADER,
    IDENTITY_HEADERS,
    MAX_IDENTITY_VALUE,
    ORIGINAL_METHOD,
    ORIGINAL_URI,
    AuthRequest,
    create_application,
    identity_headers,
)
from certbound_wsgi.authenticator import Authenticator, Identity
from certbound_wsgi.binding import CERT_MISSING, THUMBPRINT_MISMATCH
from certbound_wsgi.cli import main
from certbound_wsgi.dev.pki import Issued
from certbound_wsgi.errors import ConfigurationError, InvalidToken
from certbound_wsgi.nginx_config import render
from tests.conftest import TEST_PROXY_SECRET, make_settings
from tests.support.dpop import DPoPKey
from tests.support.idp import x5t_s256
from tests.support.tokens import StaticDiscovery, TestIssuer

HOST = "api.example"
# DPoP on, with the htu rebuilt from the subrequest's Host (which nginx sets to the client's).
DPOP: dict[str, Any] = {"proof_of_possession_dpop": "optional", "proof_of_possession_mtls": "optional",
                        "dpop_allowed_hosts": [HOST]}
ALGS = "ES256 ES384 ES512 RS256 RS384 RS512 PS256 PS384 PS512 EdDSA"


def endpoint(issuer: TestIssuer, **overrides: Any) -> Client:
    config = make_settings(**overrides)
    return Client(AuthRequest(config, discovery=StaticDiscovery(config, issuer)))  # type: ignore[arg-type]


def subrequest(client: Client, *, token: str | None = None, cert: Issued | None = None, method: str = "GET",
               uri: str = "/orders?x=1", headers: dict[str, str] | None = None, scheme: str = "Bearer",
               remote_addr: str = "127.0.0.1") -> TestResponse:
    """What nginx's ``location = /_certbound/auth`` sends: a GET, no body, the original request in headers,
    and the proxy secret."""
    sent = {"Host": HOST, "X-Forwarded-Proto": "https", ORIGINAL_METHOD: method, ORIGINAL_URI: uri,
            "X-Certbound-Proxy-Secret": TEST_PROXY_SECRET}
    if token is not None:
        sent["Authorization"] = f"{scheme} {token}"
    if cert is not None:
        sent["X-SSL-Client-Cert"] = quote(cert.cert_pem, safe="")
    sent.update(headers or {})
    return client.get("/_certbound/auth", headers={k: v for k, v in sent.items() if v is not None},
                      environ_overrides={"REMOTE_ADDR": remote_addr})


def assert_refused(response: TestResponse, status: int, error: str | None, description: str) -> None:
    assert response.status_code == status
    body = response.json
    assert body is not None and body.get("error_description") == description
    assert body["error"] == (error or "unauthorized")
    # One header, for nginx's $upstream_http_www_authenticate, and the body again as a header.
    assert len(response.headers.getlist("WWW-Authenticate")) == 1
    assert response.headers[ERROR_HEADER] == response.get_data(as_text=True)
    assert not any(header in response.headers for header in IDENTITY_HEADERS.values())


def test_accepted_with_the_identity_headers(issuer: TestIssuer, alice: Issued, alice_x5t: str) -> None:
    token = issuer.token(cnf={"x5t#S256": alice_x5t}, scope="write read", client_id="app-1")
    response = subrequest(endpoint(issuer), token=token, cert=alice)
    assert response.status_code == 200
    assert response.get_data() == b""
    assert response.headers["Cache-Control"] == "no-store"
    assert {h: response.headers.get(h) for h in IDENTITY_HEADERS.values()} == {
        "X-Certbound-Sub": "alice", "X-Certbound-Client-Id": "app-1", "X-Certbound-Scope": "read write",
        "X-Certbound-Thumbprint": alice_x5t,
    }


@pytest.mark.parametrize(("overrides", "cert", "status", "error", "description"), [
    pytest.param({}, "mallory", 401, "invalid_token", THUMBPRINT_MISMATCH, id="stolen-token"),
    pytest.param({}, None, 401, "invalid_token", CERT_MISSING, id="no-certificate"),
    pytest.param({"scopes_required": ["admin"]}, "alice", 403, "insufficient_scope",
                 "the token lacks a required scope", id="insufficient-scope"),
])
def test_refusals_carry_challenge_and_body(issuer: TestIssuer, alice: Issued, mallory: Issued, alice_x5t: str,
                                           overrides: dict[str, Any], cert: str | None, status: int, error: str,
                                           description: str) -> None:
    token = issuer.token(cnf={"x5t#S256": alice_x5t})
    response = subrequest(endpoint(issuer, **overrides), token=token,
                          cert={"alice": alice, "mallory": mallory, None: None}[cert])
    assert_refused(response, status, error, description)
    assert response.headers["WWW-Authenticate"].startswith(f'Bearer realm="api", error="{error}"')


def test_every_challenge_in_one_header(issuer: TestIssuer) -> None:
    response = subrequest(endpoint(issuer, **DPOP))
    assert_refused(response, 401, None, "an access token is required")
    assert response.headers["WWW-Authenticate"] == f'Bearer realm="api", DPoP realm="api", algs="{ALGS}"'


def test_issuer_down_is_503_with_retry_after(issuer: TestIssuer, alice: Issued, alice_x5t: str) -> None:
    class Down(StaticDiscovery):
        def _get_json(self, url: str) -> dict[str, Any]:
            from certbound_wsgi.discovery import DiscoveryError
            raise DiscoveryError("unreachable")

    config = make_settings()
    client = Client(AuthRequest(config, discovery=Down(config, issuer)))  # type: ignore[arg-type]
    response = subrequest(client, token=issuer.token(cnf={"x5t#S256": alice_x5t}), cert=alice)
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) >= 1
    assert response.json is not None and response.json["error"] == "temporarily_unavailable"


def test_a_bug_is_500_without_details(issuer: TestIssuer, alice: Issued, alice_x5t: str,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    client = endpoint(issuer)

    def broken(*args: Any) -> Identity:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(Authenticator, "decide", broken)
    response = subrequest(client, token=issuer.token(cnf={"x5t#S256": alice_x5t}), cert=alice)
    assert response.status_code == 500
    assert "secret" not in response.get_data(as_text=True) and "secret" not in response.headers[ERROR_HEADER]


# -- the original request: from nginx only, and well-formed -------------------------------

@pytest.mark.parametrize(("headers", "remote_addr", "description"), [
    pytest.param({"X-Certbound-Proxy-Secret": None}, "127.0.0.1",
                 "auth_request subrequests are accepted from the proxy only", id="no-proxy-secret"),
    pytest.param({"X-Certbound-Proxy-Secret": "x" * 40}, "127.0.0.1",
                 "auth_request subrequests are accepted from the proxy only", id="wrong-proxy-secret"),
    pytest.param({ORIGINAL_METHOD: None}, "127.0.0.1", "the X-Original-Method header is missing or invalid",
                 id="no-method"),
    pytest.param({ORIGINAL_METHOD: "GET POST"}, "127.0.0.1", "the X-Original-Method header is missing or invalid",
                 id="method-not-a-token"),
    pytest.param({ORIGINAL_URI: None}, "127.0.0.1", "the X-Original-URI header is missing or invalid", id="no-uri"),
    pytest.param({ORIGINAL_URI: "orders"}, "127.0.0.1", "the X-Original-URI header is missing or invalid",
                 id="uri-not-a-path"),
    pytest.param({ORIGINAL_URI: "https://evil.example/orders"}, "127.0.0.1",
                 "the X-Original-URI header is missing or invalid", id="uri-absolute"),
    pytest.param({ORIGINAL_URI: "/a b"}, "127.0.0.1", "the X-Original-URI header is missing or invalid",
                 id="uri-space"),
    pytest.param({ORIGINAL_URI: "/a\x7fb"}, "127.0.0.1", "the X-Original-URI header is missing or invalid",
                 id="uri-control"),
    pytest.param({ORIGINAL_URI: "/" + "a" * 8192}, "127.0.0.1", "the X-Original-URI header is missing or invalid",
                 id="uri-too-long"),
])
def test_the_original_request_must_come_from_nginx(issuer: TestIssuer, alice: Issued, alice_x5t: str,
                                                   headers: dict[str, str], remote_addr: str,
                                                   description: str) -> None:
    token = issuer.token(cnf={"x5t#S256": alice_x5t})
    response = subrequest(endpoint(issuer), token=token, cert=alice, headers=headers, remote_addr=remote_addr)
    assert_refused(response, 400, "invalid_request", description)


def _dpop_token(issuer: TestIssuer, key: DPoPKey) -> str:
    return issuer.token(cnf={"jkt": key.jkt})


@pytest.mark.parametrize(("method", "uri", "htm", "htu", "accepted"), [
    pytest.param("GET", "/orders?x=1", "GET", f"https://{HOST}/orders", True, id="same"),
    pytest.param("POST", "/orders", "POST", f"https://{HOST}/orders", True, id="post"),
    pytest.param("GET", "/a%20b/%7Ec", "GET", f"https://{HOST}/a%20b/~c", True, id="escapes-normalized"),
    pytest.param("GET", "/orders", "POST", f"https://{HOST}/orders", False, id="other-method"),
    pytest.param("GET", "/orders", "GET", f"https://{HOST}/_certbound/auth", False, id="the-subrequest-uri"),
    pytest.param("GET", "/orders", "GET", f"https://{HOST}/admin", False, id="other-path"),
    pytest.param("GET", "/orders", "GET", "https://elsewhere.example/orders", False, id="other-host"),
])
def test_dpop_is_checked_against_the_original_request(issuer: TestIssuer, method: str, uri: str, htm: str,
                                                      htu: str, accepted: bool) -> None:
    key = DPoPKey()
    token = _dpop_token(issuer, key)
    response = subrequest(endpoint(issuer, **DPOP), token=token, scheme="DPoP", method=method, uri=uri,
                          headers={"DPoP": key.proof(htm, htu, token)})
    assert (response.status_code == 200) is accepted, response.get_data(as_text=True)
    if not accepted:
        assert response.headers["WWW-Authenticate"].startswith('Bearer realm="api", DPoP realm="api"')
        assert 'error="invalid_dpop_proof"' in response.headers["WWW-Authenticate"]


def test_a_nonce_challenge_reaches_nginx(issuer: TestIssuer) -> None:
    key = DPoPKey()
    token = _dpop_token(issuer, key)
    client = endpoint(issuer, **DPOP, dpop_use_nonce=True, cache_secret="s" * 32)
    response = subrequest(client, token=token, scheme="DPoP",
                          headers={"DPoP": key.proof("GET", f"https://{HOST}/orders", token)})
    assert response.status_code == 401 and response.headers["DPoP-Nonce"]
    nonce = response.headers["DPoP-Nonce"]
    again = subrequest(client, token=token, scheme="DPoP",
                       headers={"DPoP": key.proof("GET", f"https://{HOST}/orders", token, nonce=nonce)})
    assert again.status_code == 200, again.get_data(as_text=True)


@pytest.mark.parametrize(("overrides", "option"), [
    pytest.param({"auth_methods": ["bearer", "session"], "session_secret": "s" * 32}, "auth_methods", id="session"),
    pytest.param({"bearer_token_param_type": ["header", "body"]}, "bearer_token_param_type", id="body-tokens"),
])
def test_what_a_subrequest_cannot_carry_is_refused_at_start_up(overrides: dict[str, Any], option: str) -> None:
    with pytest.raises(ConfigurationError, match=f"^{option}:"):
        AuthRequest(make_settings(**overrides))


def test_create_application_reads_the_environment() -> None:
    app = create_application({"CERTBOUND_ISSUER": "https://issuer.test", "CERTBOUND_AUDIENCE": "a",
                              "CERTBOUND_SCOPES_REQUIRED": "write", "CERTBOUND_PROXY_SECRET": TEST_PROXY_SECRET})
    assert app.authenticator.scopes_required == frozenset({"write"})


# -- the identity headers: no CR/LF, no header of another's, never cut ---------------------

def _identity(claims: dict[str, Any], thumbprint: str | None = None) -> Identity:
    return Identity(claims, "t", thumbprint, "bearer")


@pytest.mark.parametrize(("claims", "expected"), [
    pytest.param({"sub": "alice\r\nX-Certbound-Scope: admin"},
                 {"X-Certbound-Sub": "alice%0D%0AX-Certbound-Scope:%20admin"}, id="crlf-injection"),
    pytest.param({"sub": " alice "}, {"X-Certbound-Sub": "%20alice%20"}, id="spaces-kept-distinct"),
    pytest.param({"sub": "100%"}, {"X-Certbound-Sub": "100%25"}, id="percent"),
    pytest.param({"sub": "jürgen"}, {"X-Certbound-Sub": "j%C3%BCrgen"}, id="non-ascii"),
    pytest.param({"sub": 42, "client_id": ["x"]}, {}, id="not-strings"),
    pytest.param({"sub": ""}, {}, id="empty"),
    pytest.param({"scope": "b a\tc"}, {"X-Certbound-Scope": "a b c"}, id="scope-sorted"),
    pytest.param({"scope": ["a b", "c\n"]}, {"X-Certbound-Scope": "a%20b c%0A"}, id="scope-list-items-encoded"),
])
def test_identity_values_are_encoded(claims: dict[str, Any], expected: dict[str, str]) -> None:
    assert dict(identity_headers(_identity(claims), "scope")) == expected


@pytest.mark.parametrize("name", ["sub", "client_id", "scope"])
def test_a_claim_too_long_is_refused_not_cut(name: str) -> None:
    at_limit = {name: "a" * MAX_IDENTITY_VALUE}
    assert len(dict(identity_headers(_identity(at_limit), "scope"))[IDENTITY_HEADERS[name]]) == MAX_IDENTITY_VALUE
    with pytest.raises(InvalidToken, match=f"the token's {name} is too long"):
        identity_headers(_identity({name: "a" * (MAX_IDENTITY_VALUE - 1) + "é"}), "scope")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sub=st.text(min_size=1, max_size=200))
def test_any_sub_is_a_safe_header_that_decodes_back(sub: str) -> None:
    (header, value), = identity_headers(_identity({"sub": sub}), "scope")
    assert header == "X-Certbound-Sub"
    assert re.fullmatch(r"[\x21-\x7e]+", value)
    assert unquote(value, errors="strict") == sub


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.text(max_size=40), uri=st.text(max_size=200))
def test_hostile_original_request_headers_are_4xx(issuer: TestIssuer, method: str, uri: str) -> None:
    client = endpoint(issuer)
    environ = {"REMOTE_ADDR": "127.0.0.1", "HTTP_X_ORIGINAL_METHOD": method, "HTTP_X_ORIGINAL_URI": uri,
               "HTTP_X_CERTBOUND_PROXY_SECRET": TEST_PROXY_SECRET}
    response = client.get("/_certbound/auth", environ_overrides=environ)
    assert response.status_code in (400, 401)


# -- the template: nginx --mode auth_request ----------------------------------------------

def _rendered(tmp_path: Path, **overrides: Any) -> str:
    args: dict[str, Any] = {"listen": "127.0.0.1:8443", "backend": "127.0.0.1:9000", "server_cert": tmp_path / "c",
                            "server_key": tmp_path / "k", "mode": "auth_request", "auth_backend": "127.0.0.1:9001",
                            "server_name": HOST, "proxy_secret": TEST_PROXY_SECRET}
    return render("gunicorn", **{**args, **overrides})


def test_the_template_is_filled_and_wired(tmp_path: Path) -> None:
    text = _rendered(tmp_path)
    assert not re.search(r"\{\{[a-z_]+\}\}", text)
    assert "server 127.0.0.1:9000;" in text and "server 127.0.0.1:9001;" in text
    auth = text[text.index("location = /_certbound/auth {"):text.index("location @certbound_401")]
    # The subrequest: internal, the original request and the certificate set by nginx, no body.
    for line in ("internal;", f"proxy_set_header {ORIGINAL_METHOD} $request_method;",
                 f'proxy_set_header X-Certbound-Proxy-Secret "{TEST_PROXY_SECRET}";',
                 f"proxy_set_header {ORIGINAL_URI} $request_uri;",
                 "proxy_set_header X-SSL-Client-Cert $ssl_client_escaped_cert;", "proxy_pass_request_body off;"):
        assert line in auth
    main_location = text[text.index("location / {"):text.index("location = /_certbound/auth")]
    # The secret is the auth app's: the protected upstream never gets it, nor a client's copy.
    assert TEST_PROXY_SECRET not in main_location
    assert 'proxy_set_header X-Certbound-Proxy-Secret "";' in main_location
    for name, header in IDENTITY_HEADERS.items():
        variable = f"$certbound_{name}"
        assert f"auth_request_set {variable} $upstream_http_{header.lower().replace('-', '_')};" in main_location
        assert f"proxy_set_header {header} {variable};" in main_location
    assert f"$upstream_http_{ERROR_HEADER.lower().replace('-', '_')}" in main_location
    for status in ("401", "403"):
        assert f"error_page {status} = @certbound_{status};" in main_location
        assert f"return {status} $certbound_auth_error;" in text
    assert "return 503 $certbound_auth_fault_body;" in text


@pytest.mark.parametrize(("overrides", "option"), [
    pytest.param({"auth_backend": "127.0.0.1:9001; }"}, "auth_backend", id="injection"),
    pytest.param({"auth_backend": None}, "auth_backend", id="missing"),
    pytest.param({"mode": "guess"}, "mode", id="unknown-mode"),
])
def test_invalid_auth_request_values(tmp_path: Path, overrides: dict[str, Any], option: str) -> None:
    with pytest.raises(ConfigurationError, match=f"^{option}:"):
        _rendered(tmp_path, **overrides)


def test_the_modes_do_not_mix(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"^upstream:"):
        render("uwsgi", listen="443", backend="127.0.0.1:1", server_cert=tmp_path, server_key=tmp_path,
               server_name=HOST, proxy_secret=TEST_PROXY_SECRET, mode="auth_request", auth_backend="127.0.0.1:2")
    with pytest.raises(ConfigurationError, match=r"^auth_backend:"):
        render("gunicorn", listen="443", backend="127.0.0.1:1", server_cert=tmp_path, server_key=tmp_path,
               server_name=HOST, proxy_secret=TEST_PROXY_SECRET, auth_backend="127.0.0.1:2")


def test_the_secret_is_required_for_the_auth_app_not_the_upstream(tmp_path: Path) -> None:
    """The channel rule of issue 11 applies to the auth app's backend: TCP needs the secret, a Unix socket
    does not (the auth app then trusts the socket); the protected upstream is not the one checked."""
    with pytest.raises(ConfigurationError, match=r"^proxy_secret_file:"):
        _rendered(tmp_path, proxy_secret=None)
    text = _rendered(tmp_path, proxy_secret=None, backend="127.0.0.1:9000", auth_backend="unix:/run/auth.sock")
    assert 'proxy_set_header X-Certbound-Proxy-Secret "";' in text and "server unix:/run/auth.sock;" in text


def test_the_command_renders_the_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    secret = tmp_path / "secret"
    secret.write_text(TEST_PROXY_SECRET)
    argv = ["nginx-config", "--mode", "auth_request", "--listen", "127.0.0.1:8443", "--backend", "127.0.0.1:9000",
            "--server-name", HOST, "--proxy-secret-file", str(secret), "--no-check-files",
            "--auth-backend", "127.0.0.1:9001", "--server-cert", str(tmp_path / "c"), "--server-key",
            str(tmp_path / "k")]
    assert main(argv) == 0
    assert capsys.readouterr().out == _rendered(tmp_path)
    assert main([*argv[:-6], "--server-cert", "c", "--server-key", "k"]) == 2
    assert "--auth-backend: required with mode auth_request" in capsys.readouterr().err


# -- the audit trail: one event per decision, about the request being authorized ------------

def test_each_decision_is_audited_with_the_original_request(issuer: TestIssuer, alice: Issued, mallory: Issued,
                                                            alice_x5t: str,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    client = endpoint(issuer, audit_log_format="json")
    token = issuer.token(cnf={"x5t#S256": alice_x5t})
    with caplog.at_level(logging.DEBUG, logger=LOGGER_NAME):
        assert subrequest(client, token=token, cert=alice, method="POST", uri="/orders/7?x=1").status_code == 200
        assert subrequest(client, token=token, cert=mallory, uri="/admin").status_code == 401
        assert subrequest(client, token=token, cert=alice, headers={ORIGINAL_URI: None}).status_code == 400
    events = [json.loads(record.getMessage()) for record in caplog.records if record.name == LOGGER_NAME]
    assert [(e["outcome"], e["reason"], e["status"], e["method"], e["path"]) for e in events] == [
        ("accepted", "ok", 200, "POST", "/orders/7"),
        ("refused", "cert_mismatch", 401, "GET", "/admin"),
        ("refused", "request_invalid", 400, "GET", "/_certbound/auth"),
    ]
    assert events[1]["presented"] == x5t_s256(mallory) and events[1]["bound"] == alice_x5t
