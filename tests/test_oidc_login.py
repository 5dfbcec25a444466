"""The browser login (certbound_wsgi.oidc_login), through the middleware.

Requests go through werkzeug's test client (``http://localhost``) with
``use_cookies=False``: every ``Cookie`` header is written by the test. The
issuer's token endpoint is a stand-in for the login's HTTP session; the real
issuer's login is in ``tests/e2e/test_sessions.py``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from werkzeug.test import Client, TestResponse

from certbound_wsgi.cache.seal import Sealer
from certbound_wsgi.dev.pki import Issued
from certbound_wsgi.oidc_login import LOGIN_TTL, MAX_TOKEN_RESPONSE, wants_html
from tests.conftest import middleware_of
from tests.support.dpop import DPoPKey
from tests.support.tokens import ISSUER, TestIssuer
from tests.test_sessions import (
    LOGIN,
    OTHER_SECRET,
    STATE_COOKIE,
    app_of,
    attributes,
    build,
    clears,
    description,
    get,
    new_cookie,
    set_cookie_values,
)


def b64url_sha256(text: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(text.encode("ascii")).digest()).rstrip(b"=").decode()


# -- the browser login ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "accept", "expected"), [
    pytest.param("GET", "text/html,application/xhtml+xml,*/*;q=0.8", True, id="browser-get"),
    pytest.param("HEAD", "text/html", True, id="browser-head"),
    pytest.param("POST", "text/html", False, id="post"),
    pytest.param("PUT", "text/html", False, id="put"),
    pytest.param("GET", "application/json", False, id="json"),
    pytest.param("GET", "*/*", False, id="anything"),
    pytest.param("GET", None, False, id="no-accept"),
    pytest.param(None, "text/html", False, id="no-method"),
])
def test_wants_html(method: str | None, accept: str | None, expected: bool) -> None:
    environ: dict[str, Any] = {}
    if method is not None:
        environ["REQUEST_METHOD"] = method
    if accept is not None:
        environ["HTTP_ACCEPT"] = accept
    assert wants_html(environ) is expected


HTML = {"Accept": "text/html,application/xhtml+xml"}


def browser(issuer: TestIssuer, **overrides: Any) -> Client:
    issuer.metadata["authorization_endpoint"] = ISSUER + "/authorize"
    issuer.metadata["token_endpoint"] = ISSUER + "/token"
    return build(issuer, **{**LOGIN, **overrides})


def start_login(client: Client, path: str = "/orders?x=1",
                environ: dict[str, str] | None = None) -> tuple[TestResponse, dict[str, str]]:
    response = client.get(path, headers=HTML, environ_overrides=environ or {})
    assert response.status_code == 302
    return response, dict(parse_qsl(urlsplit(response.headers["Location"]).query))


def test_login_start_redirects_to_the_issuer_with_pkce(issuer: TestIssuer) -> None:
    client = browser(issuer)
    mw = middleware_of(client)
    assert mw.sessions is not None
    response, params = start_login(client)
    location = urlsplit(response.headers["Location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == ISSUER + "/authorize"
    assert set(params) == {"response_type", "client_id", "redirect_uri", "scope", "state", "nonce", "code_challenge",
                           "code_challenge_method"}
    assert params["response_type"] == "code"
    assert params["client_id"] == "app"
    assert params["redirect_uri"] == "https://app.test/callback"
    assert params["scope"] == "openid profile"
    assert params["code_challenge_method"] == "S256"
    assert len({params["state"], params["nonce"], params["code_challenge"]}) == 3
    assert response.headers["Cache-Control"] == "no-store"
    assert app_of(client).calls == []
    # The state cookie: the state, then the login sealed to it, host-only, for the login's lifetime only.
    (state_cookie,) = set_cookie_values(response, STATE_COOKIE)
    assert state_cookie.rpartition(".")[0] == params["state"]
    assert attributes(response, STATE_COOKIE) == {"Path=/", f"Max-Age={LOGIN_TTL}", "Secure", "HttpOnly",
                                                  "SameSite=Lax"}
    assert set_cookie_values(response) == []  # no session yet
    # The browser carries the verifier, sealed; the issuer gets only its S256 hash (RFC 7636 section 4.2).
    login_record = opened_login(client, state_cookie, params["state"])
    verifier = login_record["v"]
    assert 43 <= len(verifier) <= 128
    assert params["code_challenge"] == b64url_sha256(verifier)
    assert login_record["n"] == params["nonce"]
    assert login_record["r"] == "/orders?x=1"
    assert params["nonce"] not in state_cookie and verifier not in state_cookie


def opened_login(client: Client, state_cookie: str | None, state: str) -> dict[str, Any]:
    """The login sealed in ``state_cookie`` for ``state``, opened as the callback opens it."""
    login_flow = middleware_of(client).login
    assert login_flow is not None
    return login_flow._login_of({"HTTP_COOKIE": f"{STATE_COOKIE}={state_cookie}"}, state)


def test_each_login_start_is_fresh(issuer: TestIssuer) -> None:
    client = browser(issuer)
    starts = [start_login(client)[1] for _ in range(3)]
    for name in ("state", "nonce", "code_challenge"):
        assert len({params[name] for params in starts}) == 3


@pytest.mark.parametrize(("method", "headers", "status"), [
    pytest.param("GET", {"Accept": "application/json"}, 401, id="api-get"),
    pytest.param("GET", {}, 401, id="no-accept"),
    pytest.param("POST", HTML, 401, id="browser-post"),
    pytest.param("GET", HTML, 302, id="browser-get"),
])
def test_only_browser_navigations_are_redirected(
    issuer: TestIssuer, method: str, headers: dict[str, str], status: int
) -> None:
    client = browser(issuer)
    response = client.open("/orders", method=method, headers=headers)
    assert response.status_code == status
    if status == 401:
        assert "Location" not in response.headers
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="api"'
        assert response.headers["Content-Type"] == "application/json"
    else:
        assert response.headers["Location"].startswith(ISSUER + "/authorize?")
    assert app_of(client).calls == []


@pytest.mark.parametrize("path_info", [
    pytest.param("//evil.example", id="double-slash"),
    pytest.param("///evil.example/x", id="triple-slash"),
    pytest.param("//evil.example/?next=//evil", id="double-slash-with-slash-path"),
    pytest.param("/\\evil.example", id="backslash"),
    pytest.param("/%2F/evil.example", id="encoded-slash"),
])
def test_the_return_path_is_never_an_open_redirect(issuer: TestIssuer, path_info: str) -> None:
    client = browser(issuer)
    mw = middleware_of(client)
    assert mw.sessions is not None
    start, params = start_login(client, "/", environ={"PATH_INFO": path_info})
    return_to = opened_login(client, new_cookie(start, STATE_COOKIE), params["state"])["r"]
    assert return_to.startswith("/") and not return_to.startswith("//") and "\\" not in return_to
    assert urlsplit(return_to).netloc == ""


class FakeStream:
    """urllib3's response stream, as far as the JSON client reads it; records how much was asked for."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)
        self.asked: list[int] = []

    def read(self, amount: int, decode_content: bool = False) -> bytes:
        assert decode_content  # the cap counts decoded bytes: a small gzip bomb is still capped
        self.asked.append(amount)
        return self._data.read(amount)


class FakeResponse:
    """What the login's JSON client reads of a requests response: a status and a body stream."""

    def __init__(self, status: int, body: Any) -> None:
        self.status_code = status
        # An exception stands for a body that is not JSON.
        text = b"not json" if isinstance(body, Exception) else b"" if body is None else json.dumps(body).encode()
        self.raw = FakeStream(text)

    def __enter__(self) -> FakeResponse:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class FakeTokenEndpoint:
    """Stands in for the login's requests.Session: answers the code exchange."""

    def __init__(self, answer: Callable[[dict[str, str]], tuple[int, Any]]) -> None:
        self.answer = answer
        self.posts: list[tuple[str, dict[str, Any]]] = []

    def request(self, method: str, url: str, **kwargs: Any) -> FakeResponse:
        assert method == "POST"
        assert kwargs["verify"] is not None and kwargs["stream"] is True  # TLS checked; the size cap streams
        self.posts.append((url, kwargs))
        return FakeResponse(*self.answer(kwargs["data"]))


def id_token(issuer: TestIssuer, nonce: str, **overrides: Any) -> str:
    claims: dict[str, Any] = {"aud": "app", "sub": "bob", "nonce": nonce, "scope": None}
    claims.update(overrides)
    return issuer.token(header={"typ": "JWT"}, **claims)


def with_token_endpoint(client: Client, answer: Callable[[dict[str, str]], tuple[int, Any]]) -> FakeTokenEndpoint:
    fake = FakeTokenEndpoint(answer)
    login_flow = middleware_of(client).login
    assert login_flow is not None
    login_flow._http._session = fake  # type: ignore[assignment]
    return fake


def callback(client: Client, query: str, state_cookie: str | None) -> TestResponse:
    headers = {"Cookie": f"{STATE_COOKIE}={state_cookie}"} if state_cookie is not None else {}
    return client.get(f"/callback?{query}", headers=headers)


def test_login_callback_opens_an_unbound_session(issuer: TestIssuer, mallory: Issued) -> None:
    client = browser(issuer)
    start, params = start_login(client)
    state_cookie = new_cookie(start, STATE_COOKIE)
    endpoint = with_token_endpoint(client, lambda data: (200, {
        "access_token": "at", "token_type": "Bearer", "expires_in": 300,
        "id_token": id_token(issuer, params["nonce"])}))
    response = callback(client, f"code=the-code&state={params['state']}", state_cookie)
    assert response.status_code == 302
    assert response.headers["Location"] == "/orders?x=1"
    assert clears(response, STATE_COOKIE)
    session = new_cookie(response)
    assert session is not None
    # The exchange sent the verifier behind the challenge.
    ((url, kwargs),) = endpoint.posts
    assert url == ISSUER + "/token"
    assert kwargs["data"]["grant_type"] == "authorization_code"
    assert kwargs["data"]["code"] == "the-code"
    assert kwargs["data"]["redirect_uri"] == "https://app.test/callback"
    assert kwargs["auth"] == ("app", LOGIN["client_secret"])  # HTTP Basic (RFC 6749 section 2.3.1)
    assert b64url_sha256(kwargs["data"]["code_verifier"]) == params["code_challenge"]
    # The session is the browser's: no certificate needed (validation off), any certificate ignored.
    for cert in (None, mallory):
        used = get(client, cookie=session, cert=cert)
        assert used.status_code == 200
        assert used.json is not None and used.json["auth_method"] == "session" and used.json["remote_user"] == "bob"
    # The state cannot be used again.
    replayed = callback(client, f"code=the-code&state={params['state']}", state_cookie)
    assert replayed.status_code == 400
    assert description(replayed) == "the login has expired or was already used"
    assert new_cookie(replayed) is None
    assert len(endpoint.posts) == 1


CALLBACK_FAILURES = [
    pytest.param(lambda s, c, o: ("error=access_denied&state=" + s, c), 401, "access_denied", id="access-denied"),
    pytest.param(lambda s, c, o: ("code=x&state=" + o, c), 400, "invalid_request", id="state-mismatch"),
    pytest.param(lambda s, c, o: ("code=x&state=" + s, None), 400, "invalid_request", id="state-cookie-missing"),
    pytest.param(lambda s, c, o: ("code=x&state=" + s, c + "x"), 400, "invalid_request", id="state-cookie-bad-mac"),
    pytest.param(lambda s, c, o: ("code=x&state=" + s, f"{s}.{Sealer(OTHER_SECRET, 'session').mac(s)}"), 400,
                 "invalid_request", id="state-cookie-other-secret"),
    pytest.param(lambda s, c, o: ("code=x&state=" + o, None), 400, "invalid_request", id="nothing-matches"),
    pytest.param(lambda s, c, o: ("state=" + s, c), 400, "invalid_request", id="code-missing"),
    pytest.param(lambda s, c, o: ("code=x", c), 400, "invalid_request", id="state-missing"),
    pytest.param(lambda s, c, o: ("", c), 400, "invalid_request", id="empty-query"),
    pytest.param(lambda s, c, o: ("code=x&state=" + s + "&" + "&".join(f"p{i}=1" for i in range(50)), c), 400,
                 "invalid_request", id="too-many-fields"),
]


@pytest.mark.parametrize(("make", "status", "error"), CALLBACK_FAILURES)
def test_a_bad_callback_never_opens_a_session(
    issuer: TestIssuer, make: Callable[[str, str, str], tuple[str, str | None]], status: int, error: str
) -> None:
    client = browser(issuer)
    start, params = start_login(client)
    _, other = start_login(client)  # another browser's login
    state_cookie = new_cookie(start, STATE_COOKIE)
    assert state_cookie is not None
    endpoint = with_token_endpoint(client, lambda data: (200, {"id_token": id_token(issuer, params["nonce"])}))
    query, cookie = make(params["state"], state_cookie, other["state"])
    response = callback(client, query, cookie)
    assert response.status_code == status
    assert response.headers["Content-Type"] == "application/json"
    body = response.json
    assert body is not None and body["error"] == error
    assert new_cookie(response) is None
    assert clears(response, STATE_COOKIE)
    assert "Location" not in response.headers
    assert endpoint.posts == []
    assert app_of(client).calls == []


EXCHANGE_FAILURES = [
    pytest.param(lambda i, n: (400, {"error": "invalid_grant"}), 401, "the code exchange failed: invalid_grant",
                 id="invalid-grant"),
    pytest.param(lambda i, n: (200, ValueError("not json")), 401, None, id="not-json"),
    pytest.param(lambda i, n: (200, ["a", "list"]), 401, None, id="not-an-object"),
    pytest.param(lambda i, n: (502, None), 503, None, id="token-endpoint-down"),
    pytest.param(lambda i, n: (200, {"id_token": "x" * MAX_TOKEN_RESPONSE}), 503,
                 "the token endpoint's answer is too large", id="too-large"),
    pytest.param(lambda i, n: (200, {"id_token": id_token(i, n), "expires_in": math.nan}), 401,
                 "the code exchange failed: 200", id="nan-is-not-json"),
    pytest.param(lambda i, n: (400, ["not", "an", "object"]), 401, "the code exchange failed: 400",
                 id="error-without-object"),
    pytest.param(lambda i, n: (200, {"access_token": "at"}), 401, "the issuer sent no ID token", id="no-id-token"),
    pytest.param(lambda i, n: (200, {"id_token": id_token(i, "another-nonce")}), 401,
                 "the ID token's nonce does not match the login", id="wrong-nonce"),
    pytest.param(lambda i, n: (200, {"id_token": id_token(i, n, aud="someone-else")}), 401,
                 "the ID token is not meant for this client", id="wrong-audience"),
    pytest.param(lambda i, n: (200, {"id_token": id_token(i, n, iss="https://evil.example")}), 401,
                 "the ID token was issued by another issuer", id="wrong-issuer"),
    pytest.param(lambda i, n: (200, {"id_token": id_token(i, n, exp=int(time.time()) - 10)}), 401,
                 "the ID token has expired", id="expired"),
    pytest.param(lambda i, n: (200, {"id_token": id_token(i, n, sub=None)}), 401, "the ID token has no subject",
                 id="no-subject"),
    pytest.param(lambda i, n: (200, {"id_token": id_token(i, n, iat=int(time.time()) + 3600)}), 401,
                 "the ID token's iat is invalid", id="iat-in-the-future"),
    pytest.param(lambda i, n: (200, {"id_token": id_token(i, n, aud=["app", "other"])}), 401,
                 "the ID token is not meant for this client", id="several-audiences-no-azp"),
    pytest.param(lambda i, n: (200, {"id_token": id_token(i, n, key=DPoPKey().key)}), 401, None,
                 id="foreign-signature"),
]


@pytest.mark.parametrize(("answer", "status", "message"), EXCHANGE_FAILURES)
def test_a_failed_exchange_never_opens_a_session(
    issuer: TestIssuer, answer: Callable[[TestIssuer, str], tuple[int, Any]], status: int, message: str | None
) -> None:
    client = browser(issuer)
    start, params = start_login(client)
    endpoint = with_token_endpoint(client, lambda data: answer(issuer, params["nonce"]))
    response = callback(client, f"code=c&state={params['state']}", new_cookie(start, STATE_COOKIE))
    assert response.status_code == status
    assert len(endpoint.posts) == 1
    assert new_cookie(response) is None
    assert clears(response, STATE_COOKIE)
    if message is not None:
        assert description(response) == message
    assert app_of(client).calls == []
