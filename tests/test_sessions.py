"""Sessions (certbound_wsgi.sessions), through the middleware; the browser login is in test_oidc_login.py.

Requests go through werkzeug's test client (``http://localhost``) with
``use_cookies=False``: every ``Cookie`` header is written by the test. Timeouts
run on an injected clock; the Redis tests use a real ``redis-server``.
"""

from __future__ import annotations

import functools
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, assume, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from werkzeug.http import parse_cookie
from werkzeug.test import Client, TestResponse, create_environ

from certbound_wsgi.binding import CERT_MISSING, THUMBPRINT_MISMATCH
from certbound_wsgi.cache.memory import MemoryStore
from certbound_wsgi.cache.seal import Sealer
from certbound_wsgi.dev.pki import Issued
from certbound_wsgi.errors import ConfigurationError
from certbound_wsgi.middleware import CertBoundMiddleware
from certbound_wsgi.types import WSGIApplication
from tests.conftest import CountingApp, ViaProxy, cert_env, make_settings, middleware_of
from tests.support.dpop import DPoPKey
from tests.support.redis_server import RedisServer
from tests.support.session_options import LOGIN, SECRET, SESSION
from tests.support.tokens import AUDIENCE, ISSUER, StaticDiscovery, TestIssuer

OTHER_SECRET = "another-secret-0123456789abcdefghij"
#: Secure, host-only and Path=/: the cookies take the __Host- prefix (RFC 6265bis section 4.1.3.2).
COOKIE = "__Host-session"
STATE_COOKIE = "__Host-session_login"
CACHE_SECRET = "cache-secret-0123456789"
HTU = "http://localhost/anything"


class FakeClock:
    """Wall-clock seconds that move only when told."""

    def __init__(self, now: float | None = None) -> None:
        self.now = float(int(time.time())) if now is None else now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def build(issuer: TestIssuer, app: WSGIApplication | None = None, *, clock: FakeClock | None = None,
          **overrides: Any) -> Client:
    """A client of ``app`` behind a middleware with sessions on (``SESSION`` plus ``overrides``)."""
    settings = make_settings(**{**SESSION, **overrides})
    kwargs: dict[str, Any] = {"clock": clock} if clock is not None else {}
    middleware = CertBoundMiddleware(app or CountingApp(), settings, discovery=StaticDiscovery(settings, issuer),
                                     **kwargs)
    return Client(ViaProxy(middleware), use_cookies=False)  # type: ignore[arg-type]  # wsgiref vs werkzeug WSGI types


def app_of(client: Client) -> CountingApp:
    app = middleware_of(client).app
    assert isinstance(app, CountingApp)
    return app


def get(client: Client, *, token: str | None = None, cookie: str | None = None, cert: Issued | None = None,
        path: str = "/anything", headers: dict[str, str] | None = None, cookie_name: str = COOKIE,
        scheme: str = "Bearer", method: str = "GET") -> TestResponse:
    all_headers = dict(headers or {})
    if token is not None:
        all_headers["Authorization"] = f"{scheme} {token}"
    if cookie is not None:
        all_headers["Cookie"] = f"{cookie_name}={cookie}"
    return client.open(path, method=method, headers=all_headers,
                       environ_overrides=cert_env(cert.cert_pem if cert else None))


def set_cookie_values(response: TestResponse, name: str = COOKIE) -> list[str]:
    """The values the response sets for cookie ``name`` (empty values included)."""
    values = []
    for header in response.headers.getlist("Set-Cookie"):
        key, _, value = header.split(";", 1)[0].partition("=")
        if key == name:
            values.append(value)
    return values


def new_cookie(response: TestResponse, name: str = COOKIE) -> str | None:
    """The one non-empty value the response sets for cookie ``name``, or ``None``."""
    values = [v for v in set_cookie_values(response, name) if v]
    assert len(values) <= 1
    return values[0] if values else None


def attributes(response: TestResponse, name: str = COOKIE) -> set[str]:
    """The attributes of the response's ``Set-Cookie`` for ``name``."""
    (header,) = [h for h in response.headers.getlist("Set-Cookie") if h.startswith(f"{name}=")]
    return set(header.split("; ")[1:])


def clears(response: TestResponse, name: str = COOKIE) -> bool:
    return any(h.startswith(f"{name}=;") and "Max-Age=0" in h for h in response.headers.getlist("Set-Cookie"))


def sid_of(cookie: str) -> str:
    return cookie.rpartition(".")[0]


def login(client: Client, token: str, cert: Issued | None = None, **kwargs: Any) -> str:
    """A token request that opens a session: its cookie value."""
    response = get(client, token=token, cert=cert, **kwargs)
    assert response.status_code == 200, response.json
    cookie = new_cookie(response)
    assert cookie is not None
    return cookie


def description(response: TestResponse) -> str | None:
    body = response.json
    assert body is not None
    return body.get("error_description")


class FakeIntrospection:
    """Stands in for IntrospectionClient: every token is active, with the given ``cnf``."""

    def __init__(self, cnf: dict[str, Any], exp: int | None = None) -> None:
        self.cnf = cnf
        self.exp = exp
        self.calls = 0

    def introspect(self, token: str) -> dict[str, Any]:
        self.calls += 1
        return {"active": True, "aud": AUDIENCE, "sub": "alice", "exp": self.exp or int(time.time()) + 300,
                "cnf": self.cnf, "token_type": "Bearer"}


INTROSPECTION: dict[str, Any] = {
    "auth_methods": ("introspection", "session"),
    "client_id": "api",
    "client_secret": "introspection-secret-0123456789",
}


def introspecting(issuer: TestIssuer, cnf: dict[str, Any], **overrides: Any) -> tuple[Client, FakeIntrospection]:
    client = build(issuer, **{**INTROSPECTION, **overrides})
    fake = FakeIntrospection(cnf)
    introspection = middleware_of(client).introspection
    assert introspection is not None
    introspection._client = fake  # type: ignore[assignment]
    return client, fake


VIA = [pytest.param("bearer", id="bearer"), pytest.param("introspection", id="introspection")]


# -- sessions made by a bound token demand the same certificate --------------------------------------------------


CERT_USES = [
    pytest.param("alice", 200, None, id="same-cert"),
    pytest.param("mallory", 401, THUMBPRINT_MISMATCH, id="other-cert"),
    pytest.param(None, 401, CERT_MISSING, id="no-cert"),
]


@pytest.mark.parametrize("via", VIA)
@pytest.mark.parametrize(("who", "status", "message"), CERT_USES)
def test_a_bound_session_demands_its_certificate(
    issuer: TestIssuer, alice: Issued, mallory: Issued, alice_x5t: str, via: str, who: str | None, status: int,
    message: str | None,
) -> None:
    fake = None
    if via == "bearer":
        client = build(issuer)
        token = issuer.token(cnf={"x5t#S256": alice_x5t})
    else:
        client, fake = introspecting(issuer, {"x5t#S256": alice_x5t})
        token = "opaque-access-token-0123456789"
    cookie = login(client, token, alice)
    cert = {"alice": alice, "mallory": mallory, None: None}[who]
    response = get(client, cookie=cookie, cert=cert)
    assert response.status_code == status
    if status == 200:
        body = response.json
        assert body is not None
        assert body["auth_method"] == "session"
        assert body["remote_user"] == "alice"
        assert body["claims"]["cnf"] == {"x5t#S256": alice_x5t}
        assert body["thumbprint"] == alice_x5t
        assert new_cookie(response) is None  # no renewal yet
    else:
        assert description(response) == message
        assert f'error_description="{message}"' in response.headers["WWW-Authenticate"]
        assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    assert len(app_of(client).calls) == (2 if status == 200 else 1)
    if fake is not None:
        assert fake.calls == 1  # the session never asks the issuer again


@pytest.mark.parametrize("via", VIA)
@pytest.mark.parametrize("who", [pytest.param(None, id="no-cert"), pytest.param("alice", id="alice-cert"),
                                 pytest.param("mallory", id="mallory-cert")])
def test_an_unbound_session_in_optional_mode_needs_no_certificate(
    issuer: TestIssuer, alice: Issued, mallory: Issued, via: str, who: str | None
) -> None:
    if via == "bearer":
        client = build(issuer, proof_of_possession_mtls="optional")
        token = issuer.token()
    else:
        client, _ = introspecting(issuer, {}, proof_of_possession_mtls="optional")
        token = "opaque-unbound-token-0123456789"
    cookie = login(client, token)
    response = get(client, cookie=cookie, cert={"alice": alice, "mallory": mallory, None: None}[who])
    assert response.status_code == 200
    body = response.json
    assert body is not None
    assert body["auth_method"] == "session"
    assert body["remote_user"] == "alice"


def test_a_bound_token_in_optional_mode_still_binds_its_session(
    issuer: TestIssuer, alice: Issued, mallory: Issued, alice_x5t: str
) -> None:
    client = build(issuer, proof_of_possession_mtls="optional")
    cookie = login(client, issuer.token(cnf={"x5t#S256": alice_x5t}), alice)
    assert get(client, cookie=cookie, cert=alice).status_code == 200
    refused = get(client, cookie=cookie)
    assert refused.status_code == 401
    assert description(refused) == CERT_MISSING
    assert description(get(client, cookie=cookie, cert=mallory)) == THUMBPRINT_MISMATCH


# -- DPoP-bound sessions -------------------------------------------------------------------------------


DPOP: dict[str, Any] = {"proof_of_possession_dpop": "optional", "proof_of_possession_mtls": "optional",
                        "dpop_allowed_hosts": ("localhost",)}


def dpop_session(issuer: TestIssuer, key: DPoPKey) -> tuple[Client, str]:
    client = build(issuer, **DPOP)
    token = issuer.token(cnf={"jkt": key.jkt})
    response = get(client, token=token, scheme="DPoP", headers={"DPoP": key.proof("GET", HTU, token)})
    assert response.status_code == 200, response.json
    cookie = new_cookie(response)
    assert cookie is not None
    return client, cookie


DPOP_USES = [
    pytest.param(lambda key, other: {}, 401, "a DPoP proof is required", id="no-proof"),
    pytest.param(lambda key, other: {"DPoP": other.proof("GET", HTU)}, 401,
                 "the DPoP proof's key does not match the token's cnf.jkt", id="other-key"),
    pytest.param(lambda key, other: {"DPoP": key.proof("GET", "http://localhost/elsewhere")}, 401,
                 "the DPoP proof's htu does not match the request URI", id="proof-for-another-uri"),
    pytest.param(lambda key, other: {"DPoP": key.proof("POST", HTU)}, 401,
                 "the DPoP proof's htm does not match the request method", id="proof-for-another-method"),
    pytest.param(lambda key, other: {"DPoP": key.proof("GET", HTU, iat=time.time() - 3600)}, 401,
                 "the DPoP proof's iat is outside the accepted window", id="stale-proof"),
    pytest.param(lambda key, other: {"DPoP": key.proof("GET", HTU)}, 200, None, id="right-key-no-ath"),
]


@pytest.mark.parametrize(("proof", "status", "message"), DPOP_USES)
def test_a_dpop_session_demands_a_fresh_proof(
    issuer: TestIssuer, proof: Callable[[DPoPKey, DPoPKey], dict[str, str]], status: int, message: str | None
) -> None:
    key, other = DPoPKey(), DPoPKey()
    client, cookie = dpop_session(issuer, key)
    response = get(client, cookie=cookie, headers=proof(key, other))
    assert response.status_code == status
    if status == 200:
        body = response.json
        assert body is not None
        assert body["auth_method"] == "session"
        assert body["claims"]["cnf"] == {"jkt": key.jkt}
    else:
        assert description(response) == message
        assert ", ".join(response.headers.getlist("WWW-Authenticate")).count('error="invalid_dpop_proof"') == 1
        assert any(c.startswith("DPoP ") and "invalid_dpop_proof" in c
                   for c in response.headers.getlist("WWW-Authenticate"))


def test_a_dpop_session_proof_cannot_be_replayed(issuer: TestIssuer) -> None:
    key = DPoPKey()
    client, cookie = dpop_session(issuer, key)
    proof = key.proof("GET", HTU)
    assert get(client, cookie=cookie, headers={"DPoP": proof}).status_code == 200
    replayed = get(client, cookie=cookie, headers={"DPoP": proof})
    assert replayed.status_code == 401
    assert description(replayed) == "the DPoP proof has already been used"
    assert get(client, cookie=cookie, headers={"DPoP": key.proof("GET", HTU)}).status_code == 200
    assert len(app_of(client).calls) == 3  # login, first use, fresh proof


def test_a_dpop_session_ignores_a_client_certificate(issuer: TestIssuer, alice: Issued) -> None:
    key = DPoPKey()
    client, cookie = dpop_session(issuer, key)
    assert get(client, cookie=cookie, cert=alice).status_code == 401
    assert get(client, cookie=cookie, cert=alice, headers={"DPoP": key.proof("GET", HTU)}).status_code == 200


# -- no fixation ------------------------------------------------------------------------------------------


def test_each_login_gets_a_new_id(issuer: TestIssuer, alice: Issued, alice_x5t: str) -> None:
    """Each token its own session (the same token: one session, see the next test)."""
    client = build(issuer)
    cookies = [login(client, issuer.token(jti=f"t{i}", cnf={"x5t#S256": alice_x5t}), alice) for i in range(4)]
    assert len({sid_of(c) for c in cookies}) == 4
    assert all(len(sid_of(c)) >= 43 for c in cookies)  # a 256-bit HMAC, then the generation and end
    assert [get(client, cookie=c, cert=alice).status_code for c in cookies] == [200] * 4


def test_one_token_opens_one_session(issuer: TestIssuer, alice: Issued, alice_token: str) -> None:
    """A client that never returns the cookie finds the same session: no new record per request."""
    client = build(issuer)
    sessions = middleware_of(client).sessions
    assert sessions is not None
    store = sessions._store_impl
    cookies = {login(client, alice_token, alice) for _ in range(50)}
    assert len(cookies) == 1
    assert isinstance(store, MemoryStore) and len(store) == 1
    # Sending the cookie back with the token: nothing to set.
    (cookie,) = cookies
    again = get(client, token=alice_token, cookie=cookie, cert=alice)
    assert again.status_code == 200 and set_cookie_values(again) == []
    assert get(client, cookie=cookie, cert=alice).json["auth_method"] == "session"  # type: ignore[index]


def test_an_attacker_chosen_cookie_is_never_adopted(issuer: TestIssuer, alice: Issued, alice_token: str) -> None:
    client = build(issuer)
    mw = middleware_of(client)
    chosen = secrets.token_urlsafe(32)
    forged = Sealer(OTHER_SECRET, "session")
    planted = f"{chosen}.{forged.mac(chosen)}"
    assert mw.sessions is not None and planted != mw.sessions.signed(chosen)
    # The victim logs in with the attacker's cookie in the jar: the token passes, a NEW session is made.
    response = get(client, token=alice_token, cookie=planted, cert=alice)
    assert response.status_code == 200
    issued = new_cookie(response)
    assert issued is not None
    assert sid_of(issued) != chosen
    # The attacker's cookie opens nothing, even with the victim's certificate.
    refused = get(client, cookie=planted, cert=alice)
    assert refused.status_code == 401
    assert refused.headers["WWW-Authenticate"] == 'Bearer realm="api"'
    assert get(client, cookie=issued, cert=alice).status_code == 200


def test_a_planted_valid_session_is_not_upgraded_by_a_login(
    issuer: TestIssuer, alice: Issued, mallory: Issued, alice_token: str, mallory_x5t: str
) -> None:
    client = build(issuer)
    attacker = login(client, issuer.token(sub="mallory", cnf={"x5t#S256": mallory_x5t}), mallory)
    # alice logs in by token while mallory's (valid) cookie sits in her jar.
    response = get(client, token=alice_token, cookie=attacker, cert=alice)
    assert response.status_code == 200
    body = response.json
    assert body is not None and body["remote_user"] == "alice" and body["auth_method"] == "bearer"
    issued = new_cookie(response)
    assert issued is None or sid_of(issued) != sid_of(attacker)
    # mallory's session is still mallory's: alice's login did not authenticate it.
    after = get(client, cookie=attacker, cert=mallory)
    assert after.status_code == 200
    assert after.json is not None and after.json["remote_user"] == "mallory"
    assert get(client, cookie=attacker, cert=alice).status_code == 401


def test_a_login_with_a_dead_session_cookie_gets_a_new_session(
    issuer: TestIssuer, alice: Issued, alice_x5t: str
) -> None:
    clock = FakeClock()
    client = build(issuer, clock=clock, session_idling_timeout=100)
    token = issuer.token(iat=int(clock.now), exp=int(clock.now) + 3000, cnf={"x5t#S256": alice_x5t})
    cookie = login(client, token, alice)
    clock.advance(101)
    assert get(client, cookie=cookie, cert=alice).status_code == 401  # expired and deleted
    response = get(client, token=token, cookie=cookie, cert=alice)
    assert response.status_code == 200
    assert new_cookie(response) is not None


# -- timeouts -------------------------------------------------------------------------------------------------


def clocked(issuer: TestIssuer, alice_x5t: str, lifetime: int = 100_000, **overrides: Any) -> tuple[
        Client, FakeClock, str]:
    clock = FakeClock()
    client = build(issuer, clock=clock, **overrides)
    token = issuer.token(iat=int(clock.now), exp=int(clock.now) + lifetime, cnf={"x5t#S256": alice_x5t})
    return client, clock, token


def test_idle_timeout(issuer: TestIssuer, alice: Issued, alice_x5t: str) -> None:
    client, clock, token = clocked(issuer, alice_x5t, session_idling_timeout=100, session_rolling_timeout=0)
    cookie = login(client, token, alice)
    # Used within the idle timeout, again and again: alive long past 100 s in total.
    for _ in range(4):
        clock.advance(90)
        assert get(client, cookie=cookie, cert=alice).status_code == 200
    clock.advance(101)
    expired = get(client, cookie=cookie, cert=alice)
    assert expired.status_code == 401
    assert description(expired) == "the session has expired"
    assert clears(expired)
    assert 'error="invalid_token"' in expired.headers["WWW-Authenticate"]
    # Gone server-side: the next try is a plain "no credentials".
    assert get(client, cookie=cookie, cert=alice).headers["WWW-Authenticate"] == 'Bearer realm="api"'


def test_rolling_renewal_issues_a_new_id(issuer: TestIssuer, alice: Issued, mallory: Issued, alice_x5t: str) -> None:
    client, clock, token = clocked(issuer, alice_x5t, session_rolling_timeout=100, session_idling_timeout=0)
    first = login(client, token, alice)
    clock.advance(40)
    unchanged = get(client, cookie=first, cert=alice)
    assert unchanged.status_code == 200 and new_cookie(unchanged) is None
    clock.advance(11)  # 51 s: past half of the rolling timeout
    renewed = get(client, cookie=first, cert=alice)
    assert renewed.status_code == 200
    second = new_cookie(renewed)
    assert second is not None and sid_of(second) != sid_of(first)
    assert attributes(renewed) == {"Path=/", "Secure", "HttpOnly", "SameSite=Lax"}
    assert get(client, cookie=first, cert=alice).status_code == 401  # the old id stopped working
    # The renewed session keeps its binding.
    assert description(get(client, cookie=second, cert=mallory)) == THUMBPRINT_MISMATCH
    kept = get(client, cookie=second, cert=alice)
    assert kept.status_code == 200 and new_cookie(kept) is None
    # Renewed every half period, a session lives far past the rolling timeout.
    cookie = second
    for _ in range(5):
        clock.advance(60)
        response = get(client, cookie=cookie, cert=alice)
        assert response.status_code == 200
        fresh = new_cookie(response)
        assert fresh is not None
        cookie = fresh


def test_rolling_timeout_without_renewal(issuer: TestIssuer, alice: Issued, alice_x5t: str) -> None:
    client, clock, token = clocked(issuer, alice_x5t, session_rolling_timeout=100, session_idling_timeout=0)
    cookie = login(client, token, alice)
    clock.advance(101)
    expired = get(client, cookie=cookie, cert=alice)
    assert expired.status_code == 401
    assert description(expired) == "the session has expired"
    assert clears(expired)


def test_a_refused_request_does_not_rotate_the_owners_session(
    issuer: TestIssuer, alice: Issued, mallory: Issued, alice_x5t: str
) -> None:
    client, clock, token = clocked(issuer, alice_x5t, session_rolling_timeout=100, session_idling_timeout=0)
    cookie = login(client, token, alice)
    clock.advance(60)
    assert get(client, cookie=cookie, cert=mallory).status_code == 401
    assert get(client, cookie=cookie, cert=alice).status_code == 200


def test_absolute_timeout_even_when_used_continuously(issuer: TestIssuer, alice: Issued, alice_x5t: str) -> None:
    client, clock, token = clocked(issuer, alice_x5t, session_absolute_timeout=100, session_rolling_timeout=40,
                                   session_idling_timeout=50)
    cookie = login(client, token, alice)
    statuses = []
    for _ in range(5):
        clock.advance(25)
        response = get(client, cookie=cookie, cert=alice)
        statuses.append(response.status_code)
        cookie = new_cookie(response) or cookie
    assert statuses == [200, 200, 200, 401, 401]  # 25, 50, 75 s alive; 100, 125 s over


@pytest.mark.parametrize("via", VIA)
def test_the_tokens_exp_caps_the_session(issuer: TestIssuer, alice: Issued, alice_x5t: str, via: str) -> None:
    clock = FakeClock()
    exp = int(clock.now) + 50
    if via == "bearer":
        client = build(issuer, clock=clock)
        token = issuer.token(iat=int(clock.now), exp=exp, cnf={"x5t#S256": alice_x5t})
    else:
        client = build(issuer, clock=clock, **INTROSPECTION)
        introspection = middleware_of(client).introspection
        assert introspection is not None
        introspection._client = FakeIntrospection({"x5t#S256": alice_x5t}, exp=exp)  # type: ignore[assignment]
        token = "opaque-short-lived-token-0123456789"
    cookie = login(client, token, alice)
    clock.advance(49)
    assert get(client, cookie=cookie, cert=alice).status_code == 200
    clock.advance(2)
    assert get(client, cookie=cookie, cert=alice).status_code == 401


# -- cookie attributes ---------------------------------------------------------------------------------------------


COOKIE_SETTINGS = [
    pytest.param({}, COOKIE, {"Path=/", "Secure", "HttpOnly", "SameSite=Lax"}, id="defaults"),
    pytest.param({"session_cookie_secure": False, "session_cookie_http_only": False,
                  "session_cookie_same_site": "Strict", "session_cookie_path": "/api",
                  "session_cookie_domain": "example.test", "session_cookie_name": "sid"},
                 "sid", {"Path=/api", "Domain=example.test", "SameSite=Strict"}, id="everything-changed"),
    pytest.param({"session_cookie_same_site": "None"}, COOKIE, {"Path=/", "Secure", "HttpOnly", "SameSite=None"},
                 id="same-site-none-secure"),
]


@pytest.mark.parametrize(("overrides", "name", "expected"), COOKIE_SETTINGS)
def test_cookie_attributes_follow_the_settings(
    issuer: TestIssuer, alice: Issued, alice_token: str, overrides: dict[str, Any], name: str, expected: set[str]
) -> None:
    client = build(issuer, logout_path="/logout", **overrides)
    response = get(client, token=alice_token, cert=alice)
    assert response.status_code == 200
    assert attributes(response, name) == expected
    cookie = new_cookie(response, name)
    assert cookie is not None
    assert get(client, cookie=cookie, cert=alice, cookie_name=name).status_code == 200
    # The clearing cookie carries the same attributes, so that the browser replaces the right one.
    logout = get(client, cookie=cookie, cert=alice, path="/logout", cookie_name=name, method="POST")
    assert logout.status_code == 204
    assert set_cookie_values(logout, name) == [""]
    assert attributes(logout, name) == expected | {"Max-Age=0"}


@pytest.mark.parametrize(("same_site", "secure", "error"), [
    pytest.param("None", False, True, id="none-without-secure"),
    pytest.param("None", True, False, id="none-with-secure"),
    pytest.param("Lax", False, False, id="lax-without-secure"),
    pytest.param("Strict", False, False, id="strict-without-secure"),
])
def test_same_site_none_requires_secure(same_site: str, secure: bool, error: bool) -> None:
    options = {**SESSION, "session_cookie_same_site": same_site, "session_cookie_secure": secure}
    if error:
        with pytest.raises(ConfigurationError) as raised:
            make_settings(**options)
        assert raised.value.option == "session_cookie_same_site"
        assert "session_cookie_secure" in str(raised.value)
    else:
        assert make_settings(**options).session_cookie_same_site == same_site


# -- Redis: instances apart, nothing readable, nothing forgeable ------------------------------------------------


@pytest.fixture()
def redis_db(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    client.flushdb()
    try:
        yield client
    finally:
        client.close()


def on_redis(issuer: TestIssuer, server: RedisServer, secret: str = SECRET, **overrides: Any) -> Client:
    options: dict[str, Any] = {"redis_url": server.url, "cache_secret": CACHE_SECRET, "session_secret": secret,
                               "redis_timeout": 0.5}
    return build(issuer, **{**options, **overrides})


def session_keys(db: redis.Redis, secret: str) -> list[bytes]:
    prefix = f"certbound:{Sealer(secret, 'session').namespace}:session:"
    return [key for key in db.scan_iter(match=prefix + "*")]


def test_instances_with_different_secrets_stay_apart(
    issuer: TestIssuer, redis_server: RedisServer, redis_db: redis.Redis, alice: Issued, alice_token: str
) -> None:
    a = on_redis(issuer, redis_server, SECRET)
    b = on_redis(issuer, redis_server, OTHER_SECRET)
    cookie_a = login(a, alice_token, alice)
    cookie_b = login(b, alice_token, alice)
    assert get(a, cookie=cookie_a, cert=alice).status_code == 200
    assert get(b, cookie=cookie_b, cert=alice).status_code == 200
    assert get(b, cookie=cookie_a, cert=alice).status_code == 401
    assert get(a, cookie=cookie_b, cert=alice).status_code == 401
    # Even an id re-signed with the other instance's secret finds nothing: the key namespaces differ.
    b_sessions, a_sessions = middleware_of(b).sessions, middleware_of(a).sessions
    assert b_sessions is not None and a_sessions is not None
    assert get(b, cookie=b_sessions.signed(sid_of(cookie_a)), cert=alice).status_code == 401
    assert get(a, cookie=a_sessions.signed(sid_of(cookie_b)), cert=alice).status_code == 401
    keys_a, keys_b = session_keys(redis_db, SECRET), session_keys(redis_db, OTHER_SECRET)
    assert len(keys_a) == 1 and len(keys_b) == 1
    assert Sealer(SECRET, "session").namespace != Sealer(OTHER_SECRET, "session").namespace


def test_redis_never_sees_a_session_id(
    issuer: TestIssuer, redis_server: RedisServer, redis_db: redis.Redis, alice: Issued, alice_token: str,
    alice_x5t: str,
) -> None:
    client = on_redis(issuer, redis_server)
    cookies = [login(client, issuer.token(jti=f"t{i}", cnf={"x5t#S256": alice_x5t}), alice) for i in range(3)]
    keys = list(redis_db.scan_iter(match="*"))
    assert len(session_keys(redis_db, SECRET)) == 3
    secrets_seen = [part.encode() for c in cookies for part in (sid_of(c), c.rpartition(".")[2])]
    for key in keys:
        value = redis_db.get(key) or b""
        for secret in secrets_seen:
            assert secret not in key
            assert secret not in value
        # Sealed: not even the claims are readable.
        assert b"alice" not in value and alice_x5t.encode() not in value


TAMPERINGS = [
    pytest.param(lambda v: v[:20] + bytes([v[20] ^ 1]) + v[21:], id="flip-ciphertext-byte"),
    pytest.param(lambda v: bytes([v[0] ^ 0x80]) + v[1:], id="flip-nonce-byte"),
    pytest.param(lambda v: v[:-1] + bytes([v[-1] ^ 1]), id="flip-tag-byte"),
    pytest.param(lambda v: v[:-5], id="truncated"),
    pytest.param(lambda v: b"", id="empty"),
    pytest.param(lambda v: b'{"m":"bearer","c":{"sub":"mallory"},"x":null,"j":null,"p":false,"t":[0,0,0,9e99]}',
                 id="plaintext-record"),
]


@pytest.mark.parametrize("tamper", TAMPERINGS)
def test_a_tampered_redis_value_is_no_session(
    issuer: TestIssuer, redis_server: RedisServer, redis_db: redis.Redis, alice: Issued, alice_token: str,
    tamper: Callable[[bytes], bytes],
) -> None:
    client = on_redis(issuer, redis_server, proof_of_possession_mtls="optional")
    cookie = login(client, alice_token, alice)
    (key,) = session_keys(redis_db, SECRET)
    value = redis_db.get(key)
    assert isinstance(value, bytes)
    redis_db.set(key, tamper(value), keepttl=True)
    response = get(client, cookie=cookie, cert=alice)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="api"'
    assert len(app_of(client).calls) == 1  # the login only


def test_a_session_moved_to_another_key_is_no_session(
    issuer: TestIssuer, redis_server: RedisServer, redis_db: redis.Redis, alice: Issued, mallory: Issued,
    alice_token: str, mallory_x5t: str,
) -> None:
    client = on_redis(issuer, redis_server)
    alices = login(client, alice_token, alice)
    keys_before = set(session_keys(redis_db, SECRET))
    mallorys = login(client, issuer.token(sub="mallory", cnf={"x5t#S256": mallory_x5t}), mallory)
    (mallory_key,) = set(session_keys(redis_db, SECRET)) - keys_before
    (alice_key,) = keys_before
    # Whoever can write to Redis copies alice's sealed record under mallory's key.
    redis_db.set(mallory_key, redis_db.get(alice_key) or b"", keepttl=True)
    assert get(client, cookie=mallorys, cert=alice).status_code == 401
    assert get(client, cookie=alices, cert=alice).status_code == 200


def test_redis_down_is_503_for_a_session(
    issuer: TestIssuer, tmp_path: Path, alice: Issued, alice_token: str
) -> None:
    server = RedisServer(tmp_path / "redis")
    try:
        client = on_redis(issuer, server, proof_of_possession_mtls="optional")
        cookie = login(client, alice_token, alice)
        assert get(client, cookie=cookie, cert=alice).status_code == 200
        server.kill()
        for _ in range(2):  # the first failure, then the open breaker
            response = get(client, cookie=cookie, cert=alice)
            assert response.status_code == 503
            assert int(response.headers["Retry-After"]) >= 1
            body = response.json
            assert body is not None and body["error"] == "temporarily_unavailable"
        assert len(app_of(client).calls) == 2
    finally:
        server.stop()


def test_logout_removes_the_redis_record(
    issuer: TestIssuer, redis_server: RedisServer, redis_db: redis.Redis, alice: Issued, alice_token: str
) -> None:
    client = on_redis(issuer, redis_server, logout_path="/logout")
    cookie = login(client, alice_token, alice)
    assert len(session_keys(redis_db, SECRET)) == 1
    assert get(client, cookie=cookie, cert=alice, path="/logout", method="POST").status_code == 204
    assert session_keys(redis_db, SECRET) == []
    assert get(client, cookie=cookie, cert=alice).status_code == 401


def test_logout_never_reports_success_when_the_record_survives(
    issuer: TestIssuer, redis_server: RedisServer, redis_db: redis.Redis, alice: Issued, alice_token: str
) -> None:
    client = on_redis(issuer, redis_server, logout_path="/logout", redis_timeout=0.05)
    cookie = login(client, alice_token, alice)
    redis_db.execute_command("CLIENT", "PAUSE", "300", "ALL")
    assert get(client, cookie=cookie, cert=alice).status_code == 503  # times out: the breaker opens
    logout = get(client, cookie=cookie, cert=alice, path="/logout", method="POST")
    time.sleep(1.2)  # the pause and the breaker are over
    after = get(client, cookie=cookie, cert=alice)
    assert logout.status_code >= 500 or after.status_code == 401, (logout.status_code, after.status_code)


# -- proof_of_possession_auth_methods_validation --------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "refused"), [
    pytest.param({"proof_of_possession_auth_methods_validation": True}, True, id="mtls-strict-validation-on"),
    pytest.param({"proof_of_possession_auth_methods_validation": True, "proof_of_possession_mtls": "optional"}, True,
                 id="mtls-optional-validation-on"),
    pytest.param({"proof_of_possession_auth_methods_validation": True, "proof_of_possession_mtls": "off",
                  "proof_of_possession_dpop": "optional", "dpop_allowed_hosts": ("localhost",)}, True,
                 id="dpop-only-validation-on"),
    pytest.param({"proof_of_possession_auth_methods_validation": False}, False, id="mtls-strict-validation-off"),
    pytest.param({"proof_of_possession_auth_methods_validation": True, "proof_of_possession_mtls": "off",
                  "proof_of_possession_dpop": "off"}, False, id="pop-off-validation-on"),
])
def test_pop_auth_methods_validation(issuer: TestIssuer, overrides: dict[str, Any], refused: bool) -> None:
    options = {**LOGIN, **overrides}
    if refused:
        with pytest.raises(ConfigurationError) as raised:
            make_settings(**options)
        assert raised.value.option == "auth_methods"
        assert "authorization_code" in str(raised.value)
        assert "proof_of_possession_auth_methods_validation" in str(raised.value)
    else:
        settings = make_settings(**options)
        assert settings.auth_methods == ("bearer", "session", "authorization_code")
        middleware = CertBoundMiddleware(CountingApp(), settings, discovery=StaticDiscovery(settings, issuer))
        assert middleware.login is not None


def test_unbound_and_bound_sessions_side_by_side(
    issuer: TestIssuer, alice: Issued, mallory: Issued, alice_token: str, alice_x5t: str
) -> None:
    client = build(issuer, **LOGIN)
    mw = middleware_of(client)
    assert mw.sessions is not None
    unbound = mw.sessions.create("authorization_code", {"sub": "bob", "iss": ISSUER}, x5t=None, jkt=None, pop=False,
                                 token_exp=None)
    assert unbound.set_cookie is not None
    unbound_cookie = unbound.set_cookie.split(";")[0].partition("=")[2]
    bound_cookie = login(client, alice_token, alice)
    rows = [
        (unbound_cookie, None, 200, "bob"),
        (unbound_cookie, mallory, 200, "bob"),
        (bound_cookie, alice, 200, "alice"),
        (bound_cookie, None, 401, CERT_MISSING),
        (bound_cookie, mallory, 401, THUMBPRINT_MISMATCH),
    ]
    for cookie, cert, status, expected in rows:
        response = get(client, cookie=cookie, cert=cert)
        assert response.status_code == status, (expected, response.json)
        body = response.json
        assert body is not None
        if status == 200:
            assert body["auth_method"] == "session" and body["remote_user"] == expected
        else:
            assert body["error_description"] == expected
    assert bound_cookie != unbound_cookie


# -- logout ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "status", "location"), [
    pytest.param({}, 204, None, id="no-content"),
    pytest.param({"logout_redirect_uri": "https://app.test/goodbye"}, 302, "https://app.test/goodbye",
                 id="absolute-redirect"),
    pytest.param({"logout_redirect_uri": "/goodbye"}, 302, "/goodbye", id="relative-redirect"),
])
def test_logout_ends_the_session(
    issuer: TestIssuer, alice: Issued, alice_token: str, overrides: dict[str, Any], status: int, location: str | None
) -> None:
    client = build(issuer, logout_path="/logout", **overrides)
    cookie = login(client, alice_token, alice)
    assert get(client, cookie=cookie, cert=alice).status_code == 200
    response = get(client, cookie=cookie, cert=alice, path="/logout", method="DELETE")
    assert response.status_code == status
    assert response.headers.get("Location") == location
    assert clears(response)
    assert response.headers["Cache-Control"] == "no-store"
    refused = get(client, cookie=cookie, cert=alice)
    assert refused.status_code == 401
    assert refused.headers["WWW-Authenticate"] == 'Bearer realm="api"'
    assert len(app_of(client).calls) == 2  # the login and the one use; never the logout


def test_logout_without_a_session_is_harmless(issuer: TestIssuer, alice: Issued, alice_token: str) -> None:
    client = build(issuer, logout_path="/logout")
    cookie = login(client, alice_token, alice)
    for headers in ({}, {"Cookie": f"{COOKIE}=garbage"}, {"Cookie": f"{COOKIE}={sid_of(cookie)}.bad-mac"}):
        response = client.post("/logout", headers=headers)
        assert response.status_code == 204
        assert clears(response)
    assert get(client, cookie=cookie, cert=alice).status_code == 200  # someone else's logout did not end it


@pytest.mark.parametrize(("cert_name", "status"), [
    pytest.param(None, 401, id="no-certificate"),
    pytest.param("mallory", 401, id="another-certificate"),
])
def test_a_stolen_cookie_cannot_log_the_owner_out(
    issuer: TestIssuer, alice: Issued, mallory: Issued, alice_token: str, cert_name: str | None, status: int
) -> None:
    client = build(issuer, logout_path="/logout")
    cookie = login(client, alice_token, alice)
    thief = {"mallory": mallory}.get(cert_name or "")
    response = get(client, cookie=cookie, cert=thief, path="/logout", method="POST")
    assert response.status_code == status
    assert not clears(response)
    assert get(client, cookie=cookie, cert=alice).status_code == 200  # the owner is still logged in


def test_get_does_not_log_out_by_default(issuer: TestIssuer, alice: Issued, alice_token: str) -> None:
    """logout_methods defaults to POST and DELETE: a cross-site link cannot end a session."""
    client = build(issuer, logout_path="/logout")
    cookie = login(client, alice_token, alice)
    response = get(client, cookie=cookie, cert=alice, path="/logout")
    assert response.status_code == 200  # an ordinary request, answered by the app
    assert not clears(response)
    assert get(client, cookie=cookie, cert=alice).status_code == 200
    allowed = build(issuer, logout_path="/logout", logout_methods="GET")
    cookie = login(allowed, alice_token, alice)
    assert get(allowed, cookie=cookie, cert=alice, path="/logout").status_code == 204


# -- hypothesis: no Cookie header is a way in ---------------------------------------------------------------------


@functools.cache
def fuzz_target() -> tuple[CertBoundMiddleware, CountingApp, str]:
    """A middleware with one live session that passes on its cookie alone (unbound, mtls optional)."""
    issuer = TestIssuer()
    client = build(issuer, proof_of_possession_mtls="optional", logout_path="/logout")
    cookie = login(client, issuer.token())
    app = app_of(client)
    mw = middleware_of(client)
    assert call(mw, f"{COOKIE}={cookie}")[0] == 200
    app.calls.clear()
    return mw, app, cookie


def call(mw: CertBoundMiddleware, cookie_header: str) -> tuple[int, list[tuple[str, str]]]:
    environ = create_environ("/anything")
    environ["HTTP_COOKIE"] = cookie_header
    captured: list[Any] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        captured.extend([int(status.split()[0]), headers])

    b"".join(mw(environ, start_response))
    return captured[0], captured[1]


def assert_refused(mw: CertBoundMiddleware, app: CountingApp, header: str) -> None:
    status, headers = call(mw, header)
    assert status in (400, 401), (status, header)
    assert any(name == "WWW-Authenticate" and value.startswith("Bearer realm=") for name, value in headers)
    assert app.calls == []


LATIN1 = st.text(alphabet=st.characters(max_codepoint=0xFF), max_size=300)
FUZZ = hsettings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(header=st.one_of(
    LATIN1,
    st.binary(max_size=300).map(lambda b: b.decode("latin-1")),
    LATIN1.map(lambda v: f"{COOKIE}={v}"),
    st.tuples(LATIN1, LATIN1).map(lambda p: f"{p[0]}; {COOKIE}={p[1]}"),
))
def test_arbitrary_cookie_headers_are_refused(header: str) -> None:
    mw, app, _ = fuzz_target()
    assert_refused(mw, app, header)


MUTATION = st.tuples(st.sampled_from(["replace", "insert", "delete", "truncate", "swapcase"]),
                     st.integers(min_value=0, max_value=1000), st.characters(max_codepoint=0xFF))


def mutate(value: str, mutations: list[tuple[str, int, str]]) -> str:
    for kind, where, char in mutations:
        i = where % (len(value) + 1)
        if kind == "replace" and value:
            i %= len(value)
            value = value[:i] + char + value[i + 1:]
        elif kind == "insert":
            value = value[:i] + char + value[i:]
        elif kind == "delete" and value:
            i %= len(value)
            value = value[:i] + value[i + 1:]
        elif kind == "truncate":
            value = value[:i]
        elif kind == "swapcase" and value:
            i %= len(value)
            value = value[:i] + value[i].swapcase() + value[i + 1:]
    return value


def parsed(header: str) -> str | None:
    try:
        return parse_cookie(header).get(COOKIE)
    except (UnicodeError, ValueError):
        return None


@FUZZ
@given(mutations=st.lists(MUTATION, min_size=1, max_size=4),
       prefix=st.sampled_from(["", "a=b; ", f"{STATE_COOKIE}=x; "]))
def test_mutated_session_cookies_are_refused(mutations: list[tuple[str, int, str]], prefix: str) -> None:
    mw, app, cookie = fuzz_target()
    header = f"{prefix}{COOKIE}={mutate(cookie, mutations)}"
    # The same cookie written differently (quoted, with a trailing ";") is the same cookie, not a mutation.
    assume(parsed(header) != cookie)
    assert_refused(mw, app, header)
