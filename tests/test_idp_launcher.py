"""The test identity provider (oidc-provider via tests/idp/launcher.mjs) does what the suite relies on."""

from __future__ import annotations

import secrets
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from joserfc import jwt
from joserfc.errors import InvalidKeyIdError
from joserfc.jwk import ECKey, KeySet

from certbound_wsgi.dev.pki import self_signed_client
from tests.support import idp_fixtures
from tests.support.browser import Browser, parse_forms
from tests.support.idp import (
    API_RESOURCE,
    OPAQUE_RESOURCE,
    WEB_CLIENT,
    AuthorizationRequest,
    OidcProvider,
    decode_jwt,
    x5t_s256,
)
from tests.support.idp_fixtures import Pki

pytestmark = pytest.mark.e2e

# The fixtures a conftest would import; bound here by assignment, which keeps
# ruff from reading every test argument as a redefined import.
pki = idp_fixtures.pki
idp = idp_fixtures.idp


def verified_claims(provider: OidcProvider, token: str) -> dict[str, Any]:
    """The claims of ``token`` once its signature checks out against the provider's JWKS."""
    keys = KeySet.import_key_set(provider.jwks())  # type: ignore[arg-type]
    return dict(jwt.decode(token, keys, algorithms=["ES256"]).claims)


def dpop_proof(key: ECKey, url: str, method: str = "POST") -> str:
    header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": key.as_dict(private=False)}
    claims = {"htm": method, "htu": url, "iat": int(time.time()), "jti": uuid.uuid4().hex}
    return jwt.encode(header, claims, key, algorithms=["ES256"])


# ----- tokens --------------------------------------------------------------


def test_bound_token_is_an_es256_at_jwt_bound_to_the_client_certificate(idp: OidcProvider, pki: Pki) -> None:
    token = idp.token("bound", cert=pki.alice)
    header, _ = decode_jwt(token)
    assert header["alg"] == "ES256"
    assert header["typ"] == "at+jwt"
    assert header["kid"] == idp.kid
    claims = verified_claims(idp, token)
    assert claims["cnf"] == {"x5t#S256": x5t_s256(pki.alice)}
    assert claims["aud"] == API_RESOURCE
    assert claims["iss"] == idp.issuer
    assert claims["client_id"] == "bound"
    assert claims["sub"] == "bound"
    assert isinstance(claims["exp"], int) and claims["exp"] - claims["iat"] == 600


def test_second_bound_client_gets_tokens_bound_to_its_own_certificate(idp: OidcProvider, pki: Pki) -> None:
    _, claims = decode_jwt(idp.token("bound2", cert=pki.mallory))
    assert claims["cnf"]["x5t#S256"] == x5t_s256(pki.mallory)
    assert claims["cnf"]["x5t#S256"] != x5t_s256(pki.alice)
    assert claims["client_id"] == "bound2"


@pytest.mark.parametrize("who", ["nobody", "mallory"])
def test_bound_client_needs_its_registered_certificate(idp: OidcProvider, pki: Pki, who: str) -> None:
    response = idp.token_response("bound", cert=pki.mallory if who == "mallory" else None)
    if who == "nobody":
        # token_response defaults to the registered certificate; send none at all.
        response = idp._post("/token", data={"grant_type": "client_credentials", "client_id": "bound"})
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


def test_unbound_token_has_no_cnf_even_when_a_certificate_is_presented(idp: OidcProvider, pki: Pki) -> None:
    for cert in (None, pki.alice):
        claims = verified_claims(idp, idp.token("unbound", cert=cert))
        assert "cnf" not in claims
        assert claims["client_id"] == "unbound"
        assert claims["aud"] == API_RESOURCE


def test_resource_defaults_to_api_test_and_any_https_api_resource_is_its_own_audience(idp: OidcProvider) -> None:
    assert decode_jwt(idp.token("unbound", resource=None))[1]["aud"] == "https://api.test"
    assert (
        decode_jwt(idp.token("unbound", resource="https://api.other.test/v1"))[1]["aud"] == "https://api.other.test/v1"
    )
    response = idp.token_response("unbound", resource="https://elsewhere.test")
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_target"


def test_scope_is_limited_to_what_the_resource_server_offers(idp: OidcProvider) -> None:
    response = idp.token_response("unbound", scope="read")
    assert response.json()["scope"] == "read"
    assert decode_jwt(response.json()["access_token"])[1]["scope"] == "read"
    assert "scope" not in decode_jwt(idp.token("unbound"))[1]


def test_dpop_proof_gives_a_dpop_bound_token(idp: OidcProvider) -> None:
    key = ECKey.generate_key("P-256", private=True)
    response = idp.token_response("unbound", dpop=dpop_proof(key, idp.token_endpoint))
    assert response.status_code == 200, response.text
    assert response.json()["token_type"] == "DPoP"
    assert decode_jwt(response.json()["access_token"])[1]["cnf"] == {"jkt": key.thumbprint()}


def test_discovery_advertises_mtls_bound_tokens_and_the_rfc8414_alias(idp: OidcProvider) -> None:
    metadata = idp.discovery()
    assert metadata["issuer"] == idp.issuer
    assert metadata["tls_client_certificate_bound_access_tokens"] is True
    assert metadata["token_endpoint"] == idp.token_endpoint
    assert metadata["introspection_endpoint"] == idp.introspection_endpoint
    assert metadata["jwks_uri"] == idp.jwks_uri
    assert "self_signed_tls_client_auth" in metadata["token_endpoint_auth_methods_supported"]
    assert "ES256" in metadata["dpop_signing_alg_values_supported"]
    assert idp._get("/.well-known/oauth-authorization-server").json() == metadata


# ----- introspection, revocation, counters -----------------------------------


def test_jwt_introspects_as_active_with_its_binding(idp: OidcProvider, pki: Pki) -> None:
    token = idp.token("bound", cert=pki.alice)
    _, claims = decode_jwt(token)
    result = idp.introspect(token)
    assert result["active"] is True
    assert result["client_id"] == "bound"
    assert result["aud"] == API_RESOURCE
    assert result["jti"] == claims["jti"]
    assert result["exp"] == claims["exp"]
    assert result["cnf"] == {"x5t#S256": x5t_s256(pki.alice)}
    assert result["token_type"] == "Bearer"


def test_altered_jwt_and_unknown_tokens_introspect_as_inactive(idp: OidcProvider, pki: Pki) -> None:
    token = idp.token("bound", cert=pki.alice)
    header, payload, signature = token.split(".")
    tampered = f"{header}.{payload}.{signature[:-4]}AAAA"
    assert idp.introspect(tampered) == {"active": False}
    assert idp.introspect("not-a-token") == {"active": False}


def test_only_the_resource_server_or_the_token_owner_may_introspect(idp: OidcProvider, pki: Pki) -> None:
    token = idp.token("bound", cert=pki.alice)
    assert idp.introspect(token, client="unbound") == {"active": False}
    own = idp.token("unbound")
    assert idp.introspect(own, client="unbound")["active"] is True


def test_opaque_token_introspects_as_active(idp: OidcProvider, pki: Pki) -> None:
    token = idp.token("unbound", resource=OPAQUE_RESOURCE)
    assert token.count(".") == 0  # not a JWT
    result = idp.introspect(token)
    assert result["active"] is True
    assert result["aud"] == OPAQUE_RESOURCE
    assert result["client_id"] == "unbound"
    bound = idp.introspect(idp.token("bound", cert=pki.alice, resource=OPAQUE_RESOURCE))
    assert bound["active"] is True
    assert bound["cnf"] == {"x5t#S256": x5t_s256(pki.alice)}


@pytest.mark.parametrize("resource", [API_RESOURCE, OPAQUE_RESOURCE])
def test_revoked_token_introspects_as_inactive(idp: OidcProvider, resource: str) -> None:
    token = idp.token("unbound", resource=resource)
    assert idp.introspect(token)["active"] is True
    idp.revoke(token)
    assert idp.introspect(token) == {"active": False}


def test_counters_count_token_and_introspection_requests(idp: OidcProvider, pki: Pki) -> None:
    idp.reset_stats()
    assert idp.stats() == {"tokens": 0, "introspections": 0, "revocations": 0, "jwks": 0}
    token = idp.token("bound", cert=pki.alice)
    opaque = idp.token("unbound", resource=OPAQUE_RESOURCE)
    idp.introspect(token)
    idp.introspect(opaque)
    idp.introspect(opaque)
    idp.jwks()
    assert idp.stats() == {"tokens": 2, "introspections": 3, "revocations": 0, "jwks": 1}
    idp.reset_stats()
    assert idp.stats()["introspections"] == 0


# ----- a provider of its own: restarts, rotation, tls_client_auth ---------------


@pytest.fixture(scope="module")
def own_idp(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    provider = OidcProvider(
        tmp_path_factory.mktemp("own-idp"),
        ca=pki.ca,
        bound={"bound": pki.alice},
        extra_clients=[{"client_id": "bound-dn", "auth": "tls_client_auth", "subject_dn": "CN=alice", "bound": True}],
        access_token_ttl=120,
    )
    with provider:
        yield provider


def test_tls_client_auth_needs_a_certificate_from_the_ca_with_the_registered_subject(
    own_idp: OidcProvider, pki: Pki, tmp_path: Path
) -> None:
    claims = decode_jwt(own_idp.token("bound-dn", cert=pki.alice))[1]
    assert claims["cnf"] == {"x5t#S256": x5t_s256(pki.alice)}
    assert claims["exp"] - claims["iat"] == 120
    for cert in (pki.mallory, self_signed_client(tmp_path, "alice")):
        response = own_idp.token_response("bound-dn", cert=cert)
        assert response.status_code == 401
        assert response.json()["error"] == "invalid_client"


def test_restart_with_a_new_key_rotates_the_signing_key_on_the_same_issuer(own_idp: OidcProvider, pki: Pki) -> None:
    issuer = own_idp.issuer
    before = own_idp.token("bound", cert=pki.alice)
    old_kid = decode_jwt(before)[0]["kid"]
    assert [k["kid"] for k in own_idp.jwks()["keys"]] == [old_kid]

    own_idp.restart(new_key=True)
    assert own_idp.issuer == issuer
    after = own_idp.token("bound", cert=pki.alice)
    new_kid = decode_jwt(after)[0]["kid"]
    assert new_kid != old_kid
    assert [k["kid"] for k in own_idp.jwks()["keys"]] == [new_kid]
    assert verified_claims(own_idp, after)["iss"] == issuer
    with pytest.raises(InvalidKeyIdError):  # the old token no longer verifies: its key is gone
        verified_claims(own_idp, before)
    assert own_idp.introspect(before) == {"active": False}  # the provider forgot it, too

    own_idp.restart(new_key=True, keep_old_key=True)
    newest = decode_jwt(own_idp.token("bound", cert=pki.alice))[0]["kid"]
    assert newest not in (old_kid, new_kid)
    assert [k["kid"] for k in own_idp.jwks()["keys"]] == [newest, new_kid]

    own_idp.restart()
    assert decode_jwt(own_idp.token("bound", cert=pki.alice))[0]["kid"] == newest


def test_launcher_is_quiet_and_stops_promptly_on_sigterm(own_idp: OidcProvider) -> None:
    own_idp.token("unbound")
    port = own_idp.port
    started = time.monotonic()
    own_idp.stop()
    assert time.monotonic() - started < 2.0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    lines = own_idp.log.read_text().splitlines()
    assert lines and all(line.startswith("READY ") for line in lines), lines
    own_idp.start()
    assert own_idp.port == port
    assert own_idp.stats()["tokens"] == 0


# ----- the browser login: authorization code + PKCE, without the middleware ------

# Nothing listens there: the login stops at the redirect to it (Browser.login's stop_at).
CALLBACK = "https://127.0.0.1:9/callback"


@pytest.fixture(scope="module")
def login_idp(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    with OidcProvider(tmp_path_factory.mktemp("login-idp"), ca=pki.ca, redirect_uris=[CALLBACK]) as provider:
        yield provider


def authorize(
    provider: OidcProvider, request: AuthorizationRequest, browser: Browser | None = None, username: str = "alice"
) -> dict[str, str]:
    """Log in through the IdP's pages; the query the IdP sends the browser back to the redirect_uri with."""
    browser = browser or Browser(provider.ca_file)
    response = browser.login(request.url, username, stop_at=request.redirect_uri)
    location = browser.location(response)
    assert location is not None and location.startswith(request.redirect_uri + "?"), (response.status_code, location)
    return {key: values[0] for key, values in parse_qs(urlsplit(location).query).items()}


def code_for(provider: OidcProvider, request: AuthorizationRequest, **kwargs: Any) -> str:
    query = authorize(provider, request, **kwargs)
    assert query["state"] == request.state
    return query["code"]


def test_code_flow_with_pkce_gives_an_es256_id_token_and_a_jwt_access_token_for_the_api(
    login_idp: OidcProvider,
) -> None:
    request = login_idp.authorization_request(CALLBACK)
    query = authorize(login_idp, request)
    assert query["state"] == request.state
    assert query["iss"] == login_idp.issuer  # RFC 9207
    response = login_idp.code_token_response(query["code"], CALLBACK, request.code_verifier)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 600
    assert "refresh_token" not in body

    header, _ = decode_jwt(body["id_token"])
    assert header == {"alg": "ES256", "kid": login_idp.kid}
    id_token = verified_claims(login_idp, body["id_token"])
    assert id_token["iss"] == login_idp.issuer
    assert id_token["aud"] == WEB_CLIENT
    assert id_token["nonce"] == request.nonce
    assert id_token["sub"] == "alice"
    assert id_token["email"] == "alice@example.test"
    assert id_token["email_verified"] is True
    assert id_token["name"] == "Alice"
    assert id_token["preferred_username"] == "alice"
    assert id_token["exp"] > id_token["iat"] >= int(time.time()) - 60

    assert decode_jwt(body["access_token"])[0]["typ"] == "at+jwt"
    access = verified_claims(login_idp, body["access_token"])
    assert access["aud"] == API_RESOURCE
    assert access["client_id"] == WEB_CLIENT
    assert access["sub"] == "alice"
    assert "cnf" not in access
    introspected = login_idp.introspect(body["access_token"])
    assert introspected["active"] is True
    assert introspected["sub"] == "alice"
    assert introspected["client_id"] == WEB_CLIENT
    login_idp.revoke(body["access_token"])
    assert login_idp.introspect(body["access_token"]) == {"active": False}


def test_code_flow_access_token_carries_the_api_scopes_asked_for_or_is_opaque_for_the_opaque_resource(
    login_idp: OidcProvider,
) -> None:
    request = login_idp.authorization_request(CALLBACK, scope="openid email read")
    body = login_idp.code_token_response(code_for(login_idp, request), CALLBACK, request.code_verifier).json()
    assert body["scope"] == "read"
    assert decode_jwt(body["access_token"])[1]["scope"] == "read"
    assert "name" not in decode_jwt(body["id_token"])[1]  # no profile scope

    request = login_idp.authorization_request(CALLBACK, resource=OPAQUE_RESOURCE)
    body = login_idp.code_token_response(code_for(login_idp, request), CALLBACK, request.code_verifier).json()
    assert body["access_token"].count(".") == 0
    assert login_idp.introspect(body["access_token"])["aud"] == OPAQUE_RESOURCE


def test_code_exchange_needs_the_code_verifier_the_redirect_uri_and_works_once(login_idp: OidcProvider) -> None:
    request = login_idp.authorization_request(CALLBACK)
    code = code_for(login_idp, request)
    assert request.code_verifier is not None
    for verifier, redirect_uri in (
        ("wrong-" + request.code_verifier[6:], CALLBACK),
        (None, CALLBACK),
        (request.code_verifier, CALLBACK + "/other"),
    ):
        response = login_idp.code_token_response(code, redirect_uri, verifier)
        assert response.status_code == 400
        assert response.json()["error"] == "invalid_grant"
    assert login_idp.code_token_response(code, CALLBACK, request.code_verifier).status_code == 200
    replay = login_idp.code_token_response(code, CALLBACK, request.code_verifier)
    assert replay.status_code == 400
    assert replay.json()["error"] == "invalid_grant"


@pytest.mark.parametrize(
    "params",
    [{}, {"code_challenge": "x" * 43, "code_challenge_method": "plain"}],
    ids=["no-pkce", "plain"],
)
def test_authorization_request_without_s256_pkce_is_refused(login_idp: OidcProvider, params: dict[str, str]) -> None:
    request = login_idp.authorization_request(CALLBACK, pkce=False, **params)
    browser = Browser(login_idp.ca_file)
    query = authorize(login_idp, request, browser)
    assert query["error"] == "invalid_request"
    assert query["state"] == request.state
    assert "code" not in query
    assert len(browser.history) == 1  # refused before any login page


def test_code_client_must_authenticate(login_idp: OidcProvider) -> None:
    request = login_idp.authorization_request(CALLBACK)
    code = code_for(login_idp, request)
    response = login_idp._post(
        "/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": CALLBACK,
            "code_verifier": request.code_verifier or "",
            "client_id": WEB_CLIENT,
        },
    )
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


def test_redirect_uris_change_at_once_without_a_restart(login_idp: OidcProvider) -> None:
    other = "https://127.0.0.1:10/oidc/callback"
    token = login_idp.token("unbound")
    port = login_idp.port
    browser = Browser(login_idp.ca_file)
    refused = browser.login(login_idp.authorization_request(other).url, stop_at=other)
    assert refused.status_code == 400  # an error page at the IdP: no redirect to an unregistered URI
    assert "redirect_uri did not match" in refused.text
    try:
        login_idp.set_redirect_uris([CALLBACK, other])
        assert login_idp.port == port
        assert login_idp.introspect(token)["active"] is True  # the same process: nothing forgotten
        assert "code" in authorize(login_idp, login_idp.authorization_request(other), browser)
        login_idp.set_redirect_uris([other])
        assert browser.login(login_idp.authorization_request(CALLBACK).url, stop_at=CALLBACK).status_code == 400
        with pytest.raises(ValueError, match="fragment"):
            login_idp.set_redirect_uris(["https://127.0.0.1:10/cb#x"])
        login_idp.restart()  # the URIs set survive a restart
        assert "code" in authorize(login_idp, login_idp.authorization_request(other))
    finally:
        login_idp.set_redirect_uris([CALLBACK])
    assert "code" in authorize(login_idp, login_idp.authorization_request(CALLBACK))


def test_the_idp_session_skips_login_and_consent_until_prompt_login(login_idp: OidcProvider) -> None:
    browser = Browser(login_idp.ca_file)
    authorize(login_idp, login_idp.authorization_request(CALLBACK), browser)
    assert [hop[2] for hop in browser.history] == [303, 200, 303, 303, 200, 303, 303]  # login, then consent
    assert "_session" in browser.cookies

    del browser.history[:]
    authorize(login_idp, login_idp.authorization_request(CALLBACK), browser)
    assert [hop[2] for hop in browser.history] == [303]  # straight back with a code

    del browser.history[:]
    request = login_idp.authorization_request(CALLBACK, prompt="login")
    code = code_for(login_idp, request, browser=browser, username="bob")
    paths = [urlsplit(url).path for _, url, _ in browser.history]
    assert "/session/end/confirm" in paths  # another account: alice's session is ended first
    id_token = decode_jwt(login_idp.code_token_response(code, CALLBACK, request.code_verifier).json()["id_token"])[1]
    assert (id_token["sub"], id_token["email"]) == ("bob", "bob@example.test")
    assert "auth_time" in id_token  # prompt=login asks for it


def test_login_page_form_as_parsed(login_idp: OidcProvider) -> None:
    browser = Browser(login_idp.ca_file)
    page = browser.follow(browser.get(login_idp.authorization_request(CALLBACK).url))
    assert page.status_code == 200
    assert urlsplit(page.url).path.startswith("/interaction/")
    [form] = parse_forms(page)
    assert form.method == "POST"
    assert form.action == page.url
    assert [(name, kind) for name, kind, _ in form.inputs] == [
        ("prompt", "hidden"),
        ("login", "text"),
        ("password", "password"),
    ]
    assert form.values()["prompt"] == "login"


def test_discovery_advertises_the_code_flow(login_idp: OidcProvider) -> None:
    metadata = login_idp.discovery()
    assert metadata["authorization_endpoint"] == login_idp.authorization_endpoint
    assert metadata["userinfo_endpoint"] == login_idp.userinfo_endpoint
    assert metadata["code_challenge_methods_supported"] == ["S256"]
    assert metadata["id_token_signing_alg_values_supported"] == ["ES256"]
    assert {"openid", "profile", "email"} <= set(metadata["scopes_supported"])
    assert "code" in metadata["response_types_supported"]
    assert metadata["authorization_response_iss_parameter_supported"] is True


# ----- Browser.login against a relying party of a few lines ------------------------


class RelyingParty:
    """A relying party in a thread, on HTTPS: ``/private`` needs its session; ``/callback`` makes one.

    The session cookie is ``rp_session`` (Secure, HttpOnly); ``/private`` answers
    ``<sub> <email> <CN of the client certificate or ->``. It asks for (and does
    not require) a client certificate.
    """

    def __init__(self, provider: OidcProvider, pki: Pki) -> None:
        self.provider = provider
        self.pending: dict[str, AuthorizationRequest] = {}
        self.sessions: dict[str, dict[str, Any]] = {}
        rp = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def reply(self, status: int, body: str = "", **headers: str) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name.replace("_", "-"), value)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body.encode())))
                self.end_headers()
                self.wfile.write(body.encode())

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                cookie = self.headers.get("Cookie", "")
                cookies = dict(part.strip().split("=", 1) for part in cookie.split(";") if "=" in part)
                if url.path == "/private":
                    claims = rp.sessions.get(cookies.get("rp_session", ""))
                    if claims is None:
                        request = rp.provider.authorization_request(rp.url + "/callback")
                        rp.pending[request.state] = request
                        return self.reply(302, Location=request.url)
                    peer = self.connection.getpeercert()
                    cn = dict(item[0] for item in peer["subject"])["commonName"] if peer else "-"
                    return self.reply(200, f"{claims['sub']} {claims['email']} {cn}")
                if url.path == "/callback":
                    query = {key: values[0] for key, values in parse_qs(url.query).items()}
                    state = query.get("state", "")
                    sent = rp.pending.pop(state) if state in rp.pending else None
                    if sent is None or "code" not in query:
                        return self.reply(400, "bad callback")
                    tokens = rp.provider.code_token_response(query["code"], sent.redirect_uri, sent.code_verifier)
                    claims = verified_claims(rp.provider, tokens.json()["id_token"])
                    if claims["nonce"] != sent.nonce or claims["aud"] != WEB_CLIENT:
                        return self.reply(400, "bad id token")
                    session = secrets.token_urlsafe(16)
                    rp.sessions[session] = claims
                    return self.reply(
                        302,
                        Location="/private",
                        Set_Cookie=f"rp_session={session}; Path=/; Secure; HttpOnly; SameSite=Lax",
                    )
                return self.reply(404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pki.server.cert_path, pki.server.key_path)
        context.load_verify_locations(pki.ca_file)
        context.verify_mode = ssl.CERT_OPTIONAL
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def relying_party(login_idp: OidcProvider, pki: Pki) -> Iterator[RelyingParty]:
    rp = RelyingParty(login_idp, pki)
    login_idp.set_redirect_uris([CALLBACK, rp.url + "/callback"])
    try:
        yield rp
    finally:
        login_idp.set_redirect_uris([CALLBACK])
        rp.close()


def test_browser_logs_in_to_a_relying_party_hop_by_hop(
    relying_party: RelyingParty, login_idp: OidcProvider, pki: Pki
) -> None:
    browser = Browser(pki.ca_file, cert=pki.alice)
    final = browser.login(relying_party.url + "/private", "carol", "secret")
    assert final.status_code == 200
    assert final.text == "carol carol@example.test alice"

    def where(url: str) -> str:
        """``app`` or ``idp``, and the first segment of the path (no interaction uids)."""
        parts = urlsplit(url)
        server = {relying_party.url: "app", login_idp.issuer: "idp"}[f"{parts.scheme}://{parts.netloc}"]
        return f"{server} /{parts.path.split('/')[1]}"

    assert [(method, where(url), status) for method, url, status in browser.history] == [
        ("GET", "app /private", 302),
        ("GET", "idp /auth", 303),  # the authorization request
        ("GET", "idp /interaction", 200),  # the login page
        ("POST", "idp /interaction", 303),
        ("GET", "idp /auth", 303),  # /auth/<uid>: resumed
        ("GET", "idp /interaction", 200),  # the consent page
        ("POST", "idp /interaction", 303),
        ("GET", "idp /auth", 303),
        ("GET", "app /callback", 302),
        ("GET", "app /private", 200),
    ]
    assert browser.get(relying_party.url + "/private").text.startswith("carol ")  # the session cookie holds
    assert browser.cookies.get("rp_session") in relying_party.sessions

    # Without a certificate, and a second browser: a login of its own.
    with Browser(pki.ca_file) as other:
        assert other.login(relying_party.url + "/private", "dave").text == "dave dave@example.test -"
