"""Issuer keys as a managed resource (issue 14): refreshed when due, a withdrawn key distrusted, an unknown kid
asked about at once, a sealed copy shared through a real Redis, a bound on staleness; and several issuers.

Every rule runs against an injected clock; documents come from :class:`StaticDiscovery` (no HTTP).
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from certbound_wsgi.discovery import (
    MIN_PERIOD,
    RETRY_AFTER_FAILURE,
    UNKNOWN_KID_COOLDOWN,
    Discovery,
    DiscoveryError,
    UnknownKey,
    _max_age,
)
from certbound_wsgi.errors import ConfigurationError, InvalidToken, TemporarilyUnavailable
from certbound_wsgi.issuers import IssuerRouter, build_router, shared_keys, unverified_issuer
from certbound_wsgi.settings import Settings
from certbound_wsgi.shared_keys import Snapshot
from certbound_wsgi.stats import Stats
from tests.conftest import make_settings
from tests.support.redis_server import RedisServer
from tests.support.threaded_server import serving
from tests.support.tokens import AUDIENCE, ISSUER, StaticDiscovery, TestIssuer

ISSUER_B = "https://other-issuer.test"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def clock() -> Clock:
    return Clock()


class CachingIssuer(StaticDiscovery):
    """A StaticDiscovery whose JWKS response carries a ``Cache-Control`` header."""

    cache_control = ""

    def _get_json(self, url: str) -> dict[str, Any]:
        document = super()._get_json(url)
        self._last_max_age = _max_age(self.cache_control) if url.endswith("/jwks") else None
        return document


def discovery(issuer: TestIssuer, clock: Clock, **overrides: Any) -> StaticDiscovery:
    return StaticDiscovery(make_settings(**overrides), issuer, clock=clock)


# -- the periodic refresh ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lifetime", "advance", "fetched"),
    [
        pytest.param(30, 0, False, id="at-once"),
        pytest.param(30, 29.9, False, id="just-before-the-period"),
        pytest.param(30, 30, True, id="at-the-period"),
        pytest.param(30, 3600, True, id="long-after"),
        pytest.param(0, 0, False, id="lifetime-zero-not-twice-a-second"),
        pytest.param(0, 1, True, id="lifetime-zero-after-a-second"),
    ],
)
def test_refresh_if_due_fetches_only_when_the_period_is_over(
    lifetime: int, advance: float, fetched: bool, issuer: TestIssuer, clock: Clock
) -> None:
    d = discovery(issuer, clock, rediscovery_lifetime=lifetime)
    d.start()
    assert d.fetches == 1
    clock.now += advance
    d.refresh_if_due()
    assert d.fetches == 1 + fetched


@pytest.mark.parametrize(
    ("cache_control", "period"),
    [
        pytest.param("", 30, id="none-lifetime"),
        pytest.param("public, max-age=10", 10, id="shorter-max-age"),
        pytest.param("max-age=300", 30, id="longer-max-age-capped-by-lifetime"),
        pytest.param('max-age="5"', 5, id="quoted"),
        pytest.param("no-store", MIN_PERIOD, id="no-store-floor"),
        pytest.param("max-age=0", MIN_PERIOD, id="zero-floor"),
    ],
)
def test_the_jwks_cache_control_shortens_the_period(
    cache_control: str, period: float, issuer: TestIssuer, clock: Clock
) -> None:
    d = CachingIssuer(make_settings(rediscovery_lifetime=30), issuer, clock=clock)
    d.cache_control = cache_control
    d.start()
    assert d.report()["period"] == period
    clock.now += period - 0.01
    d.refresh_if_due()
    assert d.fetches == 1
    clock.now += 0.01
    d.refresh_if_due()
    assert d.fetches == 2


def test_a_withdrawn_key_is_distrusted_after_one_period(issuer: TestIssuer, clock: Clock) -> None:
    d = discovery(issuer, clock, rediscovery_lifetime=30)
    d.start()
    assert d.keys_for("k1")
    generation = d.generation
    issuer.rotate("k2")  # k1 removed at the issuer
    clock.now += 29
    assert d.refresh_if_due() == generation
    assert d.keys_for("k1")  # within the period: still held
    clock.now += 1
    assert d.refresh_if_due() == generation + 1
    with pytest.raises(UnknownKey):
        d.keys_for("k1")
    assert d.fetches == 2


def test_a_new_key_beside_the_old_does_not_change_the_generation(issuer: TestIssuer, clock: Clock) -> None:
    d = discovery(issuer, clock, rediscovery_lifetime=1)
    d.start()
    old = issuer.jwks()["keys"]
    issuer.rotate("k2")
    issuer.jwks = lambda: {"keys": [*old, issuer.key.as_dict(private=False)]}  # type: ignore[method-assign]
    clock.now += 1
    assert d.refresh_if_due() == 0
    assert d.keys_for("k1") and d.keys_for("k2")


# -- an unknown kid -------------------------------------------------------------------------------------------------


def test_unknown_kids_refresh_at_most_once_per_cooldown(issuer: TestIssuer, clock: Clock) -> None:
    d = discovery(issuer, clock, rediscovery_lifetime=300)
    d.start()
    clock.now += 5
    with pytest.raises(UnknownKey):
        d.keys_for("made-up-1")  # asked about at once, and the issuer has no such key: 401
    assert d.fetches == 2
    clock.now += UNKNOWN_KID_COOLDOWN / 2
    # Another kid the issuer was not asked about yet: it might know it, so not "invalid" but "unavailable".
    with pytest.raises(DiscoveryError):
        d.keys_for("made-up-2")
    assert d.retry_after() == 1
    with pytest.raises(UnknownKey):
        d.keys_for("made-up-1")  # asked already: still a definite no, without asking again
    assert d.fetches == 2
    clock.now += UNKNOWN_KID_COOLDOWN / 2
    with pytest.raises(UnknownKey):
        d.keys_for("made-up-2")
    assert d.fetches == 3


def test_a_rotated_key_is_found_by_one_fetch(issuer: TestIssuer, clock: Clock) -> None:
    d = discovery(issuer, clock, rediscovery_lifetime=300)
    d.start()
    issuer.rotate("k2")
    clock.now += 0.1  # well within the period, and right after the start-up fetch
    assert d.keys_for("k2")
    assert d.fetches == 2


# -- the issuer down: staleness ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("advance", "usable"),
    [
        pytest.param(600, True, id="within"),
        pytest.param(3600, True, id="at-the-bound"),
        pytest.param(3600.5, False, id="past-the-bound"),
    ],
)
def test_held_keys_serve_while_the_issuer_is_down_up_to_max_staleness(
    advance: float, usable: bool, issuer: TestIssuer, clock: Clock
) -> None:
    d = discovery(issuer, clock, rediscovery_lifetime=30, discovery_max_staleness=3600)
    d.start()
    issuer.down = True
    clock.now += advance
    generation = d.refresh_if_due()
    assert d.fetches == 1
    assert (generation == 0) is usable
    if usable:
        assert d.keys_for("k1")
    else:
        with pytest.raises(DiscoveryError, match="too old"):
            d.keys_for("k1")
        assert d.retry_after() <= RETRY_AFTER_FAILURE


def test_the_issuer_back_makes_stale_keys_usable_again(issuer: TestIssuer, clock: Clock) -> None:
    d = discovery(issuer, clock, rediscovery_lifetime=30, discovery_max_staleness=60)
    d.start()
    issuer.down = True
    clock.now += 61
    assert d.refresh_if_due() == 1
    issuer.down = False
    clock.now += RETRY_AFTER_FAILURE
    d.refresh_if_due()
    assert d.keys_for("k1")
    assert d.report()["age"] == 0


def test_a_start_with_the_issuer_down_is_not_fatal(issuer: TestIssuer, clock: Clock) -> None:
    issuer.down = True
    d = discovery(issuer, clock)
    d.start()
    with pytest.raises(DiscoveryError):
        d.keys_for("k1")
    issuer.down = False
    clock.now += RETRY_AFTER_FAILURE
    assert d.keys_for("k1")


# -- the shared copy in Redis ---------------------------------------------------------------------------------------


@pytest.fixture()
def redis_settings(redis_server: RedisServer) -> Iterator[dict[str, Any]]:
    redis_server.client().flushall()
    yield {"redis_url": redis_server.url, "cache_secret": "k" * 32}


def worker(issuer: TestIssuer, clock: Clock, cls: type[StaticDiscovery] = StaticDiscovery,
           **overrides: Any) -> StaticDiscovery:
    """One worker's Discovery, sharing its copy through Redis."""
    import redis

    settings = make_settings(**overrides)
    client = redis.Redis.from_url(settings.redis_url)
    return cls(settings, issuer, clock=clock, shared=shared_keys(settings, client, Stats())(ISSUER))


def test_a_worker_started_while_the_issuer_is_down_serves_from_the_shared_copy(
    redis_settings: dict[str, Any], issuer: TestIssuer, clock: Clock
) -> None:
    first = worker(issuer, clock, **redis_settings, discovery_max_staleness=3600)
    first.start()
    assert first.fetches == 1
    issuer.down = True
    clock.now += 600
    restarted = worker(issuer, clock, **redis_settings, discovery_max_staleness=3600)
    restarted.start()
    assert restarted.fetches == 0
    assert restarted.keys_for("k1")
    assert restarted.report()["age"] == 600
    # An unknown kid while the issuer is down: unavailable, not invalid.
    with pytest.raises(DiscoveryError):
        restarted.keys_for("k9")
    clock.now += 3000.5
    restarted.refresh_if_due()
    with pytest.raises(DiscoveryError):
        restarted.keys_for("k1")


def test_a_fresh_shared_copy_spares_the_issuer(redis_settings: dict[str, Any], issuer: TestIssuer,
                                               clock: Clock) -> None:
    a = worker(issuer, clock, **redis_settings, rediscovery_lifetime=30)
    b = worker(issuer, clock, **redis_settings, rediscovery_lifetime=30)
    a.start()
    b.start()
    assert (a.fetches, b.fetches) == (1, 0)
    clock.now += 30
    a.refresh_if_due()
    b.refresh_if_due()
    assert (a.fetches, b.fetches) == (2, 0)


def test_an_unknown_kid_is_not_answered_from_an_older_shared_copy(
    redis_settings: dict[str, Any], issuer: TestIssuer, clock: Clock
) -> None:
    a = worker(issuer, clock, **redis_settings, rediscovery_lifetime=300)
    b = worker(issuer, clock, **redis_settings, rediscovery_lifetime=300)
    a.start()
    b.start()
    issuer.rotate("k2")
    clock.now += 5
    assert b.keys_for("k2")  # the shared copy predates the kid: b asked the issuer
    assert b.fetches == 1
    clock.now += 0.1
    # b's copy predates the moment a saw k2 (and the issuer may have rotated again since): a asks too.
    with pytest.raises(UnknownKey):
        a.keys_for("k3")
    assert a.fetches == 2
    assert a.keys_for("k2")


def test_a_shared_copy_with_the_unknown_kid_spares_the_issuer(
    redis_settings: dict[str, Any], issuer: TestIssuer, clock: Clock
) -> None:
    workers = [worker(issuer, clock, **redis_settings, rediscovery_lifetime=300) for _ in range(3)]
    for d in workers:
        d.start()
    issuer.rotate("k2")
    for d in workers:
        clock.now += 0.1
        assert d.keys_for("k2")
    assert [d.fetches for d in workers] == [2, 0, 0]  # one start-up fetch, one for the rotation


@pytest.mark.parametrize("tamper", [pytest.param(b"garbage", id="garbage"), pytest.param(None, id="other-secret")])
def test_an_altered_shared_copy_is_ignored(
    tamper: bytes | None, redis_settings: dict[str, Any], redis_server: RedisServer, issuer: TestIssuer,
    clock: Clock
) -> None:
    worker(issuer, clock, **redis_settings).start()
    raw = redis_server.client()
    if tamper is None:
        redis_settings = {**redis_settings, "cache_secret": "x" * 32}
    else:
        for key in raw.keys("certbound:*"):
            raw.set(key, tamper)
    issuer.down = True
    restarted = worker(issuer, clock, **redis_settings)
    restarted.start()
    with pytest.raises(DiscoveryError):
        restarted.keys_for("k1")


class SlowIssuer(StaticDiscovery):
    def _get_json(self, url: str) -> dict[str, Any]:
        if url.endswith("/jwks"):
            time.sleep(0.3)
        return super()._get_json(url)


def test_workers_refresh_single_flight_through_redis(redis_settings: dict[str, Any], issuer: TestIssuer) -> None:
    workers = [worker(issuer, Clock(), SlowIssuer, **redis_settings) for _ in range(4)]
    barrier = threading.Barrier(len(workers))
    errors: list[BaseException] = []

    def run(d: StaticDiscovery) -> None:
        barrier.wait()
        try:
            d.start()
            d.keys_for("k1")
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(d,)) for d in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert errors == []
    assert sum(d.fetches for d in workers) == 1


# -- several issuers ---------------------------------------------------------------------------------------------


def second_issuer() -> TestIssuer:
    other = TestIssuer("b1")
    other.metadata = {**other.metadata, "issuer": ISSUER_B, "jwks_uri": ISSUER_B + "/jwks"}
    return other


def router(issuer: TestIssuer, other: TestIssuer, clock: Clock, **overrides: Any) -> IssuerRouter:
    settings = make_settings(issuers_allowed=[ISSUER_B], **overrides)
    # The second issuer's documents come from `other`, not HTTP.
    b = StaticDiscovery(settings, other, clock=clock, issuer_url=ISSUER_B)
    return build_router(settings, StaticDiscovery(settings, issuer, clock=clock), others={ISSUER_B: b})


def test_each_issuer_is_accepted_with_its_own_keys(issuer: TestIssuer, clock: Clock) -> None:
    other = second_issuer()
    r = router(issuer, other, clock)
    assert r.validate(issuer.token())["iss"] == ISSUER
    assert r.validate(other.token(iss=ISSUER_B))["iss"] == ISSUER_B


@pytest.mark.parametrize(
    ("make", "description"),
    [
        pytest.param(lambda a, b: b.token(iss=ISSUER), "the token is signed with an unknown key",
                     id="claims-a-signed-by-b"),
        pytest.param(lambda a, b: b.token(iss=ISSUER, header={"kid": "k1"}), "the token's signature is invalid",
                     id="claims-a-signed-by-b-with-a-kid"),
        pytest.param(lambda a, b: a.token(iss=ISSUER_B), "the token is signed with an unknown key",
                     id="claims-b-signed-by-a"),
        pytest.param(lambda a, b: a.token(iss="https://evil.test"), "the token was issued by another issuer",
                     id="unknown-issuer"),
        pytest.param(lambda a, b: a.token(iss=None), "the token was issued by another issuer", id="no-issuer"),
        pytest.param(lambda a, b: "a.b", "the access token is not a JWT", id="not-a-jwt"),
    ],
)
def test_cross_issuer_key_confusion_is_refused(make: Any, description: str, issuer: TestIssuer,
                                               clock: Clock) -> None:
    other = second_issuer()
    r = router(issuer, other, clock)
    with pytest.raises(InvalidToken) as refused:
        r.validate(make(issuer, other))
    assert refused.value.description == description


def test_audiences_are_per_issuer(issuer: TestIssuer, clock: Clock) -> None:
    other = second_issuer()
    r = router(issuer, other, clock, issuer_audiences=[f"{ISSUER_B}=https://api-b.test"])
    assert r.validate(other.token(iss=ISSUER_B, aud="https://api-b.test"))["aud"] == "https://api-b.test"
    with pytest.raises(InvalidToken, match="audience"):
        r.validate(other.token(iss=ISSUER_B, aud=AUDIENCE, jti="x"))
    assert r.validate(issuer.token())["aud"] == AUDIENCE  # the first issuer keeps `audience`


def test_a_remembered_token_is_forgotten_when_its_key_is_withdrawn(issuer: TestIssuer, clock: Clock) -> None:
    settings = make_settings(rediscovery_lifetime=30)
    r = build_router(settings, StaticDiscovery(settings, issuer, clock=clock))
    token = issuer.token()
    assert r.validate(token)["sub"] == "alice"
    assert r.memo_size() == 1
    issuer.rotate("k2")
    clock.now += 30
    with pytest.raises(InvalidToken, match="unknown key"):
        r.validate(token)


def test_a_remembered_token_fails_closed_past_max_staleness(issuer: TestIssuer, clock: Clock) -> None:
    settings = make_settings(rediscovery_lifetime=30, discovery_max_staleness=60)
    r = build_router(settings, StaticDiscovery(settings, issuer, clock=clock))
    token = issuer.token()
    r.start()
    assert r.validate(token)["sub"] == "alice"
    issuer.down = True
    clock.now += 61
    with pytest.raises(TemporarilyUnavailable):
        r.validate(token)


@pytest.mark.parametrize(
    ("token", "issuer"),
    [
        pytest.param("eyJhbGciOiJFUzI1NiJ9.eyJpc3MiOiJodHRwczovL2EudGVzdCJ9.sig", "https://a.test", id="plain"),
        pytest.param("x.e30.y", None, id="no-iss"),
        pytest.param("x.WzFd.y", None, id="not-an-object"),
        pytest.param("x.!!!.y", None, id="not-base64"),
        pytest.param("x.eyJpc3MiOjF9.y", None, id="iss-not-a-string"),
        pytest.param("x." + "A" * 20000 + ".y", None, id="too-long"),
    ],
)
def test_unverified_issuer(token: str, issuer: str | None) -> None:
    if issuer is None:
        with pytest.raises(InvalidToken):
            unverified_issuer(token)
    else:
        assert unverified_issuer(token) == issuer


@pytest.mark.parametrize(
    ("overrides", "option"),
    [
        pytest.param({"issuers_allowed": ["http://b.example"]}, "issuers_allowed", id="plain-http-issuer"),
        pytest.param({"issuer_audiences": ["https://b.test"]}, "issuer_audiences", id="no-equals"),
        pytest.param({"issuer_audiences": ["https://b.test="]}, "issuer_audiences", id="no-audience"),
        pytest.param({"issuer_audiences": ["https://b.test=x"]}, "issuer_audiences", id="issuer-not-accepted"),
        pytest.param({"client_jwks_path": "/jwks"}, "client_jwks_path", id="jwks-path-without-key"),
        pytest.param({"client_jwks_path": "jwks"}, "client_jwks_path", id="relative-path"),
        pytest.param({"discovery_max_staleness": 0}, "discovery_max_staleness", id="staleness-zero"),
    ],
)
def test_bad_key_options_name_the_option(overrides: dict[str, Any], option: str) -> None:
    with pytest.raises(ConfigurationError) as refused:
        Settings(issuer=ISSUER, audience=[AUDIENCE], **overrides)
    assert refused.value.option == option


def test_each_worker_makes_its_own_period_of_a_shared_copy(redis_settings: dict[str, Any], issuer: TestIssuer,
                                                          clock: Clock) -> None:
    fast = worker(issuer, clock, **redis_settings, rediscovery_lifetime=1)
    fast.start()
    slow = worker(issuer, clock, **redis_settings, rediscovery_lifetime=300)
    slow.start()
    assert (slow.fetches, slow.report()["period"], fast.report()["period"]) == (0, 300, 1)


def test_key_ages_are_carried_from_copy_to_copy(redis_settings: dict[str, Any], issuer: TestIssuer,
                                                clock: Clock) -> None:
    a = worker(issuer, clock, **redis_settings, rediscovery_lifetime=30)
    a.start()
    first = issuer.jwks()["keys"]
    clock.now += 100
    issuer.rotate("k2")
    issuer.jwks = lambda: {"keys": [*first, issuer.key.as_dict(private=False)]}  # type: ignore[method-assign]
    a.refresh_if_due()
    assert a.report()["key_ages"] == {"k1": 100, "k2": 0}
    clock.now += 50
    restarted = worker(issuer, clock, **redis_settings, rediscovery_lifetime=30)
    restarted.start()  # the copy is due: it asks the issuer, and keeps the ages the copy had
    assert restarted.fetches == 1
    assert restarted.report()["key_ages"] == {"k1": 150, "k2": 50}
    assert restarted.report()["age"] == 0


# -- hostile input, a real HTTP issuer, a fork ------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(token=st.one_of(st.text(max_size=200), st.builds(
    lambda a, b, c: f"{a}.{b}.{c}", st.text(max_size=30), st.text(max_size=60), st.text(max_size=10))))
def test_unverified_issuer_of_anything_is_a_string_or_invalid_token(token: str) -> None:
    try:
        assert isinstance(unverified_issuer(token), str)
    except InvalidToken:
        pass


@settings(max_examples=300, deadline=None)
@given(data=st.one_of(st.binary(max_size=200), st.builds(
    lambda m, j, t, a, s: json.dumps({"m": m, "j": j, "t": t, "a": a, "s": s}).encode(),
    st.one_of(st.dictionaries(st.text(max_size=3), st.integers()), st.integers()), st.just({"keys": []}),
    st.one_of(st.floats(allow_nan=False), st.text(max_size=3)), st.one_of(st.none(), st.integers(), st.text()),
    st.one_of(st.dictionaries(st.text(max_size=3), st.floats(allow_nan=False)), st.lists(st.integers())))))
def test_a_shared_copy_of_anything_is_a_snapshot_or_none(data: bytes) -> None:
    snapshot = Snapshot.from_bytes(data)
    assert snapshot is None or isinstance(snapshot.fetched_at, float)


@settings(max_examples=300, deadline=None)
@given(header=st.text(max_size=60))
def test_max_age_of_any_header_is_none_or_a_number(header: str) -> None:
    age = _max_age(header)
    assert age is None or age >= 0


class JWKSHandler(http.server.BaseHTTPRequestHandler):
    issuer = TestIssuer()
    cache_control = "max-age=7"

    def do_GET(self) -> None:
        base = f"http://127.0.0.1:{self.server.server_address[1]}"
        if self.path == "/.well-known/openid-configuration":
            body, headers = {"issuer": base, "jwks_uri": base + "/jwks"}, {}
        else:
            body, headers = self.issuer.jwks(), {"Cache-Control": self.cache_control}
        data = json.dumps(body).encode()
        self.send_response(200)
        for name, value in {**headers, "Content-Type": "application/json", "Content-Length": str(len(data))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def http_issuer() -> Iterator[str]:
    with serving(http.server.ThreadingHTTPServer(("127.0.0.1", 0), JWKSHandler)) as url:
        yield url


def test_a_real_jwks_response_sets_the_period_and_a_fork_gets_its_own_connections(http_issuer: str) -> None:
    d = Discovery(Settings(issuer=http_issuer, audience=[AUDIENCE], rediscovery_lifetime=30))
    d.start()
    assert d.report()["period"] == 7
    assert d.keys_for("k1")
    parent = d._http
    d._pid = -1  # as in a child forked after the start-up fetch (gunicorn --preload)
    d.refresh(force=True)
    assert d._http is not parent
    assert d.report()["kids"] == ["k1"]


def test_a_waiting_worker_asks_itself_as_soon_as_the_fetcher_gives_up(
    redis_settings: dict[str, Any], issuer: TestIssuer, clock: Clock
) -> None:
    b = worker(issuer, clock, **redis_settings)
    fetcher = b._shared
    assert fetcher is not None
    token = fetcher.lock()  # another worker is fetching...
    assert isinstance(token, str)
    threading.Timer(0.3, fetcher.unlock, args=(token,)).start()  # ...and fails: no copy, the lock let go
    started = time.monotonic()
    b.start()
    took = time.monotonic() - started
    assert b.fetches == 1
    assert 0.3 <= took < 1.0  # not the whole http_timeout (5 s)


def test_the_route_of_a_valid_token_is_remembered_within_bounds(issuer: TestIssuer, clock: Clock) -> None:
    other = second_issuer()
    r = router(issuer, other, clock, token_cache_size=2)
    with pytest.raises(InvalidToken):
        r.validate(other.token(iss=ISSUER_B, aud="https://nobody.test"))
    assert r._route_of == {}  # an invalid token is not remembered
    tokens = [other.token(iss=ISSUER_B, jti=str(n)) for n in range(3)] + [issuer.token()]
    for token in tokens:
        assert r.validate(token)["iss"] in (ISSUER, ISSUER_B)
        assert len(r._route_of) <= 2
    assert r.validate(tokens[-1])["iss"] == ISSUER  # remembered routes stay right


class HangingDiscovery(StaticDiscovery):
    """An issuer that hangs on every JWKS fetch while ``hang`` is set (a frozen IdP)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hang = threading.Event()

    def _get_json(self, url: str) -> dict[str, Any]:
        if url.endswith("/jwks") and self.hang.is_set():
            time.sleep(1.0)
            raise DiscoveryError(f"{url}: ReadTimeout")
        return super()._get_json(url)


@pytest.mark.parametrize("background", [True, False], ids=["background", "inline"])
def test_a_due_refresh_holds_no_request_when_it_runs_in_the_background(
    issuer: TestIssuer, background: bool
) -> None:
    """RFC 5861-style stale-while-revalidate: the keys held now serve while the issuer is asked."""
    clock = Clock()
    d = HangingDiscovery(make_settings(rediscovery_lifetime=30), issuer, clock=clock, background=background)
    d.start()
    assert d.keys_for("k1")
    clock.now += 30  # due
    d.hang.set()
    started = time.perf_counter()
    d.refresh_if_due()
    keys = d.keys_for("k1")
    held = time.perf_counter() - started
    assert keys  # the keys held now still serve
    if background:
        assert held < 0.5, held
        deadline = time.monotonic() + 5
        while d._revalidating and time.monotonic() < deadline:
            time.sleep(0.01)
        assert d._revalidating == 0
    else:
        assert held >= 0.9, held  # the inline refresh is what the request waited for


def test_retry_after_is_a_whole_second_before_any_unknown_kid_was_asked_about(
    issuer: TestIssuer, clock: Clock
) -> None:
    """After a good fetch and before any unknown-kid refresh, the cooldown's start is -inf:
    ceil(-inf) raised OverflowError, and the 503 it was computing for became a 500."""
    d = discovery(issuer, clock)
    d.start()
    assert d.retry_after() == 1


class LaggingDiscovery(StaticDiscovery):
    """Reads the JWKS, then takes a while to come back with it (while ``lag`` is set)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lag = threading.Event()

    def _get_json(self, url: str) -> dict[str, Any]:
        answer = super()._get_json(url)
        if url.endswith("/jwks") and self.lag.is_set():
            time.sleep(0.3)
        return answer


def test_an_unknown_kid_that_joins_an_older_refresh_asks_again(issuer: TestIssuer) -> None:
    """A periodic refresh in its own thread began before the kid appeared: joining it cannot
    tell whether the issuer knows the kid, so the worker asks once more (401 or the key, never
    a 503 while the issuer is up)."""
    clock = Clock()
    d = LaggingDiscovery(make_settings(rediscovery_lifetime=30), issuer, clock=clock, background=True)
    d.start()
    clock.now += 30  # the period is over
    d.lag.set()
    d.refresh_if_due()  # the refresh thread has read the JWKS with k1 only, and lags
    time.sleep(0.05)
    issuer.rotate("k2")
    clock.now += 1  # k2 is first seen after that refresh began
    assert d.keys_for("k2")
    assert d.fetches >= 2
