"""Sessions end to end: browser/curl -> nginx (mTLS) -> gunicorn (2 workers) -> middleware, sessions in Redis.

Real redis-server, real oidc-provider (tokens over mutual TLS, the browser login
with its login and consent pages), real nginx and gunicorn. What is checked:

* a session made by a certificate-bound token works from the cookie alone, on
  every worker, but only with the same certificate; not with another one, not
  without one, not at an instance with another ``session_secret`` on the same Redis;
* the ``authorization_code`` login (``proof_of_possession_auth_methods_validation=false``)
  makes a session that needs no certificate (the documented choice), while a
  token-made session in the same app still does; the callback refuses forged
  and replayed states with 400/401, never 500; an API call is not redirected;
* the same login configuration with the validation on does not start;
* logout, tampered cookies, and one real idle timeout.

The stacks run :func:`pid_echo` (the echo app plus the worker's pid) so that a
test can see which gunicorn worker answered.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from certbound_wsgi.binding import CERT_MISSING, THUMBPRINT_MISMATCH
from certbound_wsgi.cache.seal import Sealer
from certbound_wsgi.dev.echo import echo_app
from certbound_wsgi.dev.pki import Issued
from certbound_wsgi.errors import ConfigurationError
from certbound_wsgi.settings import Settings
from certbound_wsgi.types import StartResponse, WSGIEnvironment
from tests.support.browser import Browser
from tests.support.idp import SECRETS, WEB_CLIENT, OidcProvider, x5t_s256
from tests.support.idp_fixtures import Pki
from tests.support.procs import wait_until
from tests.support.redis_server import RedisServer
from tests.support.servers import start_gunicorn

from .conftest import Stack, StackFactory, app_env

SECRET_A = "session-secret-A-0123456789abcdefghijklmnop"
SECRET_B = "session-secret-B-0123456789abcdefghijklmnop"
CACHE_SECRET = "cache-secret-0123456789abcdef"
APP = "tests.e2e.test_sessions:pid_echo"
HTML = "text/html,application/xhtml+xml;q=0.9,*/*;q=0.8"
LOGOUT = "/logout"
COOKIE_ATTRIBUTES = {"Path=/", "Secure", "HttpOnly", "SameSite=Lax"}
#: Secure, host-only, Path=/: the __Host- prefix (RFC 6265bis section 4.1.3.2).
COOKIE = "__Host-session"
STATE_COOKIE = "__Host-session_login"


def pid_echo(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """The echo app, plus ``X-Worker-Pid``; ``?slow`` holds the worker for 0.3 s (runs inside gunicorn)."""
    if "slow" in environ.get("QUERY_STRING", ""):
        time.sleep(0.3)

    def with_pid(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        return start_response(status, [*headers, ("X-Worker-Pid", str(os.getpid()))], exc_info)

    return echo_app(environ, with_pid)


# -- helpers ---------------------------------------------------------------------------

def set_cookies(response: requests.Response) -> list[str]:
    """Every ``Set-Cookie`` header of ``response``, unjoined."""
    return list(response.raw.headers.getlist("Set-Cookie"))


def cookie_of(response: requests.Response, name: str = COOKIE) -> tuple[str, set[str]]:
    """The value and attributes of the one ``Set-Cookie`` for ``name``."""
    found = [c for c in set_cookies(response) if c.startswith(f"{name}=")]
    assert len(found) == 1, set_cookies(response)
    first, *attributes = found[0].split("; ")
    return first.split("=", 1)[1], set(attributes)


def call(stack: Stack, cookie: str | None = None, cert: Issued | None = None, path: str = "/anything",
         method: str = "GET", **headers: str) -> requests.Response:
    """A request on a fresh connection carrying exactly the ``session`` cookie given (no cookie jar)."""
    sent = {k.replace("_", "-"): v for k, v in headers.items()}
    if cookie is not None:
        sent["Cookie"] = f"{COOKIE}={cookie}"
    return stack.call(None, cert, path=path, headers=sent, allow_redirects=False, method=method)


def assert_bare_401(response: requests.Response) -> None:
    """No usable credential: RFC 6750 section 3.1's bare challenge, JSON, no redirect."""
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="api"'
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {"error": "unauthorized", "error_description": "an access token is required"}


def assert_invalid_token(response: requests.Response, description: str) -> None:
    assert response.status_code == 401, response.text
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    assert response.json() == {"error": "invalid_token", "error_description": description}


def redis_key(secret: str, sid: str) -> str:
    """The Redis key of the session a cookie names (its id is the cookie's first field)."""
    return Sealer(secret, "session").key_name("sid", sid.split(".")[0])


def tamper(text: str, index: int) -> str:
    """``text`` with the character at ``index`` replaced by another base64url character."""
    new = "A" if text[index] != "A" else "B"
    return text[:index] + new + text[index + 1:]


# -- fixtures ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def redis_client(redis_server: RedisServer) -> Iterator[Any]:
    client = redis_server.client()
    try:
        yield client
    finally:
        client.close()


def bearer_options(redis_server: RedisServer, secret: str, **extra: str) -> dict[str, str]:
    return {
        "app": APP,
        "auth_methods": "bearer,session",
        "session_secret": secret,
        "redis_url": redis_server.url,
        "cache_secret": CACHE_SECRET,
        "logout_path": LOGOUT,
        **extra,
    }


def login_options(redis_server: RedisServer, nginx_url: str = "{nginx_url}", **extra: str) -> dict[str, str]:
    return {
        "app": APP,
        "auth_methods": "bearer,session,authorization_code",
        "proof_of_possession_auth_methods_validation": "false",
        "client_id": WEB_CLIENT,
        "client_secret": SECRETS[WEB_CLIENT],
        "redirect_uri": f"{nginx_url}/callback",
        "scopes": "openid,profile,email",
        "session_secret": SECRET_A,
        "redis_url": redis_server.url,
        "logout_path": LOGOUT,
        **extra,
    }


@pytest.fixture(scope="module")
def stack_a(stacks: StackFactory, idp: OidcProvider, redis_server: RedisServer) -> Stack:
    """Token-made sessions, ``SECRET_A``, in ``redis_server``."""
    return stacks(idp, "gunicorn", workers=2, **bearer_options(redis_server, SECRET_A))


@pytest.fixture(scope="module")
def stack_b(stacks: StackFactory, idp: OidcProvider, redis_server: RedisServer) -> Stack:
    """Like ``stack_a``, on the same Redis, with another ``session_secret``; sessions idle out after 1 s."""
    return stacks(idp, "gunicorn", workers=2,
                  **bearer_options(redis_server, SECRET_B, session_idling_timeout="1"))


@pytest.fixture(scope="module")
def login_stack(stacks: StackFactory, idp: OidcProvider, redis_server: RedisServer) -> Stack:
    """Tokens, sessions and the browser login, with the PoP method validation off."""
    return stacks(idp, "gunicorn", workers=2, **login_options(redis_server))


@pytest.fixture
def login_url(login_stack: Stack, idp: OidcProvider) -> str:
    """The login stack's URL, its callback registered at the IdP (other tests may register others)."""
    idp.set_redirect_uris([f"{login_stack.nginx.url}/callback"])
    return login_stack.nginx.url


@pytest.fixture(scope="module")
def alice_token(idp: OidcProvider) -> str:
    """A real token bound to alice's certificate."""
    return idp.token("bound")


@pytest.fixture
def browser(pki: Pki) -> Iterator[Browser]:
    """A browser WITHOUT a client certificate, navigating (Accept: text/html), with a fresh IdP session."""
    with Browser(pki.ca_file) as b:
        b.session.headers["Accept"] = HTML
        yield b


def bearer_session(stack: Stack, token: str, cert: Issued) -> str:
    """Log in with the token and certificate; the session cookie's value."""
    response = stack.call(token, cert)
    assert response.status_code == 200, response.text
    assert response.json()["auth_method"] == "bearer"
    value, attributes = cookie_of(response)
    assert attributes == COOKIE_ATTRIBUTES
    return value


# -- sessions made by a bound token ----------------------------------------------------

def test_bearer_session_is_bound_to_its_certificate(
    stack_a: Stack, stack_b: Stack, pki: Pki, alice_token: str, redis_client: Any
) -> None:
    first = stack_a.call(alice_token, pki.alice)
    assert first.status_code == 200, first.text
    assert first.json()["auth_method"] == "bearer"
    value, attributes = cookie_of(first)
    assert attributes == COOKIE_ATTRIBUTES  # no Max-Age, no Domain: a host-only browser-session cookie
    sid, _, mac = value.rpartition(".")
    assert len(sid) >= 40 and len(mac) == 43

    # The record is in Redis (the only place both workers share), sealed: no claim in clear text.
    stored = redis_client.get(redis_key(SECRET_A, sid))
    assert stored is not None
    assert b"alice" not in stored and x5t_s256(pki.alice).encode() not in stored
    assert 0 < redis_client.pttl(redis_key(SECRET_A, sid)) <= 600_000  # never beyond the token's exp

    # The cookie alone, alice's certificate: a session, on every worker, no new cookie.
    pids = set()
    for _ in range(6):
        response = call(stack_a, value, pki.alice)
        assert response.status_code == 200, response.text
        echoed = response.json()
        assert echoed["auth_method"] == "session"
        assert echoed["thumbprint"] == x5t_s256(pki.alice)
        assert echoed["claims"]["cnf"]["x5t#S256"] == x5t_s256(pki.alice)
        assert echoed["remote_user"] == echoed["claims"]["sub"] == "bound"
        assert set_cookies(response) == []
        pids.add(response.headers["X-Worker-Pid"])
    with ThreadPoolExecutor(2) as pool:
        # Two slow requests at once occupy both sync workers: each must serve the session.
        for _ in range(5):
            if len(pids) == 2:
                break
            for response in pool.map(lambda _: call(stack_a, value, pki.alice, path="/anything?slow=1"), range(2)):
                assert response.status_code == 200, response.text
                assert response.json()["auth_method"] == "session"
                pids.add(response.headers["X-Worker-Pid"])
    assert len(pids) == 2, pids

    # A stolen cookie: another certificate, or none.
    assert_invalid_token(call(stack_a, value, pki.mallory), THUMBPRINT_MISMATCH)
    assert_invalid_token(call(stack_a, value), CERT_MISSING)

    # Another instance on the same Redis, with another session_secret: not a session there.
    assert_bare_401(call(stack_b, value, pki.alice))
    control = stack_b.call(alice_token, pki.alice)  # while the token itself works there
    assert control.status_code == 200, control.text
    value_b, _ = cookie_of(control)
    assert_bare_401(call(stack_a, value_b, pki.alice))  # and the other way round

    # None of the refusals harmed the session.
    assert call(stack_a, value, pki.alice).json()["auth_method"] == "session"


def test_logout(stack_a: Stack, pki: Pki, alice_token: str, redis_client: Any) -> None:
    value = bearer_session(stack_a, alice_token, pki.alice)
    sid = value.rpartition(".")[0]
    assert redis_client.exists(redis_key(SECRET_A, sid)) == 1
    assert call(stack_a, value, pki.alice).status_code == 200

    # GET does not log out (logout_methods: POST, DELETE): a cross-site link cannot end a session.
    assert call(stack_a, value, pki.alice, path=LOGOUT).status_code == 200
    # Nor can a thief holding only the cookie.
    assert_invalid_token(call(stack_a, value, pki.mallory, path=LOGOUT, method="POST"), THUMBPRINT_MISMATCH)
    assert redis_client.exists(redis_key(SECRET_A, sid)) == 1

    response = call(stack_a, value, pki.alice, path=LOGOUT, method="POST")
    assert response.status_code == 204, response.text
    assert response.content == b""
    assert response.headers["Cache-Control"] == "no-store"
    cleared, attributes = cookie_of(response)
    assert cleared == ""
    assert attributes == {*COOKIE_ATTRIBUTES, "Max-Age=0"}
    assert redis_client.exists(redis_key(SECRET_A, sid)) == 0

    assert_bare_401(call(stack_a, value, pki.alice))
    assert_bare_401(call(stack_a, value, pki.alice))  # on whichever worker


@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(lambda v: tamper(v, 0), id="id-first-char"),
        pytest.param(lambda v: tamper(v, v.index(".") - 1), id="id-last-char"),
        pytest.param(lambda v: tamper(v, v.index(".") + 5), id="mac-char"),
        pytest.param(lambda v: tamper(v, len(v) - 1), id="mac-last-char"),
        pytest.param(lambda v: v.rpartition(".")[0], id="mac-dropped"),
        pytest.param(lambda v: v + "A", id="mac-extended"),
        pytest.param(lambda v: v.rpartition(".")[0] + "." + secrets.token_urlsafe(32), id="mac-random"),
        pytest.param(lambda v: v.replace(".", "", 1), id="no-dot"),
        pytest.param(lambda v: "." + v, id="leading-dot"),
        pytest.param(lambda v: v + "x" * 300, id="too-long"),
        pytest.param(lambda v: "", id="empty"),
    ],
)
def test_tampered_cookie_is_refused(stack_a: Stack, pki: Pki, idp: OidcProvider, forge: Any) -> None:
    # A token of its own: alice_token's session was logged out above, and another worker may
    # remember it for cache_l1_ttl (docs/sessions.md, "Logout").
    value = bearer_session(stack_a, idp.token("bound"), pki.alice)
    forged = forge(value)
    assert forged != value
    assert_bare_401(call(stack_a, forged, pki.alice))
    assert call(stack_a, value, pki.alice).json()["auth_method"] == "session"


def test_idle_session_expires(stack_b: Stack, pki: Pki, idp: OidcProvider) -> None:
    """The one real timeout (the others are unit-tested with a clock): ``session_idling_timeout=1``."""
    # A token of its own: alice_token's session here may be up to 1 s idle already (a token
    # request does not count as a use of its session; docs/sessions.md).
    value = bearer_session(stack_b, idp.token("bound"), pki.alice)
    time.sleep(0.5)
    assert call(stack_b, value, pki.alice).json()["auth_method"] == "session"  # used: idle clock restarts
    time.sleep(0.7)  # 1.2 s since creation, 0.7 s idle
    assert call(stack_b, value, pki.alice).json()["auth_method"] == "session"
    time.sleep(1.5)
    expired = call(stack_b, value, pki.alice)
    assert_invalid_token(expired, "the session has expired")
    cleared, attributes = cookie_of(expired)
    assert cleared == "" and "Max-Age=0" in attributes
    assert_bare_401(call(stack_b, value, pki.alice))  # and it is gone


# -- the browser login ---------------------------------------------------------------------

def test_login_session_needs_no_certificate_but_token_session_does(
    login_url: str, login_stack: Stack, browser: Browser, idp: OidcProvider, pki: Pki, alice_token: str
) -> None:
    start = f"{login_url}/anything?page=1"
    final = browser.login(start, username="alice")
    assert final.status_code == 200, (final.text, browser.history)
    assert final.url == start

    # The path it took: app -> IdP ... -> callback -> the page it started from.
    first = browser.history[0]
    assert first[:2] == ("GET", start) and first[2] == 302
    callbacks = [h for h in browser.history if h[1].startswith(f"{login_url}/callback?")]
    assert len(callbacks) == 1 and callbacks[0][2] == 302
    assert browser.history[-1] == ("GET", start, 200)

    echoed = final.json()
    assert echoed["auth_method"] == "session"
    assert echoed["thumbprint"] is None  # no certificate anywhere
    claims = echoed["claims"]
    assert claims["sub"] == "alice"
    assert claims["email"] == "alice@example.test"
    assert claims["iss"] == idp.issuer
    assert claims["aud"] == WEB_CLIENT or WEB_CLIENT in claims["aud"]
    assert echoed["remote_user"] == "alice"
    assert echoed["query"] == "page=1"
    login_cookie = browser.cookies.get(COOKIE)
    assert login_cookie
    assert STATE_COOKIE not in browser.cookies  # the state cookie was cleared

    # The login's session, outside the browser: without any certificate, and with mallory's.
    assert call(login_stack, login_cookie).json()["auth_method"] == "session"
    assert call(login_stack, login_cookie, pki.mallory).json()["claims"]["sub"] == "alice"

    # Side by side in the same app: a token-made session still demands its certificate.
    token_cookie = bearer_session(login_stack, alice_token, pki.alice)
    assert call(login_stack, token_cookie, pki.alice).json()["auth_method"] == "session"
    assert_invalid_token(call(login_stack, token_cookie), CERT_MISSING)
    assert_invalid_token(call(login_stack, token_cookie, pki.mallory), THUMBPRINT_MISMATCH)
    assert call(login_stack, login_cookie).json()["claims"]["sub"] == "alice"

    # Logging out ends the login's session; the browser is sent to log in again.
    out = browser.post(f"{login_url}{LOGOUT}")
    assert out.status_code == 204
    assert COOKIE not in browser.cookies
    assert_bare_401(call(login_stack, login_cookie, Accept="application/json"))
    again = browser.get(start)
    assert again.status_code == 302
    assert again.headers["Location"].startswith(f"{idp.authorization_endpoint}?")


def test_login_redirect_and_api_refusal(login_url: str, login_stack: Stack, idp: OidcProvider, pki: Pki) -> None:
    # A navigation without a session: to the IdP, with state, nonce and PKCE S256.
    navigation = call(login_stack, None, pki.alice, path="/anything?x=1", Accept=HTML)
    assert navigation.status_code == 302, navigation.text
    location = navigation.headers["Location"]
    assert location.startswith(f"{idp.authorization_endpoint}?")
    query = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
    assert query["client_id"] == WEB_CLIENT
    assert query["redirect_uri"] == f"{login_url}/callback"
    assert query["response_type"] == "code"
    assert query["scope"] == "openid profile email"
    assert query["code_challenge_method"] == "S256"
    assert len(query["state"]) >= 40 and len(query["nonce"]) >= 40
    state_value, attributes = cookie_of(navigation, STATE_COOKIE)
    assert state_value.rpartition(".")[0] == query["state"]
    paths = {a for a in attributes if a.startswith("Path=")}
    assert paths in ({"Path=/"}, {"Path=/callback"})  # it must reach the callback (narrower is better)
    assert attributes - paths == {"Secure", "HttpOnly", "SameSite=Lax", "Max-Age=600"}
    head = requests.head(f"{login_url}/anything", headers={"Accept": HTML}, verify=pki.ca_file, timeout=15,
                         allow_redirects=False)
    assert head.status_code == 302
    assert head.headers["Location"].startswith(f"{idp.authorization_endpoint}?")

    # API calls without a token: 401, never a redirect.
    assert_bare_401(call(login_stack, None, pki.alice))
    assert_bare_401(call(login_stack, None, pki.alice, Accept="application/json"))
    assert_bare_401(call(login_stack, None, pki.alice, Accept="*/*"))
    # A form post accepting HTML is no navigation either.
    post = requests.post(f"{login_url}/anything", headers={"Accept": HTML}, cert=pki.alice.pair,
                         verify=pki.ca_file, timeout=15, allow_redirects=False)
    assert_bare_401(post)


def stop_before_callback(browser: Browser, url: str, page: str = "/anything") -> tuple[str, str]:
    """Log in (from ``page``) up to the IdP's redirect to the callback: its URL and the browser's state cookie."""
    redirect = browser.login(f"{url}{page}", stop_at=f"{url}/callback")
    callback = Browser.location(redirect)
    assert callback is not None and callback.startswith(f"{url}/callback?"), browser.history
    state_cookie = browser.cookies.get(STATE_COOKIE)
    assert state_cookie
    return callback, state_cookie


def get_callback(url: str, pki: Pki, state_cookie: str | None) -> requests.Response:
    headers = {"Cookie": f"{STATE_COOKIE}={state_cookie}"} if state_cookie is not None else {}
    return requests.get(url, headers=headers, verify=pki.ca_file, timeout=15, allow_redirects=False)


def assert_login_refused(response: requests.Response, status: int, error: str, description: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {"error": error, "error_description": description}
    cleared = [c for c in set_cookies(response) if c.startswith(f"{STATE_COOKIE}=")]
    assert cleared and "Max-Age=0" in cleared[0]
    assert not any(c.startswith(f"{COOKIE}=") for c in set_cookies(response))


def with_param(url: str, name: str, value: str) -> str:
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    query[name] = value
    return parts._replace(query="&".join(f"{k}={v}" for k, v in query.items())).geturl()


def test_callback_refuses_forged_state(login_url: str, login_stack: Stack, browser: Browser, pki: Pki) -> None:
    callback, state_cookie = stop_before_callback(browser, login_url)
    state = parse_qs(urlsplit(callback).query)["state"][0]
    mismatch = "the login state does not match this browser"

    # Another state than the browser's, with the browser's cookie.
    forged = with_param(callback, "state", secrets.token_urlsafe(32))
    assert_login_refused(get_callback(forged, pki, state_cookie), 400, "invalid_request", mismatch)
    # The right state, no state cookie (CSRF: the attacker's browser is not the victim's).
    assert_login_refused(get_callback(callback, pki, None), 400, "invalid_request", mismatch)
    # The right state in a cookie with a forged MAC.
    assert_login_refused(get_callback(callback, pki, f"{state}.{tamper(state_cookie.rpartition('.')[2], 3)}"),
                         400, "invalid_request", mismatch)
    assert_login_refused(get_callback(callback, pki, state), 400, "invalid_request", mismatch)
    # A callback without code or state.
    assert_login_refused(get_callback(f"{login_url}/callback?state={state}", pki, state_cookie), 400,
                         "invalid_request", "the login callback lacks code or state")
    # The IdP's error answer.
    assert_login_refused(get_callback(f"{login_url}/callback?error=access_denied&state={state}", pki, state_cookie),
                         401, "access_denied", "the login failed at the issuer: access_denied")

    # None of that consumed the login: the genuine callback still completes it.
    done = get_callback(callback, pki, state_cookie)
    assert done.status_code == 302, done.text
    assert done.headers["Location"] == "/anything"
    session_value, attributes = cookie_of(done)
    assert attributes == COOKIE_ATTRIBUTES
    assert call(login_stack, session_value).json()["claims"]["sub"] == "alice"


def test_callback_refuses_replay_and_forged_code(login_url: str, login_stack: Stack, browser: Browser,
                                                 pki: Pki) -> None:
    callback, state_cookie = stop_before_callback(browser, login_url)
    done = browser.get(callback)
    assert done.status_code == 302, done.text
    session_value, _ = cookie_of(done)
    assert call(login_stack, session_value).json()["auth_method"] == "session"

    # The same callback again: from the browser (its state cookie is gone) and with the old state cookie.
    assert_login_refused(browser.get(callback), 400, "invalid_request", "the login state does not match this browser")
    assert_login_refused(get_callback(callback, pki, state_cookie), 400, "invalid_request",
                         "the login has expired or was already used")

    # A fresh login whose code is swapped for a forged one: the IdP refuses the exchange.
    with Browser(pki.ca_file) as other:
        other.session.headers["Accept"] = HTML
        callback2, state_cookie2 = stop_before_callback(other, login_url)
    forged = with_param(callback2, "code", secrets.token_urlsafe(32))
    assert_login_refused(get_callback(forged, pki, state_cookie2), 401, "invalid_token",
                         "the code exchange failed: invalid_grant")
    # ... and that used the login up: the genuine code comes too late.
    assert_login_refused(get_callback(callback2, pki, state_cookie2), 400, "invalid_request",
                         "the login has expired or was already used")


def test_callback_with_too_many_parameters_is_a_400_not_a_500(login_url: str, pki: Pki) -> None:
    """parse_qsl(max_num_fields=20) raises ValueError beyond 20 fields: it must become a 400."""
    query = "&".join(f"p{i}=x" for i in range(25))
    response = get_callback(f"{login_url}/callback?code=c&state=s&{query}", pki, None)
    assert response.status_code == 400, (response.status_code, response.text)
    assert response.headers["Content-Type"] == "application/json"
    assert response.json()["error"] == "invalid_request"


def test_login_returns_to_a_local_path_only(login_url: str, browser: Browser, pki: Pki) -> None:
    """A page path that decodes to ``//evil.example`` must not become a protocol-relative redirect."""
    callback, state_cookie = stop_before_callback(browser, login_url, "/%2F%2Fevil.example/x?a=b")
    done = get_callback(callback, pki, state_cookie)
    assert done.status_code == 302, done.text
    location = done.headers["Location"]
    assert location.startswith("/") and not location.startswith("//"), location
    assert location.endswith("evil.example/x?a=b")


# -- the method validation ------------------------------------------------------------------

def test_login_with_pop_validation_on_does_not_start(
    login_stack: Stack, idp: OidcProvider, redis_server: RedisServer, tmp_path: Path
) -> None:
    options = login_options(redis_server, login_stack.nginx.url)
    del options["proof_of_possession_auth_methods_validation"]  # the default: on
    env = app_env(idp, **options)

    with pytest.raises(ConfigurationError) as refused:
        Settings.from_env(env)
    assert refused.value.option == "auth_methods"
    assert "authorization_code cannot carry a proof-of-possession binding" in str(refused.value)
    # The same env with the validation off is what the running login stack uses.
    env_off = app_env(idp, **login_options(redis_server, login_stack.nginx.url))
    assert "authorization_code" in Settings.from_env(env_off).auth_methods

    log = tmp_path / "gunicorn.log"
    server = None
    try:
        try:
            # gunicorn binds its port before the workers import the app, so it may seem to come up...
            server = start_gunicorn(env, workers=2, log_dir=tmp_path)
        except RuntimeError as exc:
            assert "exited" in str(exc)
        else:
            # ... but the workers cannot boot, and the arbiter gives up.
            assert wait_until(lambda: not server.process.alive(), timeout=30), server.output()
            assert server.process.proc.returncode != 0
    finally:
        if server is not None:
            server.stop()
    text = log.read_text(errors="replace")
    assert "ConfigurationError: auth_methods: authorization_code cannot carry" in text, text[-3000:]
    assert "Worker failed to boot" in text or "App failed to load" in text, text[-3000:]

