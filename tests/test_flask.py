"""certbound_wsgi.flask: CertBound(app), current_claims and require_scope."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask, jsonify
from flask.testing import FlaskClient

from certbound_wsgi.dev.pki import Issued
from certbound_wsgi.errors import ConfigurationError
from certbound_wsgi.flask import CertBound, current_claims, require_scope
from certbound_wsgi.middleware import CertBoundMiddleware
from certbound_wsgi.settings import Settings
from tests.conftest import TEST_PROXY_SECRET, ViaProxy, bearer, cert_env
from tests.support.dpop import DPoPKey
from tests.support.refusals import assert_refused
from tests.support.tokens import AUDIENCE, ISSUER, StaticDiscovery, TestIssuer


def build_app(issuer: TestIssuer, **config: Any) -> tuple[Flask, CertBound]:
    app = Flask(__name__)
    app.config.update(CERTBOUND_ISSUER=ISSUER, CERTBOUND_AUDIENCE=[AUDIENCE], SECRET_KEY="not-an-option",
                      CERTBOUND_PROXY_SECRET=TEST_PROXY_SECRET, **config)

    @app.get("/claims")
    def claims() -> Any:
        return jsonify(sub=current_claims["sub"], claims=dict(current_claims))

    @app.post("/write")
    @require_scope("write")
    def write() -> Any:
        return jsonify(written=True)

    @app.get("/admin")
    @require_scope("admin", "read")
    def admin() -> Any:
        return jsonify(admin=True)

    extension = CertBound(app)
    # CertBound has no discovery= parameter: re-wrap the Flask app with the same settings (read from
    # app.config by the extension) and a StaticDiscovery, so that no test fetches over HTTP.
    assert extension.middleware is not None
    settings = extension.middleware.settings
    middleware = CertBoundMiddleware(extension.middleware.app, settings, discovery=StaticDiscovery(settings, issuer))
    extension.middleware = middleware
    app.wsgi_app = ViaProxy(middleware)  # type: ignore[method-assign]
    return app, extension


@pytest.fixture()
def client(issuer: TestIssuer) -> FlaskClient:
    return build_app(issuer, CERTBOUND_REALM="shop")[0].test_client()


def test_settings_come_from_app_config(issuer: TestIssuer) -> None:
    app, extension = build_app(issuer, CERTBOUND_LEEWAY=7, CERTBOUND_SCOPES_REQUIRED=["read"])
    assert app.extensions["certbound"] is extension
    assert extension.middleware is not None
    assert extension.middleware.settings.leeway == 7
    assert extension.middleware.settings.scopes_required == ("read",)


def test_bad_app_config_names_the_option(issuer: TestIssuer) -> None:
    app = Flask(__name__)
    app.config.update(CERTBOUND_ISSUER=ISSUER, CERTBOUND_AUDIENCE=[AUDIENCE], CERTBOUND_LEEWAY="soon")
    with pytest.raises(ConfigurationError) as info:
        CertBound(app)
    assert info.value.option == "leeway"


def test_current_claims_in_a_view(client: FlaskClient, alice: Issued, alice_token: str, alice_x5t: str) -> None:
    response = client.get("/claims", headers=bearer(alice_token), environ_overrides=cert_env(alice.cert_pem))
    assert response.status_code == 200
    assert response.json is not None
    assert response.json["sub"] == "alice"
    assert response.json["claims"]["cnf"] == {"x5t#S256": alice_x5t}


def test_current_claims_outside_a_protected_request(issuer: TestIssuer) -> None:
    app, _ = build_app(issuer)
    with app.test_request_context("/"):
        assert dict(current_claims) == {}


def test_views_are_protected(client: FlaskClient, issuer: TestIssuer, mallory: Issued, alice_token: str) -> None:
    assert client.get("/claims").status_code == 401
    assert client.get("/claims").headers["WWW-Authenticate"] == 'Bearer realm="shop"'
    stolen = client.get("/claims", headers=bearer(alice_token), environ_overrides=cert_env(mallory.cert_pem))
    assert stolen.status_code == 401
    assert stolen.json is not None and stolen.json["error"] == "invalid_token"


@pytest.mark.parametrize(
    ("path", "method", "scope", "status", "missing"),
    [
        pytest.param("/write", "POST", "read write", 200, None, id="write-with-scope"),
        pytest.param("/write", "POST", "read", 403, "write", id="write-without-scope"),
        pytest.param("/write", "POST", None, 403, "write", id="write-no-scope-claim"),
        pytest.param("/write", "POST", "writer", 403, "write", id="write-no-substring-match"),
        pytest.param("/admin", "GET", "read write", 403, "admin read", id="admin-lacks-one"),
        pytest.param("/admin", "GET", "admin read", 200, None, id="admin-with-both"),
    ],
)
def test_require_scope(
    path: str,
    method: str,
    scope: str | None,
    status: int,
    missing: str | None,
    client: FlaskClient,
    issuer: TestIssuer,
    alice: Issued,
    alice_x5t: str,
) -> None:
    token = issuer.token(scope=scope, cnf={"x5t#S256": alice_x5t})
    response = client.open(path, method=method, headers=bearer(token), environ_overrides=cert_env(alice.cert_pem))
    assert response.status_code == status
    if missing is None:
        return
    assert_refused(response, 403, "insufficient_scope", "the token lacks a required scope", scope=missing,
                   realm="shop")


@pytest.mark.parametrize(
    ("dpop", "scheme", "offered"),
    [
        pytest.param("optional", "DPoP", ("Bearer", "DPoP"), id="dpop-request-on-dpop"),
        pytest.param("optional", "Bearer", ("Bearer", "DPoP"), id="bearer-request-on-bearer"),
        pytest.param("strict", "DPoP", ("DPoP",), id="strict-dpop-only"),
    ],
)
def test_require_scope_challenges_like_the_middleware(dpop: str, scheme: str, offered: tuple[str, ...],
                                                     issuer: TestIssuer) -> None:
    """RFC 9449 section 7.1: the 403 lists every offered scheme, the error on the request's own."""
    app, _ = build_app(issuer, CERTBOUND_PROOF_OF_POSSESSION_DPOP=dpop, CERTBOUND_PROOF_OF_POSSESSION_MTLS="off",
                       CERTBOUND_PUBLIC_BASE_URL="http://localhost")
    key = DPoPKey()
    token = issuer.token(scope="read", cnf={"jkt": key.jkt}) if scheme == "DPoP" else issuer.token(scope="read")
    headers = {"Authorization": f"{scheme} {token}"}
    if scheme == "DPoP":
        headers["DPoP"] = key.proof("POST", "http://localhost/write", token)
    response = app.test_client().post("/write", headers=headers)
    assert_refused(response, 403, "insufficient_scope", "the token lacks a required scope", scope="write",
                   scheme=scheme, offered=offered)


@pytest.mark.parametrize(
    ("scp", "status"),
    [pytest.param(["write"], 200, id="scp-list-has-write"), pytest.param(["read"], 403, id="scp-list-lacks-write")],
)
def test_require_scope_uses_the_configured_claim(
    scp: list[str], status: int, issuer: TestIssuer, alice: Issued, alice_x5t: str
) -> None:
    client = build_app(issuer, CERTBOUND_SCOPES_CLAIM="scp")[0].test_client()
    token = issuer.token(scope="write", scp=scp, cnf={"x5t#S256": alice_x5t})
    response = client.post("/write", headers=bearer(token), environ_overrides=cert_env(alice.cert_pem))
    assert response.status_code == status


def test_explicit_settings_and_init_app(issuer: TestIssuer, alice: Issued, alice_token: str) -> None:
    extension = CertBound(settings=Settings(issuer=ISSUER, audience=(AUDIENCE,), realm="late",
                                            proxy_secret=TEST_PROXY_SECRET))
    assert extension.middleware is None
    app = Flask(__name__)
    app.add_url_rule("/", "index", lambda: "ok")
    extension.init_app(app)
    assert extension.middleware is not None and app.wsgi_app is extension.middleware
    assert extension.middleware.settings.realm == "late"
    assert app.test_client().get("/").headers["WWW-Authenticate"] == 'Bearer realm="late"'
