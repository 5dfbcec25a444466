"""The development issuer, driven in-process with ``werkzeug.test.Client``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from joserfc import jwt
from joserfc.jwk import ECKey
from werkzeug.test import Client

from certbound_wsgi.certificates import thumbprint_from_pem
from certbound_wsgi.dev.issuer import DevIssuer
from certbound_wsgi.dev.pki import DevCA, Issued

ISSUER = "https://127.0.0.1:8443"
AUDIENCE = "https://api.demo"
CLIENT_CREDENTIALS = {"grant_type": "client_credentials"}


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> DevCA:
    return DevCA(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def alice(ca: DevCA) -> Issued:
    return ca.client("alice")


@pytest.fixture(scope="module")
def issuer() -> DevIssuer:
    return DevIssuer(ISSUER, audience=AUDIENCE)


@pytest.fixture()
def client(issuer: DevIssuer) -> Iterator[Client]:
    yield Client(issuer)


def _token(client: Client, cert_value: str, **form: str) -> dict[str, Any]:
    response = client.post(
        "/token", data={**CLIENT_CREDENTIALS, **form}, environ_overrides={"SSL_CLIENT_CERT": cert_value}
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.headers["Cache-Control"] == "no-store"
    body: dict[str, Any] = response.get_json()
    return body


@pytest.mark.parametrize("path", [
    pytest.param("/.well-known/openid-configuration", id="openid-configuration"),
    pytest.param("/.well-known/oauth-authorization-server", id="rfc8414"),
])
@pytest.mark.parametrize(("field", "expected"), [
    pytest.param("issuer", ISSUER, id="issuer"),
    pytest.param("jwks_uri", f"{ISSUER}/jwks", id="jwks_uri"),
    pytest.param("token_endpoint", f"{ISSUER}/token", id="token_endpoint"),
    pytest.param("mtls_endpoint_aliases", {"token_endpoint": f"{ISSUER}/token"}, id="mtls_endpoint_aliases"),
    pytest.param("tls_client_certificate_bound_access_tokens", True, id="bound-tokens"),
    pytest.param("id_token_signing_alg_values_supported", ["ES256"], id="algs"),
    pytest.param("grant_types_supported", ["client_credentials"], id="grant_types"),
    pytest.param("token_endpoint_auth_methods_supported", ["self_signed_tls_client_auth"], id="auth_methods"),
])
def test_discovery_document(client: Client, path: str, field: str, expected: object) -> None:
    response = client.get(path)
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert response.get_json()[field] == expected


def test_jwks_publishes_the_public_signing_key_only(client: Client, issuer: DevIssuer) -> None:
    (key,) = client.get("/jwks").get_json()["keys"]
    assert key["kid"] == issuer.kid
    assert (key["kty"], key["crv"], key["alg"], key["use"]) == ("EC", "P-256", "ES256", "sig")
    assert "d" not in key


@pytest.mark.parametrize(("method", "cert", "form", "status", "error"), [
    pytest.param("POST", None, CLIENT_CREDENTIALS, 400, "invalid_client", id="no-cert-variable"),
    pytest.param("POST", "", CLIENT_CREDENTIALS, 400, "invalid_client", id="empty-cert"),
    pytest.param("POST", "not a certificate", CLIENT_CREDENTIALS, 400, "invalid_client", id="garbage-cert"),
    pytest.param("POST", "alice", {**CLIENT_CREDENTIALS, "client_id": "bob"}, 400, "invalid_client",
                 id="client_id-not-the-cert-cn"),
    pytest.param("POST", "alice", {"grant_type": "password"}, 400, "unsupported_grant_type", id="password-grant"),
    pytest.param("POST", "alice", {}, 400, "unsupported_grant_type", id="no-grant_type"),
    pytest.param("GET", "alice", {}, 405, "invalid_request", id="get"),
])
def test_token_endpoint_errors(
    client: Client, alice: Issued, method: str, cert: str | None, form: dict[str, str], status: int, error: str
) -> None:
    overrides = {} if cert is None else {"SSL_CLIENT_CERT": alice.cert_pem if cert == "alice" else cert}
    response = client.open("/token", method=method, data=form or None, environ_overrides=overrides)
    assert response.status_code == status
    assert response.get_json()["error"] == error
    assert response.get_json()["error_description"]
    assert response.headers["Cache-Control"] == "no-store"


def test_unknown_path_is_404(client: Client) -> None:
    assert client.get("/authorize").status_code == 404


@pytest.mark.parametrize("encode", [
    pytest.param(lambda pem: pem, id="pem"),
    pytest.param(quote, id="url-escaped-pem"),
])
def test_token_is_bound_to_the_client_certificate(
    client: Client, issuer: DevIssuer, alice: Issued, encode: Any
) -> None:
    body = _token(client, encode(alice.cert_pem), scope="read write")
    assert (body["token_type"], body["expires_in"], body["scope"]) == ("Bearer", 300, "read write")

    public = ECKey.import_key(client.get("/jwks").get_json()["keys"][0])
    token = jwt.decode(body["access_token"], public, algorithms=["ES256"])
    assert token.header == {"alg": "ES256", "typ": "at+jwt", "kid": issuer.kid}
    claims = token.claims
    assert claims["cnf"] == {"x5t#S256": thumbprint_from_pem(alice.cert_pem)}
    assert (claims["iss"], claims["sub"], claims["aud"], claims["client_id"], claims["scope"]) == (
        ISSUER, "alice", AUDIENCE, "alice", "read write"
    )
    assert claims["exp"] - claims["iat"] == 300
    assert claims["jti"]


def test_each_token_has_its_own_jti(client: Client, issuer: DevIssuer, alice: Issued) -> None:
    tokens = [_token(client, alice.cert_pem)["access_token"] for _ in range(2)]
    jtis = {jwt.decode(token, issuer.key).claims["jti"] for token in tokens}
    assert len(jtis) == 2


@pytest.mark.parametrize(("audience", "claim"), [
    pytest.param("https://a", "https://a", id="one-audience-is-a-string"),
    pytest.param(("https://a", "https://b"), ["https://a", "https://b"], id="several-are-a-list"),
])
def test_audience_claim(alice: Issued, audience: str | tuple[str, ...], claim: object) -> None:
    issuer = DevIssuer(ISSUER + "/", audience=audience)
    client = Client(issuer)
    body = _token(client, alice.cert_pem)
    claims = jwt.decode(body["access_token"], issuer.key).claims
    assert claims["aud"] == claim
    assert claims["iss"] == ISSUER  # the trailing slash is not part of the identifier


def test_issuer_says_it_is_for_development_only(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="certbound_wsgi.dev.issuer"):
        DevIssuer(ISSUER, audience=AUDIENCE)
    assert "DEVELOPMENT-ONLY" in caplog.text
    assert DevIssuer.__doc__ is not None and "DEVELOPMENT ONLY" in DevIssuer.__doc__


def test_needs_an_audience() -> None:
    with pytest.raises(ValueError, match="audience"):
        DevIssuer(ISSUER, audience=())
