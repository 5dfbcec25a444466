"""Opaque, certificate-bound tokens by introspection (RFC 7662) through a shared, sealed Redis cache.

Real servers: oidc-provider (the session ``idp``), redis-server (this module's
own), and gunicorn with 4 workers behind nginx (mutual TLS). The workers keep
entries in their own L1 cache for one second only (``cache_l1_ttl=1``), so
that what one worker learnt reaches the others through Redis, where the tests
can watch, kill and tamper with it.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from certbound_wsgi.binding import CERT_MISSING, CLAIM_MISSING, THUMBPRINT_MISMATCH
from certbound_wsgi.cache.seal import Sealer
from tests.support.idp import OPAQUE_RESOURCE, SECRETS, OidcProvider, x5t_s256
from tests.support.idp_fixtures import Pki
from tests.support.procs import wait_until
from tests.support.redis_server import RedisServer

from .conftest import Stack, StackFactory

WORKERS = 4
SECRET_A = "cache-secret-A-0123456789abcdef"
SECRET_B = "cache-secret-B-fedcba9876543210"
INACTIVE = "the token is not active"


# -- fixtures and helpers ---------------------------------------------------------


def options(redis_server: RedisServer | None, **extra: str) -> dict[str, str]:
    opts = {
        "auth_methods": "introspection",
        "audience": f"https://api.test,{OPAQUE_RESOURCE}",
        "client_id": "rs-client",
        "client_secret": SECRETS["rs-client"],
        "cache_l1_ttl": "1",
        # Generous, so that a loaded machine never trips the breaker by a slow answer (which would rightly
        # mean one more introspection and make the counts below depend on the machine); a dead Redis
        # refuses connections at once.
        "redis_timeout": "0.5",
    }
    if redis_server is not None:
        opts.update(redis_url=redis_server.url, cache_secret=SECRET_A)
    opts.update(extra)
    return opts


@pytest.fixture(scope="module")
def stack(stacks: StackFactory, idp: OidcProvider, redis_server: RedisServer) -> Stack:
    """Stack A: 4 workers sharing ``redis_server`` under ``SECRET_A``."""
    return stacks(idp, "gunicorn", workers=WORKERS, **options(redis_server))


def opaque(idp: OidcProvider, client: str = "bound") -> str:
    """A fresh opaque token for https://opaque.test (``bound``: alice's, ``bound2``: mallory's)."""
    token = idp.token(client, resource=OPAQUE_RESOURCE)
    assert token.count(".") != 2, "expected an opaque token, got a JWT"
    return token


def key_of(idp: OidcProvider, token: str, secret: str = SECRET_A) -> str:
    """The Redis key the middleware uses for ``token`` (an HMAC keyed from ``secret``)."""
    return Sealer(secret, "intro").key_name(idp.issuer, token)


def namespace(secret: str) -> str:
    return Sealer(secret, "intro").namespace


def assert_refused(response: requests.Response, description: str) -> None:
    assert response.status_code == 401, response.text
    assert response.json() == {"error": "invalid_token", "error_description": description}
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="api"') and 'error="invalid_token"' in challenge, challenge


def introspections(idp: OidcProvider) -> int:
    return idp.stats()["introspections"]


def session_for(stack: Stack, cert: object) -> requests.Session:
    """A keep-alive session through nginx presenting ``cert``; ignores REQUESTS_CA_BUNDLE."""
    session = requests.Session()
    session.trust_env = False
    session.verify = stack.ca_file
    session.cert = cert.pair  # type: ignore[attr-defined]
    return session


def get(session: requests.Session, stack: Stack, token: str) -> requests.Response:
    return session.get(stack.nginx.url + "/anything", headers={"Authorization": f"Bearer {token}"}, timeout=15)


def redis_dump(redis_server: RedisServer) -> dict[bytes, bytes | None]:
    client = redis_server.client()
    try:
        return {key: client.get(key) for key in client.scan_iter(match="certbound:*")}
    finally:
        client.close()


def assert_no_token_in_redis(redis_server: RedisServer, *tokens: str) -> dict[bytes, bytes | None]:
    dump = redis_dump(redis_server)
    for token in tokens:
        raw = token.encode()
        for key, value in dump.items():
            assert raw not in key, key
            assert value is None or raw not in value, f"the token is stored in clear under {key!r}"
            # Sealed: not even the claims are readable.
            assert value is None or b"x5t#S256" not in value, f"the claims are stored in clear under {key!r}"
    return dump


def app_log(stack: Stack) -> str:
    return Path(stack.app_server.process.log).read_text(errors="replace")


def wait_l1_out() -> None:
    """Wait out ``cache_l1_ttl=1``: every worker asks Redis again."""
    time.sleep(1.2)


# -- 1. decisions ---------------------------------------------------------------


def test_bound_opaque_token(stack: Stack, idp: OidcProvider, pki: Pki) -> None:
    token = opaque(idp)
    response = stack.call(token, pki.alice)
    assert response.status_code == 200, response.text
    echoed = response.json()
    assert echoed["auth_method"] == "introspection"
    assert echoed["thumbprint"] == x5t_s256(pki.alice)
    assert echoed["claims"]["active"] is True
    assert echoed["claims"]["cnf"]["x5t#S256"] == x5t_s256(pki.alice)
    assert echoed["claims"]["aud"] == OPAQUE_RESOURCE or OPAQUE_RESOURCE in echoed["claims"]["aud"]

    assert_refused(stack.call(token, pki.mallory), THUMBPRINT_MISMATCH)
    assert_refused(stack.call(token), CERT_MISSING)
    # Once more from every worker, cached or not.
    for _ in range(WORKERS):
        assert stack.call(token, pki.alice).status_code == 200
        assert_refused(stack.call(token, pki.mallory), THUMBPRINT_MISMATCH)


def test_unbound_opaque_token_strict_and_optional(stack: Stack, stacks: StackFactory, idp: OidcProvider,
                                                  pki: Pki) -> None:
    token = opaque(idp, "unbound")
    assert_refused(stack.call(token, pki.alice), CLAIM_MISSING)
    optional = stacks(idp, "gunicorn", workers=WORKERS, **options(None, proof_of_possession_mtls="optional"))
    response = optional.call(token, pki.alice)
    assert response.status_code == 200, response.text
    assert response.json()["auth_method"] == "introspection"
    assert optional.call(token).status_code == 200
    # optional still checks a bound token.
    assert_refused(optional.call(opaque(idp), pki.mallory), THUMBPRINT_MISMATCH)


@pytest.mark.parametrize("token", ["garbage-opaque-token", "x" * 43])
def test_inactive_token(stack: Stack, pki: Pki, token: str) -> None:
    assert_refused(stack.call(token, pki.alice), INACTIVE)


# -- 2. and 3. single flight across workers, then a warm cache ---------------------


def test_burst_then_warm_introspects_once(stack: Stack, idp: OidcProvider, pki: Pki) -> None:
    # Every worker up and past discovery before counting.
    for _ in range(2 * WORKERS):
        assert stack.call("warm-up", pki.alice).status_code == 401
    token = opaque(idp)
    idp.reset_stats()

    barrier = threading.Barrier(64)

    def one(_: int) -> int:
        barrier.wait(10)
        return stack.call(token, pki.alice).status_code

    with ThreadPoolExecutor(64) as pool:
        statuses = list(pool.map(one, range(64)))
    assert statuses == [200] * 64
    burst = introspections(idp)
    assert burst == 1, f"{burst} introspections for one token across {WORKERS} workers"

    # 1000 more within the TTL, over keep-alive connections: no further introspection.
    def run(n: int) -> list[int]:
        with session_for(stack, pki.alice) as session:
            return [get(session, stack, token).status_code for _ in range(n)]

    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        warm = [s for chunk in pool.map(run, [250] * 4) for s in chunk]
    assert warm == [200] * 1000
    assert time.monotonic() - started < 60
    assert introspections(idp) == 1, "a warm token was introspected again"


# -- 4. a stolen token right after its owner -----------------------------------------


def test_stolen_token_right_after_owner(stack: Stack, idp: OidcProvider, pki: Pki) -> None:
    token = opaque(idp)
    with session_for(stack, pki.alice) as alice, session_for(stack, pki.mallory) as mallory:
        for _ in range(10):
            assert get(alice, stack, token).status_code == 200
            assert_refused(get(mallory, stack, token), THUMBPRINT_MISMATCH)


# -- 5. revocation takes effect within cache_ttl_max ---------------------------------


def test_revoked_token_stops_after_cache_ttl_max(stacks: StackFactory, idp: OidcProvider, pki: Pki,
                                                 redis_server: RedisServer) -> None:
    short = stacks(idp, "gunicorn", workers=WORKERS,
                   **options(redis_server, cache_ttl_max="2", cache_secret="short-ttl-secret-0123456789"))
    token = opaque(idp)
    assert short.call(token, pki.alice).status_code == 200
    # The answer was cached before this response came back: it goes stale by first + 2.
    first = time.monotonic()
    for _ in range(WORKERS):
        assert short.call(token, pki.alice).status_code == 200
    idp.revoke(token)
    assert idp.introspect(token)["active"] is False
    if time.monotonic() - first < 1.5:
        # Still cached: allowed, and bounded by cache_ttl_max.
        assert short.call(token, pki.alice).status_code == 200
    time.sleep(max(0.0, first + 2.5 - time.monotonic()))
    for _ in range(2 * WORKERS):
        assert_refused(short.call(token, pki.alice), INACTIVE)


# -- 6. Redis dies under load ------------------------------------------------------


def test_redis_killed_under_load(stack: Stack, idp: OidcProvider, pki: Pki, redis_server: RedisServer) -> None:
    token = opaque(idp)
    assert stack.call(token, pki.alice).status_code == 200
    log_before = app_log(stack).count("Redis unavailable")
    results: list[tuple[str, int, str]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def load(who: str, cert: object) -> None:
        try:
            with session_for(stack, cert) as session:
                while not stop.is_set():
                    response = get(session, stack, token)
                    results.append((who, response.status_code, response.text))
                    time.sleep(0.005)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=load, args=("alice", pki.alice)),
               threading.Thread(target=load, args=("mallory", pki.mallory))]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        redis_server.kill()
        killed_at = len(results)
        time.sleep(1.5)
        redis_server.start()
        restarted_at = len(results)
        time.sleep(1.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        if redis_server.process is None:
            redis_server.start()
    assert not errors, errors
    assert restarted_at - killed_at >= 10, "too few requests while Redis was down"
    server_errors = [r for r in results if r[1] >= 500]
    assert not server_errors, server_errors[:3]
    wrong = [r for r in results if r[1] != {"alice": 200, "mallory": 401}[r[0]]]
    assert not wrong, wrong[:3]
    assert all(THUMBPRINT_MISMATCH in text for who, _, text in results if who == "mallory")
    assert sum(1 for who, *_ in results if who == "alice") >= 20
    assert sum(1 for who, *_ in results if who == "mallory") >= 20
    # The workers noticed (one line per breaker opening, not one per request).
    assert wait_until(lambda: app_log(stack).count("Redis unavailable") > log_before, timeout=5)
    assert app_log(stack).count("Redis unavailable") - log_before < len(results) // 4

    # Redis is used again after its restart, without restarting the workers.
    fresh = opaque(idp)
    key = key_of(idp, fresh).encode()

    def populated() -> bool:
        assert stack.call(fresh, pki.alice).status_code == 200
        return key in redis_dump(redis_server)

    assert wait_until(populated, timeout=6, interval=0.2), "Redis was not used again after its restart"
    dump = assert_no_token_in_redis(redis_server, token, fresh)
    assert dump and all(k.startswith(f"certbound:{namespace(SECRET_A)}:intro:".encode()) for k in dump)


# -- 7. a tampered Redis entry never makes a stolen token work -------------------------


def _flip(blob: bytes) -> bytes:
    middle = len(blob) // 2
    return blob[:middle] + bytes([blob[middle] ^ 0x01]) + blob[middle + 1:]


@pytest.mark.parametrize("attack", ["bitflip", "transplant", "plaintext"])
def test_tampered_redis_entry(stack: Stack, idp: OidcProvider, pki: Pki, redis_server: RedisServer,
                              attack: str) -> None:
    alice_token, mallory_token = opaque(idp, "bound"), opaque(idp, "bound2")
    assert stack.call(alice_token, pki.alice).status_code == 200
    assert stack.call(mallory_token, pki.mallory).status_code == 200
    alice_key, mallory_key = key_of(idp, alice_token), key_of(idp, mallory_token)
    client = redis_server.client()
    try:
        sealed = client.get(alice_key)
        assert sealed is not None, "the owner's request did not reach Redis"
        if attack == "bitflip":
            forged = _flip(sealed)
        elif attack == "transplant":
            theirs = client.get(mallory_key)
            assert theirs is not None
            forged = theirs
        else:
            now = time.time()
            claims = {"active": True, "iss": idp.issuer, "aud": OPAQUE_RESOURCE, "sub": "bound2",
                      "client_id": "bound2", "exp": int(now) + 600, "cnf": {"x5t#S256": x5t_s256(pki.mallory)}}
            forged = json.dumps({"a": True, "f": now + 600, "s": now + 600, "c": claims},
                                separators=(",", ":")).encode()
        for cert in (pki.mallory, pki.alice):
            assert client.set(alice_key, forged, keepttl=True)
            wait_l1_out()
            idp.reset_stats()
            response = stack.call(alice_token, cert)
            if cert is pki.mallory:
                assert_refused(response, THUMBPRINT_MISMATCH)
            else:  # the owner is not locked out by a tampered entry
                assert response.status_code == 200, response.text
            # The forged entry was a miss: the worker asked the IdP and wrote a good entry back.
            assert introspections(idp) == 1
            assert client.get(alice_key) != forged
    finally:
        client.close()
    assert "failed authentication" in app_log(stack)
    for _ in range(WORKERS):
        assert stack.call(alice_token, pki.alice).status_code == 200
        assert_refused(stack.call(alice_token, pki.mallory), THUMBPRINT_MISMATCH)


# -- 8. instances with different secrets do not share entries ---------------------------


def test_different_secrets_do_not_share(stack: Stack, stacks: StackFactory, idp: OidcProvider, pki: Pki,
                                        redis_server: RedisServer) -> None:
    other = stacks(idp, "gunicorn", workers=WORKERS, **options(redis_server, cache_secret=SECRET_B))
    ns_a, ns_b = namespace(SECRET_A), namespace(SECRET_B)
    assert ns_a != ns_b
    token = opaque(idp)
    assert stack.call(token, pki.alice).status_code == 200
    key_a = key_of(idp, token, SECRET_A).encode()
    key_b = key_of(idp, token, SECRET_B).encode()
    assert key_a.startswith(f"certbound:{ns_a}:intro:".encode())
    assert key_b.startswith(f"certbound:{ns_b}:intro:".encode())
    dump = redis_dump(redis_server)
    assert key_a in dump and key_b not in dump

    idp.reset_stats()
    assert other.call(token, pki.alice).status_code == 200
    assert introspections(idp) == 1, "B used A's entry"
    dump = assert_no_token_in_redis(redis_server, token)
    assert key_b in dump and key_a in dump
    assert [k for k in dump if k.startswith(f"certbound:{ns_b}:".encode())] == [key_b]

    # A's sealed entry copied under B's key is foreign to B: a miss, and a stolen token stays refused.
    client = redis_server.client()
    try:
        assert client.set(key_b, dump[key_a], keepttl=True)  # type: ignore[arg-type]
        wait_l1_out()
        idp.reset_stats()
        assert_refused(other.call(token, pki.mallory), THUMBPRINT_MISMATCH)
        assert introspections(idp) == 1
        assert client.get(key_b) != dump[key_a]
    finally:
        client.close()
    assert other.call(token, pki.alice).status_code == 200
    assert stack.call(token, pki.alice).status_code == 200
