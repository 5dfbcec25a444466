"""The rules of issue 12, one test (or table) each: store writes, revocation, bounds, cookies, logout.

Through the middleware with werkzeug's test client and an injected clock; the
Redis tests use a real ``redis-server`` and count its commands with
``INFO commandstats``. The helpers are those of :mod:`tests.test_sessions`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from certbound_wsgi.binding import CERT_MISSING, CLAIM_MISSING
from certbound_wsgi.cache.memory import MemoryStore
from certbound_wsgi.cache.redis import RedisCache, make_client
from certbound_wsgi.cache.seal import Sealer
from certbound_wsgi.introspection import IntrospectionError
from certbound_wsgi.sessions import CookieId, _RedisStore, cookie_name
from certbound_wsgi.stats import Stats
from tests.conftest import make_settings
from tests.support.dpop import DPoPKey
from tests.support.redis_server import RedisServer
from tests.support.tokens import AUDIENCE, ISSUER, TestIssuer

from .test_oidc_login import STATE_COOKIE, browser, callback, start_login, with_token_endpoint
from .test_sessions import (
    CACHE_SECRET,
    HTU,
    INTROSPECTION,
    LOGIN,
    FakeClock,
    attributes,
    build,
    clears,
    description,
    get,
    login,
    middleware_of,
    new_cookie,
    set_cookie_values,
)

#: Commands that change the data set (what "a store write" means here).
WRITES = frozenset({"set", "setex", "psetex", "setnx", "getset", "getdel", "del", "unlink", "expire", "pexpire",
                    "eval", "evalsha", "hset", "incr", "mset"})


@pytest.fixture
def db(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    client.flushdb()
    client.config_resetstat()
    try:
        yield client
    finally:
        client.close()


def calls(db: redis.Redis, names: frozenset[str] | None = None) -> int:
    """Commands Redis has run since the last reset: those in ``names``, or all but this test's own."""
    total = 0
    for key, value in db.info("commandstats").items():
        name = key.removeprefix("cmdstat_").split("|")[0]
        if (names is None and name not in {"info", "config", "flushdb", "dbsize", "scan", "get", "keys"}) or (
                names is not None and name in names):
            total += int(value["calls"])
    return total


def on_redis(issuer: TestIssuer, server: RedisServer, **overrides: Any) -> Any:
    return build(issuer, **{"redis_url": server.url, "cache_secret": CACHE_SECRET, "redis_timeout": 0.5,
                            **overrides})


# -- no write amplification ----------------------------------------------------------------------------------------


def test_one_write_for_a_thousand_cookieless_requests(
    issuer: TestIssuer, redis_server: RedisServer, db: redis.Redis, alice: Any, alice_token: str
) -> None:
    clock = FakeClock()
    client = on_redis(issuer, redis_server, clock=clock)
    cookies = set()
    for _ in range(1000):
        response = get(client, token=alice_token, cert=alice)
        assert response.status_code == 200
        cookies.update(set_cookie_values(response))
    assert len(cookies) == 1  # the same session every time
    assert calls(db, WRITES) == 1
    assert calls(db, frozenset({"get"})) == 1  # the first request's look-up only: no I/O after it
    assert db.dbsize() == 1
    # Past cache_l1_ttl the process asks again (a read), and still writes nothing.
    clock.advance(6)
    assert get(client, token=alice_token, cert=alice).status_code == 200
    assert calls(db, WRITES) == 1
    assert calls(db, frozenset({"get"})) == 2


def test_two_processes_open_one_session(
    issuer: TestIssuer, redis_server: RedisServer, db: redis.Redis, alice: Any, alice_token: str
) -> None:
    """Two middlewares (two workers) on one Redis: one record, one write, one cookie that works on both."""
    a, b = on_redis(issuer, redis_server), on_redis(issuer, redis_server)
    cookie_a, cookie_b = login(a, alice_token, alice), login(b, alice_token, alice)
    assert cookie_a == cookie_b
    assert calls(db, WRITES) == 1
    assert get(b, cookie=cookie_a, cert=alice).json["auth_method"] == "session"  # type: ignore[index]


def test_a_known_session_costs_no_store_io_on_a_bearer_request(
    issuer: TestIssuer, redis_server: RedisServer, db: redis.Redis, alice: Any, alice_token: str
) -> None:
    """Issue 13: with sessions on, a bearer request whose session this process knows asks Redis nothing."""
    client = on_redis(issuer, redis_server)
    cookie = login(client, alice_token, alice)
    db.config_resetstat()
    for with_cookie in (None, cookie) * 50:
        assert get(client, token=alice_token, cookie=with_cookie, cert=alice).status_code == 200
    assert calls(db) == 0


def test_a_dead_session_is_opened_again_by_its_token(issuer: TestIssuer, alice: Any, alice_x5t: str) -> None:
    clock = FakeClock()
    client = build(issuer, clock=clock, session_idling_timeout=100)
    token = issuer.token(iat=int(clock.now), exp=int(clock.now) + 3000, cnf={"x5t#S256": alice_x5t})
    first = login(client, token, alice)
    for _ in range(3):  # token requests are no use of the session: they do not keep it alive
        clock.advance(30)
        assert get(client, token=token, cert=alice).status_code == 200
    clock.advance(11)  # 101 s after the opening
    assert description(get(client, cookie=first, cert=alice)) == "the session has expired"
    second = login(client, token, alice)
    assert second != first and CookieId.parse(second.rpartition(".")[0]) is not None
    assert get(client, cookie=first, cert=alice).status_code == 401  # the old generation stays dead
    assert get(client, cookie=second, cert=alice).status_code == 200


def test_unauthenticated_browser_gets_write_nothing(
    issuer: TestIssuer, redis_server: RedisServer, db: redis.Redis
) -> None:
    issuer.metadata["authorization_endpoint"] = ISSUER + "/authorize"
    client = on_redis(issuer, redis_server, **LOGIN)
    for i in range(1000):
        response = client.get(f"/page/{i}", headers={"Accept": "text/html"})
        assert response.status_code == 302
    assert calls(db, WRITES) == 0
    assert db.dbsize() == 0


def test_unauthenticated_browser_gets_write_nothing_in_memory(issuer: TestIssuer) -> None:
    issuer.metadata["authorization_endpoint"] = ISSUER + "/authorize"
    client = build(issuer, **LOGIN)
    sessions = middleware_of(client).sessions
    assert sessions is not None
    for i in range(1000):
        assert client.get(f"/page/{i}", headers={"Accept": "text/html"}).status_code == 302
    stores = [sessions._store_impl, sessions._used_states]
    assert all(isinstance(s, MemoryStore) and len(s) == 0 for s in stores)


# -- separate bounds ---------------------------------------------------------------------------------------------


def test_used_login_states_cannot_evict_a_session(issuer: TestIssuer, alice: Any, alice_token: str) -> None:
    """cache_l1_size=4 per kind: 40 used login states leave alice's session alone."""
    client = browser(issuer, cache_l1_size=4, proof_of_possession_mtls="optional")
    cookie = login(client, alice_token, alice)
    endpoint = with_token_endpoint(client, lambda data: (400, {"error": "invalid_grant"}))
    for _ in range(40):
        start, params = start_login(client)
        refused = callback(client, f"code=x&state={params['state']}", new_cookie(start, STATE_COOKIE))
        assert refused.status_code == 401
    assert len(endpoint.posts) == 40
    assert get(client, cookie=cookie, cert=alice).json["auth_method"] == "session"  # type: ignore[index]


# -- revocation --------------------------------------------------------------------------------------------------


class RevocableIntrospection:
    """Stands in for IntrospectionClient: active until revoked; ``down`` makes it fail."""

    def __init__(self, cnf: dict[str, Any]) -> None:
        self.cnf = cnf
        self.active = True
        self.down = False
        self.calls = 0

    def introspect(self, token: str) -> dict[str, Any]:
        self.calls += 1
        if self.down:
            raise IntrospectionError("the issuer is down")
        if not self.active:
            return {"active": False}
        return {"active": True, "aud": AUDIENCE, "sub": "alice", "exp": int(time.time()) + 3600, "cnf": self.cnf,
                "token_type": "Bearer"}


def revocable(issuer: TestIssuer, alice_x5t: str, clock: FakeClock, **overrides: Any) -> tuple[Any, Any]:
    client = build(issuer, clock=clock, **{**INTROSPECTION, "cache_ttl_max": 30, **overrides})
    fake = RevocableIntrospection({"x5t#S256": alice_x5t})
    introspection = middleware_of(client).introspection
    assert introspection is not None
    introspection._client = fake  # type: ignore[assignment]
    return client, fake


def test_a_revoked_token_ends_its_session_within_cache_ttl_max(issuer: TestIssuer, alice: Any,
                                                               alice_x5t: str) -> None:
    clock = FakeClock()
    client, fake = revocable(issuer, alice_x5t, clock)
    cookie = login(client, "opaque-revocable-token-0123456789", alice)
    for _ in range(100):  # many uses within cache_ttl_max: the issuer is asked once, at the login
        assert get(client, cookie=cookie, cert=alice).status_code == 200
    assert fake.calls == 1
    fake.active = False
    clock.advance(29)
    assert get(client, cookie=cookie, cert=alice).status_code == 200  # the answer is cached up to 30 s
    clock.advance(2)
    refused = get(client, cookie=cookie, cert=alice)
    assert refused.status_code == 401
    assert description(refused) == "the session's token is no longer active"
    assert clears(refused)
    assert fake.calls == 2
    # The session is gone: the cookie is no credential at all now.
    assert get(client, cookie=cookie, cert=alice).headers["WWW-Authenticate"] == 'Bearer realm="api"'


def test_a_session_that_cannot_be_rechecked_is_503(issuer: TestIssuer, alice: Any, alice_x5t: str) -> None:
    clock = FakeClock()
    client, fake = revocable(issuer, alice_x5t, clock)
    cookie = login(client, "opaque-revocable-token-0123456789", alice)
    fake.down = True
    clock.advance(31)
    response = get(client, cookie=cookie, cert=alice)
    assert response.status_code == 503
    assert response.json == {"error": "temporarily_unavailable",
                             "error_description": "the token cannot be introspected now"}
    fake.down = False
    assert get(client, cookie=cookie, cert=alice).status_code == 200  # not ended by the outage


def test_the_token_is_kept_sealed_and_only_when_it_can_be_rechecked(
    issuer: TestIssuer, redis_server: RedisServer, db: redis.Redis, alice: Any, alice_x5t: str, alice_token: str
) -> None:
    clock = FakeClock()
    client, _ = revocable(issuer, alice_x5t, clock, redis_url=redis_server.url, redis_timeout=0.5)
    token = "opaque-revocable-token-0123456789"
    cookie = login(client, token, alice)
    sessions = middleware_of(client).sessions
    assert sessions is not None
    sid = cookie.split(".")[0]
    record = sessions._fetch_record(sid)
    assert record is not None and record.token == token
    for key in db.scan_iter(match="*"):
        assert token.encode() not in (db.get(key) or b"")
    # A JWT session (no introspection of JWTs): nothing to recheck, so the token is not kept.
    jwt_client = build(issuer)
    jwt_cookie = login(jwt_client, alice_token, alice)
    jwt_sessions = middleware_of(jwt_client).sessions
    assert jwt_sessions is not None
    jwt_record = jwt_sessions._fetch_record(jwt_cookie.split(".")[0])
    assert jwt_record is not None and jwt_record.token is None


# -- timeouts, cookies, logout --------------------------------------------------------------------------------


def test_after_the_absolute_end_the_session_has_expired(issuer: TestIssuer, alice: Any, alice_x5t: str) -> None:
    clock = FakeClock()
    client = build(issuer, clock=clock, session_absolute_timeout=100, session_idling_timeout=0,
                   session_rolling_timeout=0)
    token = issuer.token(iat=int(clock.now), exp=int(clock.now) + 3000, cnf={"x5t#S256": alice_x5t})
    cookie = login(client, token, alice)
    clock.advance(99)
    assert get(client, cookie=cookie, cert=alice).status_code == 200
    clock.advance(2)
    for _ in range(2):  # decided from the cookie: the same answer however often it comes back
        expired = get(client, cookie=cookie, cert=alice)
        assert expired.status_code == 401
        assert description(expired) == "the session has expired"
        assert clears(expired)


@pytest.mark.parametrize(("overrides", "status"), [
    pytest.param({}, 204, id="no-content"),
    pytest.param({"logout_redirect_uri": "/bye"}, 302, id="redirect"),
])
@pytest.mark.parametrize(("timeouts", "wait"), [
    pytest.param({"session_idling_timeout": 100}, 101, id="idle"),
    pytest.param({"session_rolling_timeout": 100, "session_idling_timeout": 0}, 101, id="rolling"),
    pytest.param({"session_absolute_timeout": 100, "session_idling_timeout": 0}, 101, id="absolute"),
])
def test_logout_with_an_ended_session_finishes(
    issuer: TestIssuer, alice: Any, alice_x5t: str, overrides: dict[str, Any], status: int,
    timeouts: dict[str, int], wait: int,
) -> None:
    """Issue 12 item 6: logging out after the session ended still logs out (and clears the cookie)."""
    clock = FakeClock()
    client = build(issuer, clock=clock, logout_path="/logout", **timeouts, **overrides)
    token = issuer.token(iat=int(clock.now), exp=int(clock.now) + 3000, cnf={"x5t#S256": alice_x5t})
    cookie = login(client, token, alice)
    clock.advance(wait)
    # Without the certificate even: an ended session has nothing left to protect.
    response = get(client, cookie=cookie, cert=None, path="/logout", method="POST")
    assert response.status_code == status, response.json
    assert clears(response)
    assert response.headers.get("Location") == overrides.get("logout_redirect_uri")
    assert get(client, cookie=cookie, cert=alice).status_code == 401


@pytest.mark.parametrize(("overrides", "name", "expected"), [
    pytest.param({}, "__Host-session", {"Path=/", "Secure", "HttpOnly", "SameSite=Lax"}, id="host-prefix"),
    pytest.param({"session_cookie_domain": "example.test"}, "__Secure-session",
                 {"Path=/", "Domain=example.test", "Secure", "HttpOnly", "SameSite=Lax"}, id="domain-secure-prefix"),
    pytest.param({"session_cookie_path": "/api"}, "__Secure-session",
                 {"Path=/api", "Secure", "HttpOnly", "SameSite=Lax"}, id="path-secure-prefix"),
    pytest.param({"session_cookie_secure": False, "session_cookie_same_site": "Strict"}, "session",
                 {"Path=/", "HttpOnly", "SameSite=Strict"}, id="not-secure-no-prefix"),
])
def test_the_cookie_prefix_follows_its_attributes(
    issuer: TestIssuer, alice: Any, alice_token: str, overrides: dict[str, Any], name: str, expected: set[str]
) -> None:
    """RFC 6265bis section 4.1.3: ``__Host-`` when Secure, host-only and Path=/; ``__Secure-`` when Secure."""
    client = build(issuer, **overrides)
    response = get(client, token=alice_token, cert=alice)
    assert attributes(response, name) == expected
    value = new_cookie(response, name)
    assert value is not None
    path = overrides.get("session_cookie_path", "/") + "/x"
    used = get(client, cookie=value, cert=alice, cookie_name=name, path=path.replace("//", "/"))
    assert used.json is not None and used.json["auth_method"] == "session"
    # The unprefixed name is not the session cookie (a sibling host could set that one).
    if name != "session":
        assert get(client, cookie=value, cert=alice, cookie_name="session").status_code == 401


def test_cookie_name_prefixes() -> None:
    assert cookie_name("s", secure=True, host_only=True, path="/") == "__Host-s"
    assert cookie_name("s", secure=True, host_only=False, path="/") == "__Secure-s"
    assert cookie_name("s", secure=True, host_only=True, path="/a") == "__Secure-s"
    assert cookie_name("s", secure=False, host_only=True, path="/") == "s"


def test_cookie_ids_parse_strictly() -> None:
    """A cookie's fields parse strictly: three dot-separated parts, an ASCII decimal end."""
    assert CookieId.parse("a.b.123") == CookieId("a", "b", 123)
    for bad in ("a.b", "a.b.c", "a.b.1.2", ".b.1", "a..1", "a.b.\u00b2", "a.b." + "9" * 13, ""):
        assert CookieId.parse(bad) is None, bad


def test_a_token_request_is_served_when_the_store_is_down(
    issuer: TestIssuer, tmp_path: Any, alice: Any, alice_x5t: str
) -> None:
    """The session is a convenience for a token request: Redis down, the token alone serves it, no cookie."""
    server = RedisServer(tmp_path / "redis")
    try:
        client = on_redis(issuer, server)
        server.kill()
        response = get(client, token=issuer.token(cnf={"x5t#S256": alice_x5t}), cert=alice)
        assert response.status_code == 200
        assert response.json is not None and response.json["auth_method"] == "bearer"
        assert set_cookie_values(response) == []
    finally:
        server.stop()


def test_another_process_may_hand_out_a_logged_out_cookie_for_cache_l1_ttl(
    issuer: TestIssuer, redis_server: RedisServer, db: redis.Redis, alice: Any, alice_token: str
) -> None:
    """The documented limit of the in-process memory: logout on one worker, the token on another."""
    clock = FakeClock()
    a = on_redis(issuer, redis_server, clock=clock, logout_path="/logout")
    b = on_redis(issuer, redis_server, clock=clock)
    cookie = login(a, alice_token, alice)
    assert login(b, alice_token, alice) == cookie  # b now knows the session
    assert get(a, cookie=cookie, cert=alice, path="/logout", method="POST").status_code == 204
    stale = login(b, alice_token, alice)  # within cache_l1_ttl: b still hands out the ended session's cookie
    assert stale == cookie
    assert get(a, cookie=stale, cert=alice).headers["WWW-Authenticate"] == 'Bearer realm="api"'
    clock.advance(6)  # past cache_l1_ttl (5 s): b asks Redis and opens the session again
    fresh = login(b, alice_token, alice)
    assert fresh != cookie
    assert get(a, cookie=fresh, cert=alice).status_code == 200


# -- docs/sessions.md's table: what a use checks, by how the session was made and by mode ----------------------------

#: (mTLS cell, DPoP cell) outcomes: "cert" same certificate, "proof" proof by the same key, "-" nothing,
#: or the refusal's description.
DPOP_OFF = "the session is DPoP-bound but DPoP is off"
DPOP_STRICT = "a DPoP-bound session and proof are required"
POP_TABLE = {
    "x5t": {"strict": "cert", "optional": "cert", "off": "-",
            "dpop-optional": "-", "dpop-strict": DPOP_STRICT, "dpop-off": "-"},
    "jkt": {"strict": CLAIM_MISSING, "optional": "-", "off": "-",
            "dpop-optional": "proof", "dpop-strict": "proof", "dpop-off": DPOP_OFF},
    "both": {"strict": "cert", "optional": "cert", "off": "-",
             "dpop-optional": "proof", "dpop-strict": "proof", "dpop-off": DPOP_OFF},
    "none": {"strict": CLAIM_MISSING, "optional": "-", "off": "-",
             "dpop-optional": "-", "dpop-strict": DPOP_STRICT, "dpop-off": "-"},
}


@pytest.mark.parametrize("made_by", list(POP_TABLE))
@pytest.mark.parametrize("mtls", ["strict", "optional", "off"])
@pytest.mark.parametrize("dpop", ["optional", "strict", "off"])
def test_what_a_use_checks(
    issuer: TestIssuer, redis_server: RedisServer, db: redis.Redis, alice: Any, alice_x5t: str,
    made_by: str, mtls: str, dpop: str,
) -> None:
    """Sessions made under permissive modes, then used by an instance with other modes (same secret, same Redis)."""
    key = DPoPKey()
    cnf: dict[str, str] = {}
    if made_by in ("x5t", "both"):
        cnf["x5t#S256"] = alice_x5t
    if made_by in ("jkt", "both"):
        cnf["jkt"] = key.jkt
    hosts = ("localhost",)  # the htu's host (issue 13: never from an unlisted Host)
    maker = on_redis(issuer, redis_server, proof_of_possession_mtls="optional", proof_of_possession_dpop="optional",
                     dpop_allowed_hosts=hosts)
    token = issuer.token(cnf=cnf) if cnf else issuer.token()
    if "jkt" in cnf:
        made = get(maker, token=token, cert=alice, scheme="DPoP", headers={"DPoP": key.proof("GET", HTU, token)})
    else:
        made = get(maker, token=token, cert=alice)
    assert made.status_code == 200, made.json
    cookie = new_cookie(made)
    assert cookie is not None
    user = on_redis(issuer, redis_server, proof_of_possession_mtls=mtls, proof_of_possession_dpop=dpop,
                    **({"dpop_allowed_hosts": hosts} if dpop != "off" else {}))
    cells = (POP_TABLE[made_by][mtls], POP_TABLE[made_by][f"dpop-{dpop}"])
    refusal = next((c for c in cells if c not in ("cert", "proof", "-")), None)
    with_everything = get(user, cookie=cookie, cert=alice, headers={"DPoP": key.proof("GET", HTU)})
    if refusal is not None:
        assert with_everything.status_code == 401
        assert description(with_everything) == refusal
        return
    assert with_everything.status_code == 200, with_everything.json
    without_proof = get(user, cookie=cookie, cert=alice)
    assert without_proof.status_code == (401 if "proof" in cells else 200), without_proof.json
    without_cert = get(user, cookie=cookie, headers={"DPoP": key.proof("GET", HTU)})
    if "cert" in cells:
        assert description(without_cert) == CERT_MISSING
    else:
        assert without_cert.status_code == 200, without_cert.json


def test_store_add_is_first_writer_wins(redis_server: RedisServer, db: redis.Redis) -> None:
    """``Store.add`` (SET NX): what makes one record win when two workers open a session at once."""
    clock = FakeClock()
    memory = MemoryStore(10, clock)
    assert memory.add("k", b"first", 10) is True
    assert memory.add("k", b"second", 10) is False
    assert memory.fetch("k") == b"first"
    clock.advance(11)
    assert memory.add("k", b"third", 10) is True and memory.fetch("k") == b"third"

    settings = make_settings(redis_url=redis_server.url, cache_secret=CACHE_SECRET, redis_timeout=0.5)
    sealer = Sealer(CACHE_SECRET, "session")
    shared = _RedisStore(RedisCache(make_client(settings), sealer, Stats()), sealer)
    key = sealer.key_name("sid", "x")
    assert shared.add(key, b"first", 10) is True
    assert shared.add(key, b"second", 10) is False
    assert shared.fetch(key) == b"first"
    assert 0 < db.pttl(key) <= 10_000
