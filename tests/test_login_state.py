"""The stateless login state (issue 12): sealed in the cookie, taken once, and the page to return to.

Through the middleware with werkzeug's test client and a stand-in token
endpoint; the simultaneous-callback test also runs on a real ``redis-server``.
Hostile state cookies and return paths come from hypothesis.
"""

from __future__ import annotations

import threading
import time
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from werkzeug.test import create_environ

from certbound_wsgi.oidc_login import MAX_RETURN_PATH, return_path
from tests.support.redis_server import RedisServer
from tests.support.tokens import TestIssuer

from .test_oidc_login import STATE_COOKIE, browser, callback, id_token, start_login, with_token_endpoint
from .test_sessions import (
    CACHE_SECRET,
    COOKIE,
    FakeClock,
    clears,
    description,
    get,
    middleware_of,
    new_cookie,
)

FUZZ = hsettings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                          HealthCheck.function_scoped_fixture])


def good_answer(issuer: TestIssuer, nonce: str, **extra: Any) -> Any:
    def answer(data: dict[str, str]) -> tuple[int, Any]:
        time.sleep(0.02)  # long enough for simultaneous callbacks to overlap here
        return 200, {"access_token": "at", "token_type": "Bearer", "expires_in": 300,
                     "id_token": id_token(issuer, nonce), **extra}
    return answer


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_of_eight_simultaneous_callbacks_one_exchanges(issuer: TestIssuer, redis_server: RedisServer,
                                                       store: str) -> None:
    options = {"redis_url": redis_server.url, "cache_secret": CACHE_SECRET} if store == "redis" else {}
    client = browser(issuer, **options)
    start, params = start_login(client)
    endpoint = with_token_endpoint(client, good_answer(issuer, params["nonce"]))
    mw = middleware_of(client)
    gate = threading.Barrier(8)
    statuses: list[int] = []

    def one() -> None:
        environ = create_environ(f"/callback?code=c&state={params['state']}",
                                 headers={"Cookie": f"{STATE_COOKIE}={new_cookie(start, STATE_COOKIE)}"})
        status: list[int] = []
        gate.wait()
        b"".join(mw(environ, lambda s, h, e=None: status.append(int(s.split()[0]))))  # type: ignore[misc]
        statuses.extend(status)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [302] + [400] * 7
    assert len(endpoint.posts) == 1


def test_an_expired_login_state_is_refused(issuer: TestIssuer) -> None:
    clock = FakeClock()
    client = browser(issuer, clock=clock)
    start, params = start_login(client)
    endpoint = with_token_endpoint(client, good_answer(issuer, params["nonce"]))
    clock.advance(601)
    response = callback(client, f"code=c&state={params['state']}", new_cookie(start, STATE_COOKIE))
    assert response.status_code == 400
    assert description(response) == "the login has expired or was already used"
    assert endpoint.posts == []


def test_a_state_cookie_cannot_be_moved_to_another_state(issuer: TestIssuer) -> None:
    """The sealed login is bound to its ``state`` (AEAD associated data): another state cannot open it."""
    client = browser(issuer)
    start, params = start_login(client)
    _, other = start_login(client)
    sealed = (new_cookie(start, STATE_COOKIE) or "").rpartition(".")[2]
    endpoint = with_token_endpoint(client, good_answer(issuer, params["nonce"]))
    response = callback(client, f"code=c&state={other['state']}", f"{other['state']}.{sealed}")
    assert response.status_code == 400
    assert description(response) == "the login state does not match this browser"
    assert endpoint.posts == []


@FUZZ
@given(value=st.one_of(st.text(alphabet=st.characters(max_codepoint=0xFF), max_size=400),
                       st.text(alphabet="ABCxyz019-_.", max_size=400)))
def test_hostile_state_cookies_are_a_400(value: str) -> None:
    issuer = TestIssuer()
    client = browser(issuer)
    endpoint = with_token_endpoint(client, lambda data: (200, {}))
    state = "s" * 43
    environ = create_environ(f"/callback?code=c&state={state}")
    environ["HTTP_COOKIE"] = f"{STATE_COOKIE}={state}.{value}"
    captured: list[int] = []
    b"".join(middleware_of(client)(environ, lambda s, h, e=None: captured.append(int(s.split()[0]))))  # type: ignore[misc]
    assert captured == [400]
    assert endpoint.posts == []


# -- the page to return to -----------------------------------------------------------------------------------------


def wsgi_path(raw: bytes) -> str:
    """PATH_INFO as a WSGI server hands it over (PEP 3333: the raw bytes, decoded as latin-1)."""
    return raw.decode("latin-1")


@pytest.mark.parametrize(("path", "query", "expected"), [
    pytest.param(b"/caf\xc3\xa9/\xe2\x9c\x93", b"", "/caf%C3%A9/%E2%9C%93", id="utf-8-once"),
    pytest.param(b"/orders", b"x=1&y=%C3%A9", "/orders?x=1&y=%C3%A9", id="query-kept-as-sent"),
    pytest.param(b"/.//evil.example", b"", "/evil.example", id="dot-then-slashes"),
    pytest.param(b"//evil.example/x", b"a=b", "/evil.example/x?a=b", id="double-slash"),
    pytest.param(b"/\\evil.example", b"", "/%5Cevil.example", id="backslash"),
    pytest.param(b"/a/b/../../../etc", b"", "/etc", id="dot-dot-above-root"),
    pytest.param(b"/a/./b/", b"", "/a/b/", id="trailing-slash-kept"),
    pytest.param(b"/a b/\r\n", b"q=\"<x>\"", "/a%20b/%0D%0A?q=%22%3Cx%3E%22", id="controls-and-quotes"),
    pytest.param(b"/100%", b"", "/100%25", id="literal-percent"),
    pytest.param(b"/x" * 600, b"", "/", id="too-long"),
    pytest.param(b"/short", b"q=" + b"x" * 2000, "/short", id="too-long-query-dropped"),
])
def test_return_path(path: bytes, query: bytes, expected: str) -> None:
    assert return_path({"PATH_INFO": wsgi_path(path), "QUERY_STRING": query.decode("latin-1")}) == expected


@FUZZ
@given(path=st.binary(max_size=300), query=st.binary(max_size=300))
def test_return_paths_stay_on_this_origin(path: bytes, query: bytes) -> None:
    result = return_path({"PATH_INFO": wsgi_path(b"/" + path), "QUERY_STRING": query.decode("latin-1")})
    assert result.isascii() and result.isprintable() and " " not in result
    assert result.startswith("/") and not result.startswith("//") and "\\" not in result
    parts = urlsplit(result)
    assert parts.scheme == "" and parts.netloc == ""
    assert len(result) <= MAX_RETURN_PATH
    # The path decodes back to the bytes it came from, less dot and empty segments (RFC 3986 section 5.2.4).
    kept: list[bytes] = []
    for segment in (b"/" + path).split(b"/"):
        if segment == b"..":
            kept = kept[:-1]
        elif segment not in (b"", b"."):
            kept.append(segment)
    decoded = unquote(parts.path, encoding="latin-1").encode("latin-1")
    assert [s for s in decoded.split(b"/") if s] == kept or (result == "/" and len(path) > 200)


def test_a_utf8_page_survives_the_login(issuer: TestIssuer) -> None:
    """Issue 12 item 5: a login started at /café/✓ ends at /café/✓, encoded once."""
    client = browser(issuer)
    start, params = start_login(client, "/", environ={"PATH_INFO": wsgi_path("/café/✓".encode())})
    with_token_endpoint(client, good_answer(issuer, params["nonce"]))
    response = callback(client, f"code=c&state={params['state']}", new_cookie(start, STATE_COOKIE))
    assert response.status_code == 302
    assert response.headers["Location"] == "/caf%C3%A9/%E2%9C%93"


# -- the scope of a login session ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("granted", "required", "status"), [
    pytest.param("openid profile orders", ("orders",), 200, id="granted-in-the-token-response"),
    pytest.param("openid profile", ("orders",), 403, id="not-granted"),
    pytest.param(None, ("profile",), 200, id="absent-means-as-requested"),
    pytest.param(None, ("orders",), 403, id="absent-and-not-requested"),
])
def test_a_login_sessions_scope_is_what_was_granted(
    issuer: TestIssuer, granted: str | None, required: tuple[str, ...], status: int
) -> None:
    """Issue 12 item 8: scopes_required is checked against the token response's scope (RFC 6749
    section 5.1; absent: the scope requested, section 3.3), and the app sees the ID token's claims only."""
    client = browser(issuer, scopes_required=required)
    start, params = start_login(client)
    extra = {"scope": granted} if granted is not None else {}
    with_token_endpoint(client, good_answer(issuer, params["nonce"], **extra))
    done = callback(client, f"code=c&state={params['state']}", new_cookie(start, STATE_COOKIE))
    assert done.status_code == 302
    session = new_cookie(done)
    assert session is not None
    used = get(client, cookie=session, cookie_name=COOKIE)
    assert used.status_code == status
    if status == 200:
        assert used.json is not None and "scope" not in used.json["claims"]
    else:
        assert 'error="insufficient_scope"' in used.headers["WWW-Authenticate"]


def test_the_state_cookie_is_cleared_after_the_callback(issuer: TestIssuer) -> None:
    client = browser(issuer)
    start, params = start_login(client)
    with_token_endpoint(client, good_answer(issuer, params["nonce"]))
    done = callback(client, f"code=c&state={params['state']}", new_cookie(start, STATE_COOKIE))
    assert clears(done, STATE_COOKIE)
    cleared = [h for h in done.headers.getlist("Set-Cookie") if h.startswith(f"{STATE_COOKIE}=")]
    assert cleared == [f"{STATE_COOKIE}=; Path=/; Max-Age=0; Secure; HttpOnly; SameSite=Lax"]


def test_a_callback_with_redis_down_is_503(issuer: TestIssuer, tmp_path: Any) -> None:
    """The state cannot be taken atomically: refused with 503, and the code is not exchanged."""
    server = RedisServer(tmp_path / "redis")
    try:
        client = browser(issuer, redis_url=server.url, cache_secret=CACHE_SECRET, redis_timeout=0.5)
        start, params = start_login(client)
        endpoint = with_token_endpoint(client, good_answer(issuer, params["nonce"]))
        server.kill()
        response = callback(client, f"code=c&state={params['state']}", new_cookie(start, STATE_COOKIE))
        assert response.status_code == 503
        assert response.json == {"error": "temporarily_unavailable",
                                 "error_description": "the session store is unavailable"}
        assert endpoint.posts == []
    finally:
        server.stop()


def test_a_login_session_keeps_no_token(issuer: TestIssuer) -> None:
    """The access token of the code exchange is not kept: the record has the ID token's claims only."""
    client = browser(issuer)
    start, params = start_login(client)
    with_token_endpoint(client, good_answer(issuer, params["nonce"]))
    done = callback(client, f"code=c&state={params['state']}", new_cookie(start, STATE_COOKIE))
    session = new_cookie(done)
    assert session is not None
    sessions = middleware_of(client).sessions
    assert sessions is not None
    record = sessions._fetch_record(session.split(".")[0])
    assert record is not None and record.token is None and record.method == "authorization_code"
    assert record.scope == "openid profile" and "scope" not in record.claims
