"""Introspection (RFC 7662): the cache TTL policy, the validator's decisions, and the client.

The validator runs against a fake client; :class:`IntrospectionClient` runs
against the real oidc-provider (``idp``) and a tiny local HTTP server that
answers with whatever a test needs.
"""

from __future__ import annotations

import gzip
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from certbound_wsgi.cache import Entry
from certbound_wsgi.cache.memory import MemoryCache
from certbound_wsgi.discovery import Discovery
from certbound_wsgi.errors import InvalidToken, TemporarilyUnavailable
from certbound_wsgi.introspection import IntrospectionClient, IntrospectionError, IntrospectionValidator
from certbound_wsgi.settings import Settings
from certbound_wsgi.stats import Stats
from tests.support import idp_fixtures
from tests.support.idp import OPAQUE_RESOURCE, SECRETS, OidcProvider, x5t_s256
from tests.support.procs import free_port
from tests.support.raw_http import RawServer

# The real IdP and its PKI (tests/conftest.py's ``pki`` is a bare DevCA).
pki = idp_fixtures.pki
idp = idp_fixtures.idp

ISSUER = "https://issuer.test"
AUDIENCE = "https://api.test"
NOW = 1000.0


def make_settings(**overrides: Any) -> Settings:
    options: dict[str, Any] = {
        "issuer": ISSUER,
        "audience": [AUDIENCE],
        "auth_methods": ("introspection",),
        "client_id": "rs-client",
        "client_secret": "rs-secret-0123456789abcdef",
        "introspection_endpoint": ISSUER + "/introspect",
    }
    options.update(overrides)
    return Settings(**options)


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeClient:
    """Answers ``introspect`` from a callable or a fixed answer, counting calls."""

    def __init__(self, answer: dict[str, Any] | Exception | Callable[[str], dict[str, Any]], delay: float = 0.0):
        self.answer = answer
        self.delay = delay
        self.calls = 0
        self._lock = threading.Lock()

    def introspect(self, token: str) -> dict[str, Any]:
        with self._lock:
            self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        if isinstance(self.answer, Exception):
            raise self.answer
        if callable(self.answer):
            return self.answer(token)
        return dict(self.answer)


def active(**claims: Any) -> dict[str, Any]:
    return {"active": True, "iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "token_type": "Bearer", **claims}


def validator(client: Any, clock: Callable[[], float] | None = None, **overrides: Any
              ) -> tuple[IntrospectionValidator, Stats]:
    settings = make_settings(**overrides)
    stats = Stats()
    clock = clock or time.time
    l1 = MemoryCache(settings.cache_l1_size, clock=clock)
    return IntrospectionValidator(settings, client, l1, None, lambda t: "k:" + t, stats, clock=clock), stats


# -- the TTL policy ------------------------------------------------------------------

INF = math.inf
# (settings overrides, answer, expected (fresh_until, stale_until)), with now = 1000.
TTL_TABLE = [
    pytest.param({}, {}, (1300, 1300), id="no-exp-default-300"),
    pytest.param({"cache_ttl": 60}, {}, (1060, 1060), id="no-exp-cache_ttl"),
    pytest.param({"cache_ttl": 600, "cache_ttl_max": 300}, {}, (1300, 1300), id="no-exp-capped-by-max"),
    pytest.param({"cache_ttl": 600, "cache_ttl_max": 0}, {}, (1600, 1600), id="no-exp-max-0-unbounded"),
    pytest.param({}, {"exp": 1100}, (1100, 1100), id="exp-before-max"),
    pytest.param({}, {"exp": 5000}, (1300, 1300), id="exp-after-max"),
    pytest.param({"cache_ttl_max": 0}, {"exp": 5000}, (5000, 5000), id="max-0-exp-only"),
    pytest.param({"cache_ttl_max": 0, "cache_ttl": 10}, {"exp": 5000}, (5000, 5000), id="cache_ttl-ignored-with-exp"),
    pytest.param({"cache_ttl": 5, "cache_ttl_min": 30}, {}, (1030, 1030), id="min-floor"),
    pytest.param({"cache_ttl_min": 30}, {"exp": 1010}, (1010, 1010), id="min-never-past-exp"),
    pytest.param({"cache_ttl_min": 100, "cache_ttl_max": 300}, {"exp": 1050}, (1050, 1050), id="min-below-exp-capped"),
    pytest.param({}, {"exp": 1000}, (1000, 1000), id="exp-now"),
    pytest.param({}, {"exp": 900}, (900, 900), id="exp-past-negative-ttl"),
    pytest.param({"cache_ttl_min": 30, "cache_ttl_resurrect": 60}, {"exp": 900}, (900, 900),
                 id="exp-past-min-and-resurrect"),
    pytest.param({}, {"exp": 1100.5}, (1100.5, 1100.5), id="exp-float"),
    pytest.param({}, {"exp": True}, (1300, 1300), id="exp-bool-ignored"),
    pytest.param({}, {"exp": "1100"}, (1300, 1300), id="exp-string-ignored"),
    pytest.param({}, {"exp": INF}, (1300, 1300), id="exp-inf-ignored"),
    pytest.param({}, {"exp": math.nan}, (1300, 1300), id="exp-nan-ignored"),
    pytest.param({"cache_ttl_resurrect": 60}, {}, (1300, 1360), id="resurrect"),
    pytest.param({"cache_ttl_resurrect": 600}, {"exp": 1400}, (1300, 1400), id="resurrect-capped-at-exp"),
    pytest.param({"cache_ttl_resurrect": 60}, {"exp": 1100}, (1100, 1100), id="resurrect-none-when-exp-first"),
    pytest.param({"cache_ttl_resurrect": 60, "cache_ttl_max": 0}, {"exp": 5000}, (5000, 5000),
                 id="resurrect-never-past-exp-unbounded"),
]


@pytest.mark.parametrize(("overrides", "claims", "expected"), TTL_TABLE)
def test_ttl_policy(overrides: dict[str, Any], claims: dict[str, Any], expected: tuple[float, float]) -> None:
    v, _ = validator(FakeClient({}), **overrides)
    answer = active(**claims)
    got = v._entry(answer, NOW)
    assert got.active is True
    assert (got.fresh_until, got.stale_until) == expected
    assert got.claims == answer
    exp = claims.get("exp")
    if isinstance(exp, (int, float)) and not isinstance(exp, bool) and math.isfinite(exp):
        assert got.fresh_until <= exp and got.stale_until <= exp


@pytest.mark.parametrize(
    ("overrides", "answer", "expected"),
    [
        pytest.param({}, {"active": False}, (1010, 1010), id="neg-default-10"),
        pytest.param({"cache_ttl_neg": 0}, {"active": False}, (1000, 1000), id="neg-0"),
        pytest.param({"cache_ttl_neg": 30, "cache_ttl_resurrect": 60}, {"active": False}, (1030, 1030),
                     id="neg-never-resurrected"),
        pytest.param({}, {"active": "true", "sub": "x", "exp": 5000}, (1010, 1010), id="active-string"),
        pytest.param({}, {"active": 1, "exp": 5000}, (1010, 1010), id="active-int"),
        pytest.param({}, {"sub": "x"}, (1010, 1010), id="active-missing"),
    ],
)
def test_ttl_policy_negative(overrides: dict[str, Any], answer: dict[str, Any], expected: tuple[float, float]) -> None:
    v, _ = validator(FakeClient({}), **overrides)
    got = v._entry(answer, NOW)
    assert got == Entry(False, *expected)
    assert got.claims == {}


# -- the validator ------------------------------------------------------------------


def test_cache_hit_avoids_calls() -> None:
    client = FakeClient(active(exp=time.time() + 600))
    v, stats = validator(client)
    for _ in range(5):
        assert v.validate("tok")["sub"] == "alice"
    assert client.calls == 1
    v.validate("other")
    assert client.calls == 2
    counts = stats.snapshot()
    assert counts["introspections"] == 2
    assert counts["l1_hits"] == 4
    assert counts["l1_misses"] == 2


def test_cache_expires_per_policy() -> None:
    clock = Clock(NOW)
    client = FakeClient(active(exp=NOW + 600))
    v, _ = validator(client, clock, cache_ttl_max=30)
    v.validate("tok")
    clock.now = NOW + 29.9
    v.validate("tok")
    assert client.calls == 1
    clock.now = NOW + 30
    v.validate("tok")
    assert client.calls == 2


def test_no_caching_when_disabled() -> None:
    client = FakeClient(active(exp=time.time() + 600))
    v, _ = validator(client, cache_introspection=False)
    for _ in range(3):
        v.validate("tok")
    assert client.calls == 3


def test_single_flight_in_process() -> None:
    client = FakeClient(active(exp=time.time() + 600), delay=0.3)
    v, stats = validator(client)
    barrier = threading.Barrier(16)
    results: list[Any] = []

    def run() -> None:
        barrier.wait(5)
        try:
            results.append(v.validate("one-token")["sub"])
        except Exception as exc:
            results.append(exc)

    threads = [threading.Thread(target=run) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert results == ["alice"] * 16
    assert client.calls == 1
    assert stats.snapshot()["introspections"] == 1


def test_single_flight_shares_a_failure() -> None:
    """An outage costs the issuer one call per process, not one per waiting thread."""
    client = FakeClient(IntrospectionError("introspection answered 500"), delay=0.3)
    v, stats = validator(client)
    barrier = threading.Barrier(16)
    results: list[Any] = []

    def run() -> None:
        barrier.wait(5)
        try:
            results.append(v.validate("one-token"))
        except Exception as exc:
            results.append(exc)

    threads = [threading.Thread(target=run) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(results) == 16
    assert all(isinstance(r, TemporarilyUnavailable) and r.status == 503 for r in results)
    assert client.calls == 1
    assert stats.snapshot()["idp_errors"] == 1


def test_inactive_token() -> None:
    client = FakeClient({"active": False})
    v, _ = validator(client)
    for _ in range(3):
        with pytest.raises(InvalidToken, match="the token is not active") as info:
            v.validate("revoked")
        assert info.value.status == 401
    assert client.calls == 1  # the negative answer is cached too (cache_ttl_neg)


def test_idp_error_without_cache_is_503() -> None:
    client = FakeClient(IntrospectionError("introspection answered 500"))
    v, stats = validator(client)
    with pytest.raises(TemporarilyUnavailable) as info:
        v.validate("tok")
    error = info.value
    assert error.status == 503
    assert dict(error.headers)["Retry-After"].isdigit()
    assert int(dict(error.headers)["Retry-After"]) >= 1
    assert stats.snapshot()["idp_errors"] == 1
    assert stats.snapshot()["resurrected"] == 0
    # Errors are not cached: the next request asks again.
    with pytest.raises(TemporarilyUnavailable):
        v.validate("tok")
    assert client.calls == 2


def test_idp_error_with_stale_entry_resurrects() -> None:
    clock = Clock(NOW)
    client = FakeClient(active(exp=NOW + 600))
    v, stats = validator(client, clock, cache_ttl_max=10, cache_ttl_resurrect=60)
    assert v.validate("tok")["sub"] == "alice"
    client.answer = IntrospectionError("timeout")
    clock.now = NOW + 30  # stale, within cache_ttl_resurrect
    assert v.validate("tok")["sub"] == "alice"
    counts = stats.snapshot()
    assert counts["resurrected"] == 1
    assert counts["idp_errors"] == 1
    assert client.calls == 2
    clock.now = NOW + 70  # past stale_until: nothing to resurrect
    with pytest.raises(TemporarilyUnavailable):
        v.validate("tok")
    assert stats.snapshot()["resurrected"] == 1


def test_resurrect_zero_is_503() -> None:
    clock = Clock(NOW)
    client = FakeClient(active(exp=NOW + 600))
    v, stats = validator(client, clock, cache_ttl_max=10, cache_ttl_resurrect=0)
    v.validate("tok")
    client.answer = IntrospectionError("timeout")
    clock.now = NOW + 10
    with pytest.raises(TemporarilyUnavailable):
        v.validate("tok")
    assert stats.snapshot()["resurrected"] == 0


def test_negative_entry_is_never_resurrected() -> None:
    clock = Clock(NOW)
    client = FakeClient({"active": False})
    v, stats = validator(client, clock, cache_ttl_neg=10, cache_ttl_resurrect=600)
    with pytest.raises(InvalidToken):
        v.validate("tok")
    client.answer = IntrospectionError("down")
    clock.now = NOW + 11
    with pytest.raises(TemporarilyUnavailable):
        v.validate("tok")
    assert stats.snapshot()["resurrected"] == 0


def test_resurrection_never_past_exp() -> None:
    clock = Clock(NOW)
    client = FakeClient(active(exp=NOW + 20))
    v, _ = validator(client, clock, cache_ttl_max=10, cache_ttl_resurrect=600)
    v.validate("tok")
    client.answer = IntrospectionError("down")
    clock.now = NOW + 15
    assert v.validate("tok")["sub"] == "alice"
    clock.now = NOW + 20
    with pytest.raises((TemporarilyUnavailable, InvalidToken)):
        v.validate("tok")


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        pytest.param({"aud": "https://other.test"}, "not meant for this audience", id="aud-other"),
        pytest.param({"aud": ["https://other.test", "https://x.test"]}, "not meant for this audience",
                     id="aud-list-other"),
        pytest.param({"aud": None}, "not meant for this audience", id="aud-missing"),
        pytest.param({"aud": [1, None]}, "not meant for this audience", id="aud-not-strings"),
        pytest.param({"iss": "https://evil.test"}, "issued by another issuer", id="iss-other"),
        pytest.param({"exp": NOW - 1}, "expired", id="expired"),
        pytest.param({"nbf": NOW + 60, "exp": NOW + 600}, "not valid yet", id="nbf-future"),
    ],
)
def test_claims_refused(claims: dict[str, Any], message: str) -> None:
    client = FakeClient(active(**claims))
    v, _ = validator(client, Clock(NOW))
    with pytest.raises(InvalidToken, match=message):
        v.validate("tok")


def test_audience_in_list_accepted() -> None:
    client = FakeClient(active(aud=["https://other.test", AUDIENCE], exp=NOW + 600))
    v, _ = validator(client, Clock(NOW))
    assert v.validate("tok")["aud"] == ["https://other.test", AUDIENCE]


def test_check_active_false() -> None:
    # An active answer is accepted as usual.
    client = FakeClient(active(exp=NOW + 600))
    v, _ = validator(client, Clock(NOW), introspection_check_active=False)
    assert v.validate("tok")["sub"] == "alice"
    # An inactive one carries no claims, so it is still refused, never let through.
    client = FakeClient({"active": False, "aud": AUDIENCE, "sub": "alice", "exp": NOW + 600})
    v, _ = validator(client, Clock(NOW), introspection_check_active=False)
    with pytest.raises(InvalidToken) as info:
        v.validate("tok")
    assert "not active" not in info.value.description
    # The same answer with the check on names the reason.
    v, _ = validator(client, Clock(NOW))
    with pytest.raises(InvalidToken, match="the token is not active"):
        v.validate("tok")


class HeldLockL2:
    """Redis as another worker leaves it: that worker holds the lock for ``hold`` seconds, then lets go
    without writing an entry (its introspection failed)."""

    available = True

    def __init__(self, hold: float) -> None:
        self.release_at = time.monotonic() + hold

    def get(self, key: str) -> Entry | None:
        return None

    def set(self, key: str, entry: Entry) -> None:
        pass

    def lock(self, key: str) -> str | bool | None:
        return "mine" if time.monotonic() >= self.release_at else False

    def unlock(self, key: str, token: str) -> None:
        pass


def test_waiter_stops_waiting_when_the_lock_holder_fails() -> None:
    """Regression (bd0df3a): a waiter polled on for http_timeout + 0.5 s after the holder had failed and let go."""
    settings = make_settings(http_timeout=1.0)
    client = FakeClient(IntrospectionError("connection refused"))
    l2 = HeldLockL2(hold=0.1)
    v = IntrospectionValidator(settings, client, MemoryCache(10, max_age=1), l2,  # type: ignore[arg-type]
                               lambda t: "k:" + t, Stats())
    started = time.monotonic()
    with pytest.raises(TemporarilyUnavailable):
        v.validate("tok")
    elapsed = time.monotonic() - started
    # The holder gave up after 0.1 s; waiting on until the 1.5 s deadline helps nobody.
    assert elapsed < 0.8, f"answered after {elapsed:.2f}s"


# -- the client against the real IdP ------------------------------------------------


def client_settings(provider: OidcProvider, **overrides: Any) -> Settings:
    options: dict[str, Any] = {
        "issuer": provider.issuer,
        "audience": [OPAQUE_RESOURCE],
        "auth_methods": ("introspection",),
        "client_id": "rs-client",
        "client_secret": SECRETS["rs-client"],
        "ca_file": provider.ca_file,
        "introspection_endpoint": provider.introspection_endpoint,
        "http_timeout": 5.0,
    }
    options.update(overrides)
    return Settings(**options)


@pytest.fixture(scope="module")
def opaque_token(idp: OidcProvider) -> str:
    return idp.token("bound", resource=OPAQUE_RESOURCE)


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
def test_client_against_idp(idp: OidcProvider, pki: idp_fixtures.Pki, opaque_token: str, method: str) -> None:
    client = IntrospectionClient(client_settings(idp, introspection_endpoint_auth_method=method), None)
    idp.reset_stats()
    answer = client.introspect(opaque_token)
    assert answer["active"] is True
    assert answer["aud"] == OPAQUE_RESOURCE
    assert answer["cnf"]["x5t#S256"] == x5t_s256(pki.alice)
    assert client.introspect("no-such-token") == {"active": False}
    assert idp.stats()["introspections"] == 2


def test_client_discovers_the_endpoint(idp: OidcProvider, opaque_token: str) -> None:
    settings = client_settings(idp, introspection_endpoint="")
    client = IntrospectionClient(settings, Discovery(settings))
    assert client.endpoint() == idp.introspection_endpoint
    assert client.introspect(opaque_token)["active"] is True


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
def test_wrong_secret(idp: OidcProvider, opaque_token: str, method: str) -> None:
    settings = client_settings(idp, client_secret="wrong-secret-0123456789abcdef",
                               introspection_endpoint_auth_method=method)
    with pytest.raises(IntrospectionError, match="401"):
        IntrospectionClient(settings, None).introspect(opaque_token)


@pytest.mark.parametrize(
    "endpoint",
    [
        pytest.param("https://127.0.0.1:{free}/introspect", id="closed-port"),
        pytest.param("{issuer}/no-such-endpoint", id="404"),
        pytest.param("{issuer}/jwks", id="not-introspection"),
    ],
)
def test_garbage_endpoint(idp: OidcProvider, opaque_token: str, endpoint: str) -> None:
    url = endpoint.format(free=free_port(), issuer=idp.issuer)
    client = IntrospectionClient(client_settings(idp, introspection_endpoint=url), None)
    with pytest.raises(IntrospectionError):
        client.introspect(opaque_token)


def test_untrusted_issuer_certificate(idp: OidcProvider, opaque_token: str, tmp_path: Any) -> None:
    from certbound_wsgi.dev.pki import DevCA

    other_ca = DevCA(tmp_path / "other-ca")
    client = IntrospectionClient(client_settings(idp, ca_file=str(other_ca.cert_path)), None)
    with pytest.raises(IntrospectionError, match="SSLError"):
        client.introspect(opaque_token)


@pytest.mark.parametrize("variable", ["REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"])
def test_ca_file_wins_over_environment(idp: OidcProvider, opaque_token: str, tmp_path: Any,
                                       monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    bogus = tmp_path / "bogus-ca.pem"
    bogus.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    monkeypatch.setenv(variable, str(bogus))
    client = IntrospectionClient(client_settings(idp), None)
    assert client.introspect(opaque_token)["active"] is True
    monkeypatch.setenv(variable, str(tmp_path / "missing.pem"))
    assert IntrospectionClient(client_settings(idp), None).introspect(opaque_token)["active"] is True


# -- the client against a misbehaving server ---------------------------------------


@pytest.fixture(scope="module")
def tiny() -> Iterator[RawServer]:
    server = RawServer()
    try:
        yield server
    finally:
        server.close()


def tiny_client(tiny: RawServer, **overrides: Any) -> IntrospectionClient:
    settings = make_settings(issuer="", introspection_endpoint=tiny.url, **overrides)
    return IntrospectionClient(settings, None)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="deep-list"),
        pytest.param(b'{"a":' * 50_000 + b"1" + b"}" * 50_000, id="deep-object"),
        pytest.param(b'{"active": true, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", id="deep-member"),
    ],
)
def test_json_bomb(tiny: RawServer, body: bytes) -> None:
    tiny.body, tiny.status, tiny.gzip = body, 200, False
    with pytest.raises(IntrospectionError):
        tiny_client(tiny).introspect("tok")


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"sub": "alice"}', id="no-active"),
        pytest.param(b'{"active": "true"}', id="active-string"),
        pytest.param(b'{"active": 1}', id="active-int"),
        pytest.param(b'{"active": null}', id="active-null"),
        pytest.param(b"[true]", id="list"),
        pytest.param(b'"active"', id="string"),
        pytest.param(b"not json", id="not-json"),
        pytest.param(b'{"active": true, "exp": NaN}', id="nan"),
        pytest.param(b'{"active": true, "exp": Infinity}', id="infinity"),
        pytest.param(b"", id="empty"),
        pytest.param(b'{"active": true, "pad": "' + b"x" * (256 * 1024) + b'"}', id="too-large"),
    ],
)
def test_unusable_response(tiny: RawServer, body: bytes) -> None:
    tiny.body, tiny.status, tiny.gzip = body, 200, False
    with pytest.raises(IntrospectionError):
        tiny_client(tiny).introspect("tok")


@pytest.mark.parametrize("status", [201, 301, 400, 401, 500, 503])
def test_non_200(tiny: RawServer, status: int) -> None:
    tiny.body, tiny.status, tiny.gzip = b'{"active": true}', status, False
    with pytest.raises(IntrospectionError, match=str(status)):
        tiny_client(tiny).introspect("tok")


def test_usable_response_and_request_shape(tiny: RawServer) -> None:
    tiny.body, tiny.status, tiny.gzip = b'{"active": true, "sub": "alice"}', 200, False
    tiny.requests.clear()
    assert tiny_client(tiny).introspect("the-token") == {"active": True, "sub": "alice"}
    assert tiny_client(tiny, introspection_endpoint_auth_method="client_secret_post").introspect("t2")["active"]
    basic, post = tiny.requests
    assert basic["form"] == {"token": "the-token", "token_type_hint": "access_token"}
    assert basic["auth"].startswith("Basic ")
    assert post["auth"] is None
    assert post["form"] == {"token": "t2", "token_type_hint": "access_token", "client_id": "rs-client",
                            "client_secret": "rs-secret-0123456789abcdef"}


def test_gzip_response(tiny: RawServer) -> None:
    tiny.body, tiny.status, tiny.gzip = gzip.compress(b'{"active": true, "sub": "alice"}'), 200, True
    try:
        assert tiny_client(tiny).introspect("tok") == {"active": True, "sub": "alice"}
        # A compression bomb: 64 kB on the wire, 64 MB inflated; the limit applies to what is inflated.
        tiny.body = gzip.compress(b'{"active": true, "pad": "' + b" " * (64 * 1024 * 1024) + b'"}')
        assert len(tiny.body) < 128 * 1024
        with pytest.raises(IntrospectionError, match="too large"):
            tiny_client(tiny).introspect("tok")
    finally:
        tiny.gzip = False
