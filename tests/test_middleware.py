"""certbound_wsgi.middleware: the whole request path, through werkzeug's test client."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pytest
from werkzeug.test import Client

from certbound_wsgi.authenticator import token_scopes
from certbound_wsgi.dev.echo import echo_app
from certbound_wsgi.dev.pki import Issued
from certbound_wsgi.discovery import PublicKey
from certbound_wsgi.errors import AuthError
from certbound_wsgi.middleware import CertBoundMiddleware
from certbound_wsgi.types import StartResponse, WSGIApplication, WSGIEnvironment
from tests.conftest import CountingApp, MakeClient, bearer, cert_env, make_settings, middleware_of
from tests.support.refusals import assert_refused
from tests.support.tokens import ISSUER, StaticDiscovery, TestIssuer


def test_valid_request_reaches_the_app(
    make_client: MakeClient, alice: Issued, alice_token: str, alice_x5t: str
) -> None:
    app = CountingApp()
    response = make_client(app).get("/orders?x=1", headers=bearer(alice_token),
                                    environ_overrides=cert_env(alice.cert_pem))
    assert response.status_code == 200
    body = response.json
    assert body is not None
    assert body["claims"]["sub"] == "alice"
    assert body["claims"]["iss"] == ISSUER
    assert body["claims"]["cnf"] == {"x5t#S256": alice_x5t}
    assert body["remote_user"] == "alice"
    assert body["thumbprint"] == alice_x5t
    assert body["auth_method"] == "bearer"
    assert body["path"] == "/orders" and body["query"] == "x=1"
    assert "Authorization" not in body["headers"]
    (environ,) = app.calls
    assert environ["certbound.token"] == alice_token
    assert environ["certbound.thumbprint"] == alice_x5t
    assert environ["certbound.method"] == "bearer"
    assert environ["REMOTE_USER"] == "alice"


def test_no_sub_no_remote_user(make_client: MakeClient, issuer: TestIssuer, alice: Issued, alice_x5t: str) -> None:
    app = CountingApp()
    token = issuer.token(sub=None, cnf={"x5t#S256": alice_x5t})
    response = make_client(app).get("/", headers=bearer(token), environ_overrides=cert_env(alice.cert_pem))
    assert response.status_code == 200
    assert "REMOTE_USER" not in app.calls[0]


class BrokenDiscovery(StaticDiscovery):
    def keys_for(self, kid: str | None) -> list[PublicKey]:
        raise RuntimeError("Traceback: secret internal detail /etc/passwd")


def _two_tokens(alice_token: str) -> dict[str, Any]:
    return {"headers": bearer(alice_token), "query_string": {"access_token": alice_token}}


REFUSALS: list[Any] = [
    pytest.param({}, lambda h: {}, 401, id="missing-token"),
    pytest.param({}, lambda h: {"headers": bearer("not-a-jwt")}, 401, id="not-a-jwt"),
    pytest.param({}, lambda h: {"headers": bearer(h["expired"])}, 401, id="expired"),
    pytest.param({}, lambda h: {"headers": bearer(h["token"]), "environ_overrides": cert_env(h["mallory"])}, 401,
                 id="other-certificate"),
    pytest.param({}, lambda h: {"headers": bearer(h["token"])}, 401, id="no-certificate"),
    pytest.param({"bearer_token_param_type": ["header", "query"]},
                 lambda h: {**_two_tokens(h["token"]), "environ_overrides": cert_env(h["alice"])}, 400,
                 id="two-tokens"),
    pytest.param({"scopes_required": ["admin"]},
                 lambda h: {"headers": bearer(h["token"]), "environ_overrides": cert_env(h["alice"])}, 403,
                 id="insufficient-scope"),
    pytest.param({"down": True}, lambda h: {"headers": bearer(h["token"]), "environ_overrides": cert_env(h["alice"])},
                 503, id="issuer-down"),
    pytest.param({"broken": True},
                 lambda h: {"headers": bearer(h["token"]), "environ_overrides": cert_env(h["alice"])}, 500,
                 id="internal-error"),
]


@pytest.mark.parametrize(("overrides", "request_kwargs", "status"), REFUSALS)
def test_the_app_is_never_called_on_refusal(
    overrides: dict[str, Any],
    request_kwargs: Callable[[dict[str, str]], dict[str, Any]],
    status: int,
    make_client: MakeClient,
    issuer: TestIssuer,
    alice: Issued,
    mallory: Issued,
    alice_token: str,
    alice_x5t: str,
) -> None:
    overrides = dict(overrides)
    issuer.down = overrides.pop("down", False)
    discovery = None
    if overrides.pop("broken", False):
        discovery = BrokenDiscovery(make_settings(), issuer)
    app = CountingApp()
    client = make_client(app, discovery=discovery, **overrides)
    handles = {"token": alice_token, "alice": alice.cert_pem, "mallory": mallory.cert_pem,
               "expired": issuer.token(exp=1, cnf={"x5t#S256": alice_x5t})}
    response = client.get("/", **request_kwargs(handles))
    assert response.status_code == status
    assert app.calls == []
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["WWW-Authenticate"].startswith('Bearer realm="api"')
    assert response.json is not None and response.json["error"]


def test_missing_token_challenge_has_no_error(make_client: MakeClient) -> None:
    response = make_client().get("/")
    assert response.status_code == 401
    assert response.headers.getlist("WWW-Authenticate") == ['Bearer realm="api"']
    assert response.json == {"error": "unauthorized", "error_description": "an access token is required"}
    assert int(response.headers["Content-Length"]) == len(response.get_data())


def test_realm_is_configurable(make_client: MakeClient) -> None:
    assert make_client(realm="orders").get("/").headers["WWW-Authenticate"] == 'Bearer realm="orders"'


@pytest.mark.parametrize(
    ("request_kwargs", "status", "challenges"),
    [
        pytest.param({}, 401, ['Bearer realm="api"'], id="missing-token"),
        pytest.param({"headers": {"Authorization": "Bearer not-a-jwt"}}, 401,
                     ['Bearer realm="api", error="invalid_token", error_description="the access token is not a JWT"'],
                     id="invalid-token"),
        pytest.param({"headers": {"Authorization": "Bearer "}}, 400,
                     ['Bearer realm="api", error="invalid_request", '
                      'error_description="the Authorization header has no token"'], id="invalid-request"),
    ],
)
def test_on_error_makes_every_refusal(request_kwargs: dict[str, Any], status: int, challenges: list[str],
                                      issuer: TestIssuer) -> None:
    """The one seam for the error response (starlette's on_error): it gets the error with its challenges."""
    seen: list[tuple[int, list[str]]] = []

    def on_error(environ: WSGIEnvironment, error: AuthError) -> WSGIApplication:
        seen.append((error.status, list(error.www_authenticate)))

        def teapot(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
            start_response("418 I'm a teapot", [("Content-Type", "text/plain")])
            return [b"refused"]

        return teapot

    app = CountingApp()
    settings = make_settings()
    mw = CertBoundMiddleware(app, settings, discovery=StaticDiscovery(settings, issuer), on_error=on_error)
    response = Client(mw).get("/", **request_kwargs)  # type: ignore[arg-type]
    assert (response.status_code, response.data) == (418, b"refused")
    assert seen == [(status, challenges)]
    assert app.calls == []


@pytest.mark.parametrize(
    ("required", "claim", "token_scopes_value", "status"),
    [
        pytest.param(["read"], "scope", "read write", 200, id="has-scope"),
        pytest.param(["read", "write"], "scope", "read write", 200, id="has-all-scopes"),
        pytest.param(["admin"], "scope", "read write", 403, id="lacks-scope"),
        pytest.param(["read", "admin"], "scope", "read write", 403, id="lacks-one-of-two"),
        pytest.param(["read"], "scope", "reader", 403, id="no-substring-match"),
        pytest.param(["read"], "scope", None, 403, id="no-scope-claim"),
        pytest.param(["read"], "scope", ["read"], 200, id="scope-as-list"),
        pytest.param(["read"], "scope", 42, 403, id="scope-not-a-string"),
        pytest.param(["read"], "scp", ["read", 5], 200, id="scp-claim-list"),
        pytest.param(["read"], "scp", "read", 200, id="scp-claim-string"),
        pytest.param([], "scope", None, 200, id="nothing-required"),
    ],
)
def test_scopes_required(
    required: list[str],
    claim: str,
    token_scopes_value: Any,
    status: int,
    make_client: MakeClient,
    issuer: TestIssuer,
    alice: Issued,
    alice_x5t: str,
) -> None:
    scopes: dict[str, Any] = {"scope": None, claim: token_scopes_value}
    token = issuer.token(cnf={"x5t#S256": alice_x5t}, **scopes)
    response = make_client(scopes_required=required, scopes_claim=claim).get(
        "/", headers=bearer(token), environ_overrides=cert_env(alice.cert_pem)
    )
    if status == 403:
        assert_refused(response, 403, "insufficient_scope", "the token lacks a required scope",
                       scope=" ".join(sorted(required)))
    else:
        assert response.status_code == status


@pytest.mark.parametrize(
    ("claims", "expected"),
    [
        pytest.param({"scope": "a  b\tc"}, {"a", "b", "c"}, id="whitespace-separated"),
        pytest.param({"scope": ""}, set(), id="empty"),
        pytest.param({"scope": ["a", 1, None]}, {"a"}, id="list-with-junk"),
        pytest.param({"scope": {"a": 1}}, set(), id="object"),
        pytest.param({}, set(), id="absent"),
    ],
)
def test_token_scopes(claims: dict[str, Any], expected: set[str]) -> None:
    assert token_scopes(claims, "scope") == expected


def test_internal_error_is_500_without_details(
    make_client: MakeClient, issuer: TestIssuer, alice: Issued, alice_token: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = CountingApp()
    client = make_client(app, discovery=BrokenDiscovery(make_settings(), issuer))
    response = client.get("/", headers=bearer(alice_token), environ_overrides=cert_env(alice.cert_pem))
    assert response.status_code == 500
    assert response.json == {"error": "server_error", "error_description": "internal error"}
    text = response.get_data(as_text=True)
    for leak in ("Traceback", "RuntimeError", "secret", "/etc/passwd"):
        assert leak not in text
    assert app.calls == []
    # The traceback goes to the log, for the operator.
    assert any(record.exc_info and "secret internal detail" in str(record.exc_info[1]) for record in caplog.records)


App = Callable[[WSGIEnvironment, StartResponse], Iterable[bytes]]


def _mutating_app(mutate: Callable[[dict[str, Any]], None]) -> App:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        result = echo_app(environ, start_response)
        mutate(environ["certbound.claims"])
        return result

    return app


def _set_sub(claims: dict[str, Any]) -> None:
    claims["sub"] = "mallory"


def _drop_cnf(claims: dict[str, Any]) -> None:
    claims.pop("cnf")


def _clear(claims: dict[str, Any]) -> None:
    claims.clear()


def _rebind_cnf(claims: dict[str, Any]) -> None:
    claims["cnf"]["x5t#S256"] = "mallory's thumbprint"


def _grow_scope_list(claims: dict[str, Any]) -> None:
    claims["scp"].append("admin")


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(_set_sub, id="top-level-value"),
        pytest.param(_drop_cnf, id="top-level-delete"),
        pytest.param(_clear, id="clear"),
        pytest.param(_rebind_cnf, id="nested-cnf"),
        pytest.param(_grow_scope_list, id="nested-scope-list"),
    ],
)
def test_claims_in_environ_are_a_copy(
    mutate: Callable[[dict[str, Any]], None],
    make_client: MakeClient,
    issuer: TestIssuer,
    alice: Issued,
    mallory: Issued,
    alice_x5t: str,
) -> None:
    client = make_client(_mutating_app(mutate), proof_of_possession_mtls="optional")
    token = issuer.token(cnf={"x5t#S256": alice_x5t}, scp=["read"])
    first = client.get("/", headers=bearer(token), environ_overrides=cert_env(alice.cert_pem))
    assert first.status_code == 200
    memo = middleware_of(client).jwt
    assert memo is not None and memo.memo_size() == 1
    second = client.get("/", headers=bearer(token), environ_overrides=cert_env(alice.cert_pem))
    assert second.status_code == 200
    assert second.json is not None
    assert second.json["claims"]["sub"] == "alice"
    assert second.json["claims"]["cnf"] == {"x5t#S256": alice_x5t}
    assert second.json["claims"]["scp"] == ["read"]
    # The binding still holds: mallory's certificate is refused.
    assert client.get("/", headers=bearer(token), environ_overrides=cert_env(mallory.cert_pem)).status_code == 401


def test_memo_hit_skips_discovery(make_client: MakeClient, alice: Issued, alice_token: str) -> None:
    client = make_client()
    for _ in range(3):
        response = client.get("/", headers=bearer(alice_token), environ_overrides=cert_env(alice.cert_pem))
        assert response.status_code == 200
    middleware = middleware_of(client)
    assert isinstance(middleware.discovery, StaticDiscovery)
    assert middleware.discovery.fetches == 1
    assert middleware.jwt is not None and middleware.jwt.memo_size() == 1
