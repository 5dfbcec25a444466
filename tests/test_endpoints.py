"""certbound_wsgi.endpoints: which requests are the middleware's own, and how their refusals are answered."""

from __future__ import annotations

from typing import Any

import pytest
from werkzeug.test import Client

from certbound_wsgi.errors import AuthError
from certbound_wsgi.middleware import CertBoundMiddleware
from certbound_wsgi.types import WSGIApplication, WSGIEnvironment
from tests.conftest import CountingApp, make_settings
from tests.support.refusals import assert_refused
from tests.support.session_options import LOGIN as SESSION_LOGIN
from tests.support.tokens import StaticDiscovery, TestIssuer

LOGIN: dict[str, Any] = {**SESSION_LOGIN, "logout_path": "/logout"}
HTML = "text/html,application/xhtml+xml"


def middleware(issuer: TestIssuer, **overrides: Any) -> CertBoundMiddleware:
    settings = make_settings(**{**LOGIN, **overrides})
    return CertBoundMiddleware(CountingApp(), settings, discovery=StaticDiscovery(settings, issuer))


def environ(path: str, method: str = "GET", script_name: str = "", accept: str = "") -> WSGIEnvironment:
    return {"REQUEST_METHOD": method, "SCRIPT_NAME": script_name, "PATH_INFO": path, "HTTP_ACCEPT": accept}


@pytest.mark.parametrize(
    ("path", "method", "script_name", "endpoint"),
    [
        pytest.param("/logout", "POST", "", "logout", id="logout-post"),
        pytest.param("/logout", "GET", "", None, id="logout-get-is-the-apps"),
        pytest.param("/logout/", "POST", "", None, id="logout-exact-path-only"),
        pytest.param("/logout", "POST", "/app", None, id="logout-path-includes-script-name"),
        pytest.param("/callback", "GET", "", "login.callback", id="callback"),
        pytest.param("/callback", "POST", "", "login.callback", id="callback-any-method"),
        pytest.param("/orders", "GET", "", None, id="the-apps"),
    ],
)
def test_match(path: str, method: str, script_name: str, endpoint: str | None, issuer: TestIssuer) -> None:
    endpoints = middleware(issuer).endpoints
    assert endpoints is not None
    matched = endpoints.match(environ(path, method, script_name))
    expected = {"logout": endpoints.logout, "login.callback": endpoints.login and endpoints.login.callback}
    assert matched == (expected[endpoint] if endpoint else None)


def test_no_endpoints_without_sessions(issuer: TestIssuer) -> None:
    assert middleware(issuer, auth_methods=("bearer",), logout_path="").endpoints is None


@pytest.mark.parametrize(
    ("method", "accept", "overrides", "login"),
    [
        pytest.param("GET", HTML, {}, True, id="browser-navigation"),
        pytest.param("HEAD", HTML, {}, True, id="browser-head"),
        pytest.param("POST", HTML, {}, False, id="post-is-not-a-navigation"),
        pytest.param("GET", "application/json", {}, False, id="api-call"),
        pytest.param("GET", HTML, {"auth_methods": ("bearer", "session")}, False, id="no-login-configured"),
    ],
)
def test_login_page(method: str, accept: str, overrides: dict[str, Any], login: bool, issuer: TestIssuer) -> None:
    endpoints = middleware(issuer, **overrides).endpoints
    assert endpoints is not None
    page = endpoints.login_page(environ("/orders", method, accept=accept))
    assert page == (endpoints.login.start if login and endpoints.login else None)


def test_endpoint_refusals_go_through_on_error(issuer: TestIssuer) -> None:
    """One seam for every refusal: the endpoints' as well as the protected app's."""
    seen: list[AuthError] = []

    def on_error(environ: WSGIEnvironment, error: AuthError) -> WSGIApplication:
        seen.append(error)
        return error

    mw = middleware(issuer)
    mw.on_error = on_error
    response = Client(mw).get("/callback", query_string={"state": "s"})  # type: ignore[arg-type]
    assert_refused(response, 400, "invalid_request", "the login callback lacks code or state")
    assert [type(error).__name__ for error in seen] == ["InvalidRequest"]
    # The state cookie is host-only with Path=/, so it takes the __Host- prefix (issue 12).
    assert response.headers.getlist("Set-Cookie") == ["__Host-session_login=; Path=/; Max-Age=0; Secure; HttpOnly; "
                                                      "SameSite=Lax"]
