"""Faults under load: Redis, the issuer, the clock, nginx and gunicorn going wrong while traffic runs.

Every test asserts some of the four guarantees, and its docstring says which:

(a) a stolen or invalid token is never accepted;
(b) legit requests succeed whenever the needed facts are cached or the IdP can be reached;
(c) otherwise the answer is 503 with ``Retry-After``;
(d) the service recovers by itself.

Real processes: this module's own oidc-provider (stopped, frozen and restarted here without
disturbing other modules), its own redis-server (killed, slowed and filled here), a fake issuer
(a werkzeug server in this process whose endpoints can be broken at run time), and gunicorn
behind nginx (mutual TLS). :func:`run_traffic` sends legit requests (alice's token with alice's
certificate), stolen ones (alice's token with mallory's certificate) and invalid ones from a few
threads for a few seconds, applies the fault meanwhile, and tallies every answer.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
import redis
import requests
from joserfc.jwk import ECKey

from certbound_wsgi.cache.seal import Sealer
from certbound_wsgi.dev.pki import Issued
from certbound_wsgi.dev.server import DevServer, server_ssl_context
from certbound_wsgi.types import StartResponse, WSGIEnvironment
from tests.support.idp import API_RESOURCE, OPAQUE_RESOURCE, SECRETS, OidcProvider, x5t_s256
from tests.support.idp_fixtures import Pki
from tests.support.procs import wait_until
from tests.support.redis_server import RedisServer

from .conftest import Stack, StackFactory, foreign_key, mint

CACHE_SECRET = "faults-cache-secret-0123456789abcdef"
CACHE_SECRET_PROXIED = "faults-proxied-secret-0123456789abcdef"
INTROSPECTION = {
    "client_id": "rs-client",
    "client_secret": SECRETS["rs-client"],
    "audience": f"{API_RESOURCE},{OPAQUE_RESOURCE}",
}


# -- traffic ------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One kind of request: ``kind`` is ``legit``, ``stolen``, ``invalid`` or ``uncached``."""

    kind: str
    token: str
    cert: Issued | None


@dataclass(frozen=True)
class Outcome:
    kind: str
    #: ``None``: no HTTP answer at all, even after the retries.
    status: int | None
    #: The JSON ``error`` member of a refusal; without an answer, what went wrong.
    error: str | None
    retry_after: str | None
    #: A JSON answer (the middleware's or the echo app's), not an nginx error page.
    from_app: bool
    #: Seconds since the traffic began.
    started: float
    elapsed: float
    retries: int


@dataclass
class Tally:
    outcomes: list[Outcome] = field(default_factory=list)
    #: Seconds since the traffic began at which the fault action returned.
    fault_done: float = 0.0

    def of(self, *kinds: str) -> list[Outcome]:
        return [o for o in self.outcomes if o.kind in kinds]

    def statuses(self, kind: str) -> Counter[int | None]:
        return Counter(o.status for o in self.of(kind))

    def summary(self) -> str:
        kinds = sorted({o.kind for o in self.outcomes})
        slowest = max((o.elapsed for o in self.outcomes), default=0.0)
        retried = sum(o.retries for o in self.outcomes)
        failures = dict(Counter(o.error for o in self.outcomes if o.status is None))
        return (f"{ {k: dict(self.statuses(k)) for k in kinds} } slowest={slowest:.2f}s retried={retried}"
                + (f" unanswered={failures}" if failures else ""))


def send(session: requests.Session, stack: Stack, call: Call, *, retries: int = 3,
         timeout: float = 10.0) -> tuple[requests.Response | str, int]:
    """One request; a connection-level failure (no complete HTTP answer) is retried, as a client would.

    :returns: the response, or the name of the last exception; and the number of retries.
    """
    failure = ""
    for attempt in range(retries + 1):
        try:
            response = session.get(stack.nginx.url + "/anything", headers={"Authorization": f"Bearer {call.token}"},
                                   cert=call.cert.pair if call.cert else None, timeout=timeout)
            return response, attempt
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
            failure = type(exc).__name__
            time.sleep(0.05)
        except requests.RequestException as exc:  # a timeout: the request hung, which no retry excuses
            return type(exc).__name__, attempt
    return failure, retries


def outcome(call: Call, response: requests.Response | str, started: float, elapsed: float,
            retries: int) -> Outcome:
    if isinstance(response, str):
        return Outcome(call.kind, None, response, None, False, started, elapsed, retries)
    error = None
    from_app = response.headers.get("Content-Type", "").startswith("application/json")
    if from_app and response.status_code >= 400:
        error = response.json().get("error")
    return Outcome(call.kind, response.status_code, error, response.headers.get("Retry-After"), from_app,
                   started, elapsed, retries)


def new_session(stack: Stack) -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # no REQUESTS_CA_BUNDLE, no proxies
    session.verify = stack.ca_file
    return session


def run_traffic(stack: Stack, mix: Sequence[Call], *, before: float, fault: Callable[[], object] | None = None,
                after: float = 0.0, threads: int = 3) -> Tally:
    """Send ``mix`` round-robin from ``threads`` threads; ``before`` seconds in, run ``fault`` (in this
    thread), then go on for ``after`` seconds more; return every answer."""
    tally = Tally()
    lock = threading.Lock()
    stop = threading.Event()
    t0 = time.monotonic()

    def loop(offset: int) -> None:
        with new_session(stack) as session:
            n = offset
            while not stop.is_set():
                call = mix[n % len(mix)]
                n += 1
                started = time.monotonic()
                try:
                    response, retries = send(session, stack, call)
                    result = outcome(call, response, started - t0, time.monotonic() - started, retries)
                except Exception as exc:  # recorded, and failed on, rather than lost in a thread
                    result = Outcome(call.kind, None, repr(exc), None, False, started - t0,
                                     time.monotonic() - started, 0)
                with lock:
                    tally.outcomes.append(result)

    workers = [threading.Thread(target=loop, args=(i * 7,), daemon=True) for i in range(threads)]
    for thread in workers:
        thread.start()
    try:
        time.sleep(before)
        if fault is not None:
            fault()
        tally.fault_done = time.monotonic() - t0
        time.sleep(after)
    finally:
        stop.set()
        for thread in workers:
            thread.join(30)
    assert tally.outcomes, "no request was sent"
    print(tally.summary())  # shown with -s, or when the test fails
    return tally


def call_once(stack: Stack, call: Call) -> Outcome:
    with new_session(stack) as session:
        started = time.monotonic()
        response, retries = send(session, stack, call)
        return outcome(call, response, 0.0, time.monotonic() - started, retries)


def assert_never_accepted(tally: Tally) -> None:
    """(a): every stolen or invalid request was refused with 401 (or the documented 503)."""
    for o in tally.of("stolen", "invalid"):
        assert o.status in (401, 503) and o.from_app, f"{o} | {tally.summary()}"
        if o.status == 503:
            assert o.error == "temporarily_unavailable" and o.retry_after, o


def assert_all(tally: Tally, kind: str, status: int) -> None:
    wrong = [o for o in tally.of(kind) if o.status != status or not o.from_app]
    assert tally.of(kind), f"no {kind} request was sent"
    assert not wrong, f"{len(wrong)} {kind} requests not {status}, e.g. {wrong[:3]} | {tally.summary()}"


def assert_no_5xx(tally: Tally) -> None:
    errors = [o for o in tally.outcomes if o.status is None or o.status >= 500]
    assert not errors, f"{len(errors)} 5xx or unanswered, e.g. {errors[:3]} | {tally.summary()}"


def assert_503(o: Outcome) -> None:
    """(c): the documented answer when a needed fact is neither cached nor obtainable."""
    assert o.status == 503 and o.from_app, o
    assert o.error == "temporarily_unavailable", o
    assert o.retry_after is not None and int(o.retry_after) >= 1, o


# -- fixtures ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_idp(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    """An IdP of this module's own: the tests stop, freeze and restart it."""
    provider = OidcProvider(tmp_path_factory.mktemp("idp-load-faults"), ca=pki.ca,
                            bound={"bound": pki.alice, "bound2": pki.mallory})
    provider.start()
    try:
        yield provider
    finally:
        if provider._proc is not None:
            provider._proc.signal(signal.SIGCONT)
        provider.stop()


@pytest.fixture(autouse=True)
def idp_running(own_idp: OidcProvider) -> Iterator[None]:
    """Every test starts and ends with the IdP serving, whatever a failed one left behind."""
    yield
    if own_idp._proc is not None:
        own_idp._proc.signal(signal.SIGCONT)
    own_idp.start()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-faults"), "--enable-debug-command", "yes")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def redis_admin(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client for the test's own Redis commands; the server's memory settings are restored after."""
    if redis_server.process is None:
        redis_server.start()
    client = redis_server.client()
    try:
        yield client
    finally:
        client.config_set("maxmemory", 0)
        client.config_set("maxmemory-policy", "noeviction")
        client.close()


@pytest.fixture(scope="module")
def redis_stack(stacks: StackFactory, own_idp: OidcProvider, redis_server: RedisServer) -> Stack:
    """Opaque tokens by introspection, two workers sharing Redis (default ``redis_timeout``, 0.05 s),
    each keeping an entry in its own L1 cache for one second only."""
    return stacks(own_idp, "gunicorn", workers=2, auth_methods="introspection", cache_l1_ttl="1",
                  redis_url=redis_server.url, cache_secret=CACHE_SECRET, **INTROSPECTION)


@pytest.fixture(scope="module")
def issuer_stack(stacks: StackFactory, own_idp: OidcProvider) -> Stack:
    """JWTs and opaque tokens, no Redis, ``http_timeout=1``, ``leeway=5``; one worker, so that what
    is cached is known exactly."""
    return stacks(own_idp, "gunicorn", workers=1, auth_methods="bearer,introspection", http_timeout="1",
                  leeway="5", **INTROSPECTION)


@pytest.fixture(scope="module")
def pool_stack(stacks: StackFactory, own_idp: OidcProvider) -> Stack:
    """JWTs, two workers: for nginx reloads and worker deaths."""
    return stacks(own_idp, "gunicorn", workers=2)


def opaque(idp: OidcProvider, client: str = "bound") -> str:
    token = idp.token(client, resource=OPAQUE_RESOURCE)
    assert token.count(".") != 2, "expected an opaque token"
    return token


def redis_key(idp: OidcProvider, token: str) -> str:
    return Sealer(CACHE_SECRET, "intro").key_name(idp.issuer, token)


def redis_mix(idp: OidcProvider, pki: Pki, tokens: Sequence[str]) -> list[Call]:
    mix: list[Call] = []
    for token in tokens:
        mix += [Call("legit", token, pki.alice), Call("legit", token, pki.alice), Call("stolen", token, pki.mallory)]
    mix += [Call("stolen", tokens[0], None), Call("invalid", opaque(idp, "bound2"), pki.alice),
            Call("invalid", secrets.token_urlsafe(32), pki.alice)]
    return mix


def warm(stack: Stack, calls: Sequence[Call]) -> None:
    """Send each call once, so that its answer is cached before the fault."""
    for call in calls:
        result = call_once(stack, call)
        if call.kind == "legit":
            assert result.status == 200, result


def workers_of(stack: Stack) -> set[int]:
    pid = stack.app_server.process.pid
    return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


# -- 1-3. Redis ---------------------------------------------------------------------


def test_redis_killed_and_restarted_under_load(redis_stack: Stack, own_idp: OidcProvider,
                                               redis_server: RedisServer, redis_admin: redis.Redis,
                                               pki: Pki) -> None:
    """Redis crashes (SIGKILL) under load and comes back empty.

    (a) no stolen or invalid token is accepted; (b) the IdP is up, so every legit request
    succeeds: no 5xx and no 503 while Redis is gone (the breaker skips it, the L1 cache and
    direct introspection carry on); (d) once it is back, Redis is used again: entries reappear.
    """
    tokens = [opaque(own_idp) for _ in range(3)]
    mix = redis_mix(own_idp, pki, tokens)
    warm(redis_stack, mix)
    assert wait_until(lambda: all(redis_admin.exists(redis_key(own_idp, t)) for t in tokens), timeout=5)

    def crash_and_restart() -> None:
        redis_server.kill()
        time.sleep(1.5)
        redis_server.start()

    tally = run_traffic(redis_stack, mix, before=0.8, fault=crash_and_restart, after=1.5)
    assert_never_accepted(tally)
    assert_all(tally, "legit", 200)
    assert_no_5xx(tally)

    # (d) The restarted Redis is empty; once the breakers close again, new answers are stored in it.
    client = redis_server.client()

    def new_token_reaches_redis() -> bool:
        fresh = opaque(own_idp)
        assert call_once(redis_stack, Call("legit", fresh, pki.alice)).status == 200
        return wait_until(lambda: bool(client.exists(redis_key(own_idp, fresh))), timeout=0.3)

    try:
        assert wait_until(new_token_reaches_redis, timeout=5, interval=0.2), "Redis is not used again"
    finally:
        client.close()


def test_redis_slow_never_holds_a_request(redis_stack: Stack, own_idp: OidcProvider, redis_server: RedisServer,
                                          redis_admin: redis.Redis, pki: Pki) -> None:
    """Redis stalls (``DEBUG SLEEP 0.5``, repeatedly) under load.

    (a) no stolen or invalid token is accepted; (b) no 5xx, every legit request succeeds; and
    no request hangs: each is answered within about a second (``redis_timeout`` 0.05 s, then
    the breaker skips Redis for one second).
    """
    tokens = [opaque(own_idp) for _ in range(3)]
    mix = redis_mix(own_idp, pki, tokens)
    warm(redis_stack, mix)
    sleeper = redis_server.client()

    def stall() -> None:
        for _ in range(4):
            sleeper.execute_command("DEBUG", "SLEEP", "0.5")
            time.sleep(0.4)

    try:
        tally = run_traffic(redis_stack, mix, before=0.5, fault=stall, after=1.5)
    finally:
        sleeper.close()
    assert_never_accepted(tally)
    assert_all(tally, "legit", 200)
    assert_no_5xx(tally)
    slow = [o for o in tally.outcomes if o.elapsed > 1.0]
    assert not slow, f"{len(slow)} requests took over 1 s, e.g. {slow[:3]} | {tally.summary()}"


class DelayingProxy:
    """A TCP proxy in front of Redis that, while :attr:`slow` is set, holds back each chunk a
    client sends that carries a ``SET ... NX`` (the middleware's lock) for ``delay`` seconds, and
    then delivers it all the same: a latency spike on one command, longer than ``redis_timeout``."""

    def __init__(self, upstream_port: int, delay: float = 0.3) -> None:
        self.upstream_port = upstream_port
        self.delay = delay
        self.slow = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
                self._sockets.append(client)
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
                self._sockets.append(upstream)
            except OSError:
                continue
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, to_redis: bool) -> None:
        try:
            while data := source.recv(65536):
                if to_redis and self.slow.is_set() and b"\r\nNX\r\n" in data:
                    time.sleep(self.delay)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock, how in ((sink, socket.SHUT_WR), (source, socket.SHUT_RD)):
                try:
                    sock.shutdown(how)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed = True
        for sock in self._sockets:
            sock.close()


@pytest.fixture(scope="module")
def delaying_proxy(redis_server: RedisServer) -> Iterator[DelayingProxy]:
    proxy = DelayingProxy(redis_server.port)
    try:
        yield proxy
    finally:
        proxy.close()


def lock_stack(stacks: StackFactory, idp: OidcProvider, redis_url: str) -> Stack:
    """One worker sharing the cache of the other stacks made here, ``http_timeout=1`` (so a waiter
    gives up after 1.5 s; a lock lives LOCK_SECONDS unless released)."""
    return stacks(idp, "gunicorn", workers=1, auth_methods="introspection", cache_l1_ttl="1",
                  redis_url=redis_url, cache_secret=CACHE_SECRET_PROXIED, http_timeout="1", **INTROSPECTION)


def test_redis_latency_spike_on_the_lock_never_holds_a_request(
        stacks: StackFactory, own_idp: OidcProvider, redis_server: RedisServer, delaying_proxy: DelayingProxy,
        redis_admin: redis.Redis, pki: Pki) -> None:
    """One Redis command (an introspection lock taken on one host) is slower than ``redis_timeout``.

    Two hosts share Redis: one reaches it through :class:`DelayingProxy`, the other directly.
    (b) the IdP is up, so the token is accepted on both, and no request hangs: each is answered
    within about a second; (d) no lasting effect.
    """
    spiked = lock_stack(stacks, own_idp, delaying_proxy.url)
    peer = lock_stack(stacks, own_idp, redis_server.url)
    token = opaque(own_idp)
    lock = Sealer(CACHE_SECRET_PROXIED, "intro").key_name(own_idp.issuer, token) + ":lock"
    delaying_proxy.slow.set()
    try:
        first = call_once(spiked, Call("legit", token, pki.alice))
    finally:
        delaying_proxy.slow.clear()
    assert first.status == 200, first
    assert first.elapsed < 1.0, first
    # The SET NX the worker gave up on reaches Redis after all: a lock nobody holds.
    wait_until(lambda: bool(redis_admin.exists(lock)), timeout=1)
    later = [call_once(peer, Call("legit", token, pki.alice)) for _ in range(3)]
    assert [o.status for o in later] == [200] * 3, later
    slow = [round(o.elapsed, 2) for o in later if o.elapsed > 1.0]
    assert not slow, f"requests held for {slow} s by an orphaned lock"


def test_redis_full_evicts_and_reintrospects(redis_stack: Stack, own_idp: OidcProvider, redis_server: RedisServer,
                                             redis_admin: redis.Redis, pki: Pki) -> None:
    """Redis at ``maxmemory`` (1 MB, ``allkeys-lru``) while junk keeps filling it.

    Our entries are evicted: misses, then introspection again. (a) no stolen or invalid
    token is accepted; (b) no 5xx, every legit request succeeds.
    """
    tokens = [opaque(own_idp) for _ in range(3)]
    mix = redis_mix(own_idp, pki, tokens)
    warm(redis_stack, mix)
    keys = [redis_key(own_idp, t) for t in tokens]
    assert wait_until(lambda: all(redis_admin.exists(k) for k in keys), timeout=5)
    evicted_before = int(redis_admin.info("stats")["evicted_keys"])
    redis_admin.config_set("maxmemory-policy", "allkeys-lru")
    redis_admin.config_set("maxmemory", "1mb")
    junk = os.urandom(4096)
    filling = threading.Event()

    def fill(rounds: int) -> None:
        pipe = redis_admin.pipeline(transaction=False)
        for i in range(rounds):
            pipe.set(f"junk:{secrets.token_hex(8)}:{i}", junk)
        pipe.execute(raise_on_error=False)

    fill(400)  # 1.6 MB of junk: more than fits
    assert not any(redis_admin.exists(k) for k in keys), "our entries were not evicted"
    own_idp.reset_stats()

    filler_client = redis_server.client()

    def keep_filling() -> None:
        pipe = filler_client.pipeline(transaction=False)
        while not filling.is_set():
            for _ in range(50):
                pipe.set(f"junk:{secrets.token_hex(8)}", junk)
            pipe.execute(raise_on_error=False)
            time.sleep(0.05)

    filler = threading.Thread(target=keep_filling, daemon=True)
    filler.start()
    try:
        tally = run_traffic(redis_stack, mix, before=2.5)
    finally:
        filling.set()
        filler.join(10)
        filler_client.close()
    assert int(redis_admin.info("stats")["evicted_keys"]) > evicted_before
    assert own_idp.stats()["introspections"] >= len(tokens), "evicted entries were not introspected again"
    assert_never_accepted(tally)
    assert_all(tally, "legit", 200)
    assert_no_5xx(tally)
    redis_admin.config_set("maxmemory", 0)
    for key in redis_admin.scan_iter(match="junk:*", count=1000):
        redis_admin.delete(key)


# -- 4-5. The IdP down or frozen ------------------------------------------------------------


def issuer_calls(idp: OidcProvider, pki: Pki, stack: Stack) -> dict[str, Call]:
    """Tokens for the issuer faults; those marked cached have been used once already."""
    cnf = {"x5t#S256": x5t_s256(pki.alice)}
    jwt_token, cached_opaque = idp.token("bound"), opaque(idp)
    calls = {
        "cached_jwt": Call("legit", jwt_token, pki.alice),
        "cached_opaque": Call("legit", cached_opaque, pki.alice),
        # Never seen, but signed with a key whose JWKS is cached: validated offline.
        "known_key_jwt": Call("legit", mint(idp, cnf=cnf), pki.alice),
        "stolen_jwt": Call("stolen", jwt_token, pki.mallory),
        "stolen_opaque": Call("stolen", cached_opaque, pki.mallory),
        "no_cert": Call("stolen", jwt_token, None),
        # The IdP's kid, another key: a forgery, refused offline.
        "forged": Call("invalid", mint(idp, key=foreign_key(idp.kid), cnf=cnf), pki.alice),
        "uncached_opaque": Call("uncached", opaque(idp), pki.alice),
        "unknown_key_jwt": Call("uncached", mint(idp, key=foreign_key("rotated"), cnf=cnf), pki.alice),
    }
    warm(stack, [calls["cached_jwt"], calls["cached_opaque"]])
    return calls


def test_idp_down_cached_works_uncached_503_then_recovers(issuer_stack: Stack, own_idp: OidcProvider,
                                                          pki: Pki) -> None:
    """The IdP is stopped under load, then started again.

    (b) what is cached keeps working: introspection answers within their TTL, memoized JWTs, and new
    JWTs signed with a key from the cached JWKS; (a) stolen, cert-less and forged tokens are refused;
    (c) an uncached opaque token or an unknown key: 503 with ``Retry-After``; (d) once the IdP is back,
    new tokens are accepted and the unknown key gets its definite 401, without a restart.
    """
    calls = issuer_calls(own_idp, pki, issuer_stack)
    own_idp.stop()
    try:
        time.sleep(1.1)  # rediscovery_lifetime=1: an unknown kid may trigger a refetch again
        tally = run_traffic(issuer_stack, list(calls.values()), before=1.5)
    finally:
        own_idp.start()
    assert_all(tally, "legit", 200)
    assert_never_accepted(tally)
    assert tally.of("uncached")
    for o in tally.of("uncached"):
        assert_503(o)
    assert not [o for o in tally.of("stolen", "invalid") if o.status != 401], tally.summary()

    # (d) The restarted IdP forgot its tokens (they introspect as inactive): ask for new ones.
    fresh = Call("legit", opaque(own_idp), pki.alice)
    assert wait_until(lambda: call_once(issuer_stack, fresh).status == 200, timeout=5)
    assert wait_until(lambda: call_once(issuer_stack, calls["unknown_key_jwt"]).status == 401, timeout=5)
    assert call_once(issuer_stack, calls["cached_jwt"]).status == 200


def test_idp_frozen_past_http_timeout(issuer_stack: Stack, own_idp: OidcProvider, pki: Pki) -> None:
    """The IdP hangs (SIGSTOP: connections open, no answer) past ``http_timeout=1``.

    (c) an uncached token is answered 503 with ``Retry-After`` within http_timeout plus a margin,
    not held; (b) cached tokens: 200; (a) stolen and forged tokens: 401; (d) after SIGCONT the
    same uncached tokens get their definite answers (200, and 401 for the unknown key).
    """
    calls = issuer_calls(own_idp, pki, issuer_stack)
    assert own_idp._proc is not None
    pid = own_idp._proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(1.1)  # rediscovery_lifetime=1: an unknown kid may trigger a refetch again
        for name in ("uncached_opaque", "unknown_key_jwt"):
            o = call_once(issuer_stack, calls[name])
            assert_503(o)
            assert 0.9 <= o.elapsed < 2.5, f"{name}: answered after {o.elapsed:.2f}s"
        cached = [c for c in calls.values() if c.kind != "uncached"]
        tally = run_traffic(issuer_stack, cached, before=1.0)
        assert_all(tally, "legit", 200)
        assert not [o for o in tally.of("stolen", "invalid") if o.status != 401], tally.summary()
        assert max(o.elapsed for o in tally.outcomes) < 1.0, tally.summary()
    finally:
        os.kill(pid, signal.SIGCONT)
    assert wait_until(lambda: call_once(issuer_stack, calls["uncached_opaque"]).status == 200, timeout=5)
    assert wait_until(lambda: call_once(issuer_stack, calls["unknown_key_jwt"]).status == 401, timeout=5)


# -- 6. An issuer answering 500 or garbage ---------------------------------------------------

#: What a broken endpoint can answer: (status, content type, body).
BROKEN: dict[str, tuple[int, str, bytes]] = {
    "500": (500, "text/plain", b"Internal Server Error"),
    "html": (200, "text/html", b"<html><body>Maintenance</body></html>"),
    "truncated": (200, "application/json", b'{"keys": [{"kty": "EC", "crv": "P-2'),
    "bomb": (200, "application/json", b"[" * 100_000 + b"]" * 100_000),
    "huge": (200, "application/json", b'{"keys": [], "pad": "' + b"x" * 600_000 + b'"}'),
    "keys-not-a-list": (200, "application/json", b'{"keys": "x"}'),
    "no-keys": (200, "application/json", b'{"keys": []}'),
    "active-not-bool": (200, "application/json", b'{"active": "true", "sub": "alice"}'),
}


class FakeIssuer:
    """An issuer in this process (werkzeug, TLS from the test PKI) whose discovery, JWKS and
    introspection answers can be switched at run time: ``modes[endpoint]`` is ``ok``, a key of
    :data:`BROKEN`, or one of the discovery variants of :meth:`metadata`. It signs JWTs with its
    own ES256 key and introspects the opaque tokens it was told about."""

    def __init__(self, pki: Pki) -> None:
        self.keys = [ECKey.generate_key("P-256", parameters={"kid": "fake-1", "alg": "ES256", "use": "sig"},
                                        private=True)]
        self._server = DevServer(server_ssl_context(pki.server.cert_path, pki.server.key_path))
        self.issuer = self._server.url
        self.ca_file = pki.ca_file
        self.modes = {"discovery": "ok", "jwks": "ok", "introspection": "ok"}
        self.hits: Counter[str] = Counter()
        self.tokens: dict[str, dict[str, Any]] = {}
        self._server.start(self)

    @property
    def kid(self) -> str:
        return str(self.keys[0].kid)

    def private_jwks(self) -> dict[str, Any]:
        """The signing key first, as :func:`mint` expects."""
        return {"keys": [k.as_dict(private=True) for k in self.keys]}

    def rotate(self) -> None:
        """Sign with a new key from now on, and publish both."""
        self.keys.insert(0, ECKey.generate_key(
            "P-256", parameters={"kid": f"fake-{len(self.keys) + 1}", "alg": "ES256", "use": "sig"}, private=True))

    def mint(self, **kwargs: Any) -> str:
        """A JWT signed with this issuer's current key (or ``key=``), as :func:`mint` makes them."""
        return mint(self, **kwargs)  # type: ignore[arg-type]  # an issuer, if not an OidcProvider

    def opaque(self, cert: Issued) -> str:
        token = secrets.token_urlsafe(32)
        now = int(time.time())
        self.tokens[token] = {"active": True, "iss": self.issuer, "aud": OPAQUE_RESOURCE, "sub": "alice",
                              "iat": now, "exp": now + 300, "cnf": {"x5t#S256": x5t_s256(cert)},
                              "token_type": "Bearer"}
        return token

    def metadata(self, mode: str) -> dict[str, Any]:
        document = {"issuer": self.issuer, "jwks_uri": f"{self.issuer}/jwks",
                    "introspection_endpoint": f"{self.issuer}/introspect",
                    "id_token_signing_alg_values_supported": ["ES256"]}
        if mode == "no-introspection-endpoint":
            del document["introspection_endpoint"]
        elif mode == "unparseable-jwks-uri":
            document["jwks_uri"] = "https://a..b/jwks"
        return document

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        endpoint = {"/.well-known/openid-configuration": "discovery", "/jwks": "jwks",
                    "/introspect": "introspection"}.get(path)
        if endpoint is None:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found"]
        self.hits[endpoint] += 1
        mode = self.modes[endpoint]
        if mode in BROKEN:
            status, content_type, body = BROKEN[mode]
        else:
            status, content_type = 200, "application/json"
            if endpoint == "discovery":
                document = self.metadata(mode)
            elif endpoint == "jwks":
                document = {"keys": [k.as_dict(private=False) for k in self.keys]}
            else:
                size = int(environ.get("CONTENT_LENGTH") or 0)
                form = parse_qs(environ["wsgi.input"].read(size).decode())
                document = self.tokens.get(form.get("token", [""])[0], {"active": False})
            body = json.dumps(document).encode()
        start_response(f"{status} {'OK' if status == 200 else 'Error'}",
                       [("Content-Type", content_type), ("Content-Length", str(len(body)))])
        return [body]

    def close(self) -> None:
        self._server.shutdown()


#: Every fake issuer made, kept for the session: stacks are cached by the id() of their issuer,
#: which must not be reused by another one.
_FAKE_ISSUERS: list[FakeIssuer] = []


@pytest.fixture()
def fake_issuer(pki: Pki) -> Iterator[FakeIssuer]:
    issuer = FakeIssuer(pki)
    _FAKE_ISSUERS.append(issuer)
    try:
        yield issuer
    finally:
        issuer.close()


def fake_stack(stacks: StackFactory, issuer: FakeIssuer) -> Stack:
    """A new stack (one worker, nothing cached yet) for ``issuer``: JWTs and opaque tokens."""
    return stacks(issuer, "gunicorn", workers=1, auth_methods="bearer,introspection",  # type: ignore[arg-type]
                  **INTROSPECTION)


def test_issuer_answering_500_or_garbage(stacks: StackFactory, fake_issuer: FakeIssuer, pki: Pki) -> None:
    """The issuer's discovery, JWKS and introspection answer 500, HTML, truncated JSON, a JSON bomb,
    an oversize document or well-formed nonsense (``{"keys": "x"}``, ``"active": "true"``).

    (c) what needs the issuer is answered 503 with ``Retry-After``, from the very first request of a
    worker on; (b) what is cached (a memoized JWT, a JWT signed with a cached key, an introspection
    answer) is still accepted; (a) a forged or stolen token never is, and no 5xx but that 503;
    (d) once the issuer answers properly again, everything works, a rotated key included.
    """
    stack = fake_stack(stacks, fake_issuer)
    cnf = {"x5t#S256": x5t_s256(pki.alice)}
    jwt_token, cached_opaque = fake_issuer.mint(cnf=cnf), fake_issuer.opaque(pki.alice)

    # A worker whose issuer is broken from the start.
    fake_issuer.modes.update(discovery="500", jwks="500", introspection="500")
    for token in (jwt_token, cached_opaque):
        assert_503(call_once(stack, Call("legit", token, pki.alice)))
    fake_issuer.modes.update(discovery="ok", jwks="ok", introspection="ok")
    assert wait_until(lambda: call_once(stack, Call("legit", jwt_token, pki.alice)).status == 200, timeout=5)
    assert call_once(stack, Call("legit", cached_opaque, pki.alice)).status == 200

    for jwks_mode, introspection_mode in (("500", "500"), ("keys-not-a-list", "active-not-bool"),
                                          ("truncated", "truncated"), ("bomb", "bomb"), ("huge", "huge")):
        fake_issuer.modes.update(jwks=jwks_mode, introspection=introspection_mode)
        fetched = fake_issuer.hits["jwks"]
        mix = [
            Call("legit", jwt_token, pki.alice),
            Call("legit", fake_issuer.mint(cnf=cnf), pki.alice),
            Call("legit", cached_opaque, pki.alice),
            Call("stolen", jwt_token, pki.mallory),
            Call("stolen", cached_opaque, pki.mallory),
            Call("invalid", fake_issuer.mint(key=foreign_key(fake_issuer.kid), cnf=cnf), pki.alice),
            Call("unknown-key", fake_issuer.mint(key=foreign_key("fake-9"), cnf=cnf), pki.alice),
            Call("uncached", fake_issuer.opaque(pki.alice), pki.alice),
        ]
        # rediscovery_lifetime=1: within 1.2 s the broken JWKS is fetched for the unknown key.
        print(f"JWKS {jwks_mode}, introspection {introspection_mode}:")
        tally = run_traffic(stack, mix, before=1.2, threads=2)
        assert fake_issuer.hits["jwks"] > fetched, f"the {jwks_mode} JWKS was never fetched"
        assert_all(tally, "legit", 200)
        assert_all(tally, "stolen", 401)
        assert_all(tally, "invalid", 401)
        for o in tally.of("uncached"):
            assert_503(o)
        # The unknown key: 401 while the last fetch (a good one) is recent, 503 once it failed.
        unknown = tally.statuses("unknown-key")
        assert set(unknown) <= {401, 503} and unknown[503], tally.summary()
        for o in tally.of("unknown-key"):
            if o.status == 503:
                assert_503(o)

    fake_issuer.modes.update(jwks="ok", introspection="ok")
    fake_issuer.rotate()
    rotated = Call("legit", fake_issuer.mint(cnf=cnf), pki.alice)
    assert wait_until(lambda: call_once(stack, rotated).status == 200, timeout=5)
    assert call_once(stack, Call("legit", fake_issuer.opaque(pki.alice), pki.alice)).status == 200
    assert call_once(stack, Call("stolen", rotated.token, pki.mallory)).status == 401


def test_issuer_metadata_wrong_once_recovers(stacks: StackFactory, fake_issuer: FakeIssuer, pki: Pki) -> None:
    """The issuer's discovery document lacks ``introspection_endpoint`` on a worker's first request.

    (c) 503 with ``Retry-After`` while it does; (d) once the issuer serves its real document again,
    opaque tokens are accepted without a restart.
    """
    stack = fake_stack(stacks, fake_issuer)
    fake_issuer.modes["discovery"] = "no-introspection-endpoint"
    assert_503(call_once(stack, Call("legit", fake_issuer.opaque(pki.alice), pki.alice)))
    fake_issuer.modes["discovery"] = "ok"
    token = fake_issuer.opaque(pki.alice)
    recovered = wait_until(lambda: call_once(stack, Call("legit", token, pki.alice)).status == 200, timeout=3)
    assert recovered, f"still {call_once(stack, Call('legit', token, pki.alice))} with the issuer fixed"


def test_issuer_metadata_unparseable_url_is_503(stacks: StackFactory, fake_issuer: FakeIssuer, pki: Pki) -> None:
    """The issuer's discovery document names a ``jwks_uri`` that is not a valid URL.

    (c) the JWKS cannot be had: 503 with ``Retry-After``, not a 500; (d) recovers once fixed.
    """
    stack = fake_stack(stacks, fake_issuer)
    token = fake_issuer.mint(cnf={"x5t#S256": x5t_s256(pki.alice)})
    fake_issuer.modes["discovery"] = "unparseable-jwks-uri"
    broken = call_once(stack, Call("legit", token, pki.alice))
    fake_issuer.modes["discovery"] = "ok"
    assert wait_until(lambda: call_once(stack, Call("legit", token, pki.alice)).status == 200, timeout=5)
    assert_503(broken)


# -- 7. Clock skew ------------------------------------------------------------------------


def test_clock_skew_within_and_beyond_leeway(issuer_stack: Stack, own_idp: OidcProvider, pki: Pki) -> None:
    """Tokens from an issuer whose clock is off, with ``leeway=5``.

    (b) ``iat``/``nbf`` 3 s in the future, or ``exp`` 3 s in the past: accepted; (a) 30 s: refused
    with the reason, and a stolen token inside the leeway is still refused.
    """
    cnf = {"x5t#S256": x5t_s256(pki.alice)}
    now = time.time()
    ahead, behind = int(now) + 3, int(now) + 1 - 3  # at most 3 s off, whatever the rounding
    inside = {
        "future iat and nbf": mint(own_idp, cnf=cnf, iat=ahead, nbf=ahead),
        "past exp": mint(own_idp, cnf=cnf, iat=behind - 60, exp=behind),
    }
    beyond = {
        "the token was issued in the future": mint(own_idp, cnf=cnf, iat=int(now) + 30),
        "the token is not valid yet": mint(own_idp, cnf=cnf, nbf=int(now) + 30),
        "the token has expired": mint(own_idp, cnf=cnf, iat=int(now) - 90, exp=int(now) - 30),
    }
    mix = [Call("legit", t, pki.alice) for t in inside.values()]
    mix += [Call("stolen", t, pki.mallory) for t in inside.values()]
    mix += [Call("invalid", t, pki.alice) for t in beyond.values()]
    tally = run_traffic(issuer_stack, mix, before=0.6)  # "past exp" is good for 2 s at least
    assert_all(tally, "legit", 200)
    assert_all(tally, "stolen", 401)
    assert_all(tally, "invalid", 401)
    with new_session(issuer_stack) as session:
        for description, token in beyond.items():
            response, _ = send(session, issuer_stack, Call("invalid", token, pki.alice))
            assert isinstance(response, requests.Response) and response.status_code == 401, response
            assert response.json()["error_description"] == description


# -- 8-9. nginx reloaded, a gunicorn worker killed ---------------------------------------------


def pool_mix(idp: OidcProvider, pki: Pki) -> list[Call]:
    cnf = {"x5t#S256": x5t_s256(pki.alice)}
    token = idp.token("bound")
    return [
        Call("legit", token, pki.alice),
        Call("legit", mint(idp, cnf=cnf), pki.alice),
        Call("stolen", token, pki.mallory),
        Call("legit", token, pki.alice),
        Call("stolen", token, None),
        Call("invalid", mint(idp, key=foreign_key(idp.kid), cnf=cnf), pki.alice),
    ]


def test_nginx_reload_under_load(pool_stack: Stack, own_idp: OidcProvider, pki: Pki) -> None:
    """nginx is reloaded (SIGHUP, new workers, old ones drained) twice under load.

    (a) no stolen or invalid token is accepted; (b) every legit request succeeds, at worst after
    the client retries a connection nginx closed; no 5xx.
    """
    mix = pool_mix(own_idp, pki)
    warm(pool_stack, mix)

    def reload_twice() -> None:
        pool_stack.nginx.reload()
        time.sleep(0.5)
        pool_stack.nginx.reload()

    tally = run_traffic(pool_stack, mix, before=0.7, fault=reload_twice, after=0.7)
    assert_no_5xx(tally)
    assert_all(tally, "legit", 200)
    assert_all(tally, "stolen", 401)
    assert_all(tally, "invalid", 401)


def test_gunicorn_worker_killed_under_load(pool_stack: Stack, own_idp: OidcProvider, pki: Pki) -> None:
    """One gunicorn worker is SIGKILLed under load.

    (a) no stolen or invalid token is ever accepted, and the application never answers 5xx (a
    request the dead worker was holding may get nginx's 502, or a broken connection the client
    retries); (d) the master starts a new worker and, from a second after that, every request gets
    its right answer.
    """
    mix = pool_mix(own_idp, pki)
    warm(pool_stack, mix)
    before = workers_of(pool_stack)
    assert len(before) == 2
    victim = min(before)
    respawned_at: list[float] = []

    def kill_one() -> None:
        t0 = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: len(workers_of(pool_stack) - before) == 1 and victim not in workers_of(pool_stack),
                          timeout=10), "the master did not replace the worker"
        respawned_at.append(time.monotonic() - t0)

    tally = run_traffic(pool_stack, mix, before=0.7, fault=kill_one, after=2.0)
    assert len(workers_of(pool_stack)) == 2
    assert not [o for o in tally.outcomes if o.from_app and o.status is not None and o.status >= 500], tally.summary()
    assert not [o for o in tally.of("stolen", "invalid") if o.status is not None and o.status < 400], tally.summary()
    settled = tally.fault_done + 1.0
    late = [o for o in tally.outcomes if o.started >= settled]
    assert len(late) > 10, tally.summary()
    expected = {"legit": 200, "stolen": 401, "invalid": 401}
    wrong = [o for o in late if o.status != expected[o.kind] or not o.from_app]
    assert not wrong, f"after the respawn ({respawned_at[0]:.2f}s): {wrong[:3]} | {tally.summary()}"
