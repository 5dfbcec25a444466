"""What sessions cost and when they end, end to end (issue 12).

curl-like clients and a scripted browser -> nginx (mTLS) -> gunicorn (2 workers)
-> middleware, sessions in a real redis-server, tokens and logins at the real
oidc-provider. Redis commands are recorded with ``MONITOR`` and counted when they
name a session's or a login's key (cache/seal.py names every key
``certbound:<namespace>:<purpose>:<hmac>``); the issuer keys that every worker
shares through the same Redis (issue 14) have a purpose of their own and are
not the sessions' cost. Code exchanges are counted with the provider's own
request counter.

* 1,000 cookie-less requests with one token: at most one store write;
* 1,000 unauthenticated browser GETs: no store write at all;
* a revoked token's session refused within ``cache_ttl_max``;
* 8 simultaneous callbacks with one state: one code exchange;
* UTF-8 and hostile return paths come back to the app's own origin;
* logout with an ended session finishes and clears the cookie;
* and no 5xx anywhere.
"""

from __future__ import annotations

import http.cookiejar
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from tests.support.browser import Browser
from tests.support.idp import OPAQUE_RESOURCE, SECRETS, OidcProvider
from tests.support.idp_fixtures import Pki
from tests.support.redis_server import RedisServer

from .conftest import Stack, StackFactory
from .test_sessions import (
    COOKIE,
    HTML,
    STATE_COOKIE,
    assert_bare_401,
    assert_invalid_token,
    bearer_options,
    call,
    cookie_of,
    get_callback,
    login_options,
    set_cookies,
    stop_before_callback,
)

SECRET = "session-costs-secret-0123456789abcdefghij"
#: Commands that change the data set: what "a store write" means here.
WRITES = frozenset({"set", "setex", "psetex", "setnx", "getset", "getdel", "del", "unlink", "expire", "pexpire",
                    "eval", "evalsha", "hset", "incr", "mset"})


#: The key purposes of sessions and logins (records, used-state markers).
SESSION_PURPOSES = (":session:", ":login:")
_STOP = "certbound-store-log-stop"


class StoreLog:
    """Every command Redis runs while this is open (``MONITOR``), and which of them touch sessions."""

    def __init__(self, redis_server: RedisServer) -> None:
        self._server = redis_server
        self._client = redis_server.client()
        self._monitor = self._client.monitor()
        self.commands: list[tuple[str, str, bool]] = []  # (command name, key, only if new: SET ... NX)
        self._thread = threading.Thread(target=self._record, daemon=True)

    def __enter__(self) -> StoreLog:
        self._monitor.__enter__()  # MONITOR is acknowledged before this returns
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._server.client() as other:  # the monitoring connection can send nothing
            other.echo(_STOP)
        self._thread.join(30)
        self._monitor.__exit__(*exc)
        self._client.close()

    def _record(self) -> None:
        while True:
            words = self._monitor.next_command()["command"].split(" ")
            name = words[0].lower()
            if name == "echo" and words[1:] == [_STOP]:
                return
            # EVAL/EVALSHA script numkeys key ...: the first key is the fourth word.
            key = words[3] if name in ("eval", "evalsha") and len(words) > 3 else words[1] if len(words) > 1 else ""
            self.commands.append((name, key, name == "set" and "nx" in (w.lower() for w in words[3:])))

    def session(self, names: frozenset[str] | None = None) -> Counter[str]:
        """The commands that named a session's or a login's key (only ``names``, if given), by name."""
        return Counter(name for name, key, _ in self.commands
                       if any(p in key for p in SESSION_PURPOSES) and (names is None or name in names))

    def writes(self) -> int:
        """Session writes of any kind, ``SET NX`` attempts included (one that loses a race writes nothing)."""
        return sum(self.session(WRITES).values())

    def unconditional_writes(self) -> int:
        """Session writes that change the data set whatever is there: all but ``SET NX``."""
        return sum(1 for name, key, nx in self.commands
                   if name in WRITES and not nx and any(p in key for p in SESSION_PURPOSES))


def session_keys(db: Any) -> int:
    return sum(1 for purpose in SESSION_PURPOSES for _ in db.scan_iter(match=f"certbound:*{purpose}*", count=1000))


def no_cookies_session(stack: Stack, cert: Any) -> requests.Session:
    """A keep-alive client through nginx that never keeps a cookie (as many API clients)."""
    session = requests.Session()
    session.trust_env = False
    session.verify = stack.ca_file
    session.cert = cert.pair if cert is not None else None
    session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    return session


@pytest.fixture(scope="module")
def db(redis_server: RedisServer) -> Iterator[Any]:
    """The stacks' Redis, to count its commands."""
    with redis_server.client() as client:
        yield client


def token_options(redis_server: RedisServer, **extra: str) -> dict[str, str]:
    return bearer_options(redis_server, SECRET, redis_timeout="0.5", **extra)


@pytest.fixture(scope="module")
def token_stack(stacks: StackFactory, idp: OidcProvider, redis_server: RedisServer) -> Stack:
    return stacks(idp, "gunicorn", workers=2, **token_options(redis_server))


# -- costs ----------------------------------------------------------------------------------------------------------


def test_a_thousand_cookieless_requests_with_one_token_write_once(
    token_stack: Stack, idp: OidcProvider, pki: Pki, redis_server: RedisServer, db: Any
) -> None:
    token = idp.token("bound")
    statuses: Counter[int] = Counter()
    cookies: set[str] = set()
    pids: set[str] = set()
    lock = threading.Lock()

    def client(n: int) -> None:
        with no_cookies_session(token_stack, pki.alice) as session:
            for _ in range(n):
                response = session.get(f"{token_stack.nginx.url}/anything",
                                       headers={"Authorization": f"Bearer {token}"}, timeout=15)
                with lock:
                    statuses[response.status_code] += 1
                    cookies.update(c.split(";")[0] for c in set_cookies(response))
                    pids.add(response.headers.get("X-Worker-Pid", ""))

    before = session_keys(db)
    with StoreLog(redis_server) as log, ThreadPoolExecutor(4) as pool:
        list(pool.map(client, [250] * 4))
    created = session_keys(db) - before
    seen = log.session()
    print(f"\n1000 cookie-less requests, one token: session commands {dict(seen)}; writes {log.writes()}")
    assert statuses == {200: 1000}
    assert len(pids) == 2, pids  # both workers served
    assert len(cookies) == 1  # one session, whichever worker answered
    # One record written: the new token's session, created once (which also shows the log sees writes).
    # Both workers may race to open it: each tries SET NX at most once, and the loser writes nothing.
    assert created == 1
    assert 1 <= log.writes() <= len(pids), dict(seen)
    assert log.unconditional_writes() == 0, dict(seen)
    # Reads: one look-up per worker per cache_l1_ttl (5 s), never one per request.
    assert seen["get"] <= 2 * (1 + 4), seen


def test_a_thousand_unauthenticated_browser_gets_write_nothing(
    stacks: StackFactory, idp: OidcProvider, redis_server: RedisServer, pki: Pki, db: Any
) -> None:
    stack = stacks(idp, "gunicorn", workers=2, **login_options(redis_server, session_secret=SECRET))
    keys_before = session_keys(db)
    statuses: Counter[int] = Counter()
    lock = threading.Lock()

    def client(n: int) -> None:
        with no_cookies_session(stack, None) as session:
            for i in range(n):
                response = session.get(f"{stack.nginx.url}/page/{i}", headers={"Accept": HTML},
                                       allow_redirects=False, timeout=15)
                with lock:
                    statuses[response.status_code] += 1

    with StoreLog(redis_server) as log, ThreadPoolExecutor(4) as pool:
        list(pool.map(client, [250] * 4))
    print(f"\n1000 unauthenticated browser GETs: session commands {dict(log.session())}")
    assert statuses == {302: 1000}
    assert log.session() == Counter()  # not even a read
    assert session_keys(db) == keys_before


# -- revocation ---------------------------------------------------------------------------------------------------


def test_a_revoked_tokens_session_is_refused_within_cache_ttl_max(
    stacks: StackFactory, idp: OidcProvider, redis_server: RedisServer, pki: Pki
) -> None:
    stack = stacks(idp, "gunicorn", workers=2, **token_options(
        redis_server, auth_methods="introspection,session", audience=f"https://api.test,{OPAQUE_RESOURCE}",
        client_id="rs-client", client_secret=SECRETS["rs-client"], cache_ttl_max="3", cache_l1_ttl="1"))
    token = idp.token("bound", resource=OPAQUE_RESOURCE)
    opened = stack.call(token, pki.alice)
    assert opened.status_code == 200, opened.text
    cookie, _ = cookie_of(opened)
    used = call(stack, cookie, pki.alice)
    assert used.status_code == 200 and used.json()["auth_method"] == "session"
    idp.revoke(token)
    revoked_at = time.monotonic()
    last_accepted = 0.0
    while True:
        sent = time.monotonic() - revoked_at
        response = call(stack, cookie, pki.alice)
        assert response.status_code < 500, response.text
        if response.status_code == 401:
            break
        last_accepted = sent
        assert sent < 3 + 1.5, f"still a session {sent:.1f} s on"
        time.sleep(0.1)
    print(f"\nrevoked token's session (cache_ttl_max=3): last accepted by a request sent {last_accepted:.2f} s "
          f"after the revocation, refused by one sent {sent:.2f} s after")
    # The last answer cached before the revocation is fresh for cache_ttl_max at most.
    assert last_accepted < 3
    assert sent < 3 + 0.5
    assert_invalid_token(response, "the session's token is no longer active")
    cleared, attributes = cookie_of(response)
    assert cleared == "" and "Max-Age=0" in attributes
    # Ended for good, on every worker: the record is gone.
    for _ in range(4):
        assert_bare_401(call(stack, cookie, pki.alice))


# -- the login ------------------------------------------------------------------------------------------------------


@pytest.fixture
def login_stack(stacks: StackFactory, idp: OidcProvider, redis_server: RedisServer) -> Stack:
    stack = stacks(idp, "gunicorn", workers=2, **login_options(redis_server, session_secret=SECRET))
    idp.set_redirect_uris([f"{stack.nginx.url}/callback"])
    return stack


@pytest.fixture
def browser(pki: Pki) -> Iterator[Browser]:
    with Browser(pki.ca_file) as b:
        b.session.headers["Accept"] = HTML
        yield b


def test_eight_simultaneous_callbacks_exchange_the_code_once(
    login_stack: Stack, browser: Browser, idp: OidcProvider, pki: Pki
) -> None:
    callback, state_cookie = stop_before_callback(browser, login_stack.nginx.url)
    idp.reset_stats()
    gate = threading.Barrier(8)

    def one(_: int) -> requests.Response:
        gate.wait()
        return get_callback(callback, pki, state_cookie)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(one, range(8)))
    statuses = sorted(r.status_code for r in responses)
    exchanges = idp.stats()["tokens"]
    print(f"\n8 simultaneous callbacks: statuses {statuses}; code exchanges at the IdP {exchanges}")
    assert statuses == [302] + [400] * 7
    assert exchanges == 1
    for response in responses:
        if response.status_code == 400:
            assert response.json() == {"error": "invalid_request",
                                       "error_description": "the login has expired or was already used"}


@pytest.mark.parametrize(("page", "expected"), [
    pytest.param("/caf%C3%A9/%E2%9C%93?q=%C3%A9", "/caf%C3%A9/%E2%9C%93?q=%C3%A9", id="utf-8"),
    pytest.param("/.%2F%2Fevil.example/x", "/evil.example/x", id="dot-slash-slash"),
    pytest.param("/%2F%2Fevil.example/x?a=b", "/evil.example/x?a=b", id="slash-slash"),
    pytest.param("/%5Cevil.example", "/%5Cevil.example", id="backslash"),
    pytest.param("/a/%2E/b/%2E%2E/c", "/a/c", id="dot-segments"),
])
def test_return_paths_come_back_to_this_origin(
    login_stack: Stack, browser: Browser, pki: Pki, page: str, expected: str
) -> None:
    url = login_stack.nginx.url
    callback, _ = stop_before_callback(browser, url, page)
    done = browser.get(callback)
    assert done.status_code == 302, done.text
    assert done.headers["Location"] == expected
    final = browser.follow(done)
    assert final.status_code == 200, final.text
    assert urlsplit(final.url)[:2] == urlsplit(url)[:2]  # the app's own origin
    assert final.json()["auth_method"] == "session"
    assert all(status < 500 for _, _, status in browser.history)


# -- logout of an ended session -------------------------------------------------------------------------------------


@pytest.mark.parametrize("redirect", ["", "/bye"])
def test_logout_with_an_idle_expired_session_finishes(
    stacks: StackFactory, idp: OidcProvider, redis_server: RedisServer, pki: Pki, redirect: str
) -> None:
    stack = stacks(idp, "gunicorn", workers=2, **token_options(
        redis_server, session_idling_timeout="1", logout_redirect_uri=redirect))
    opened = stack.call(idp.token("bound"), pki.alice)
    assert opened.status_code == 200, opened.text
    cookie, _ = cookie_of(opened)
    time.sleep(2.2)
    response = call(stack, cookie, None, path="/logout", method="POST")
    assert response.status_code == (302 if redirect else 204), response.text
    assert response.headers.get("Location") == (redirect or None)
    cleared, attributes = cookie_of(response)
    assert cleared == "" and "Max-Age=0" in attributes
    assert_bare_401(call(stack, cookie, pki.alice))
    assert COOKIE.startswith("__Host-") and STATE_COOKIE.startswith("__Host-")
