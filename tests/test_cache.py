"""The introspection caches: sealing, entries, the in-process LRU, and Redis with its breaker.

The Redis tests run a real ``redis-server`` (skipped on a developer's machine
without one, a failure in CI).
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from certbound_wsgi.cache import Entry
from certbound_wsgi.cache.memory import MemoryCache, MemoryStore, TTLCache
from certbound_wsgi.cache.redis import BREAKER_SECONDS, OPENED_SIZE, RedisCache, make_client
from certbound_wsgi.cache.seal import Sealer
from certbound_wsgi.settings import Settings
from certbound_wsgi.stats import Stats
from tests.support.procs import free_port
from tests.support.redis_server import RedisServer

SECRET = "a-cache-secret-0123456789abcdef"
OTHER = "another-secret-0123456789abcdef"
ENDPOINT = "https://issuer.test/introspect"
TOKEN = "opaque-token-SECRET-VALUE-0123456789"
KEY_RE = re.compile(r"^certbound:[0-9a-f]{16}:intro:[0-9a-f]{64}$")


def entry(fresh: float = 1030.0, stale: float | None = None, **claims: object) -> Entry:
    return Entry(True, fresh, fresh if stale is None else stale, {"active": True, "sub": "alice", **claims})


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- Sealer ---------------------------------------------------------------------


def test_seal_roundtrip() -> None:
    sealer = Sealer(SECRET, "intro")
    name = sealer.key_name(ENDPOINT, TOKEN)
    blob = sealer.seal(name, b"plaintext claims")
    assert b"plaintext" not in blob
    assert sealer.open(name, blob) == b"plaintext claims"
    # Another instance with the same secret (another worker, another host) opens it too.
    assert Sealer(SECRET, "intro").open(name, blob) == b"plaintext claims"
    # A fresh nonce each time.
    assert sealer.seal(name, b"plaintext claims") != blob


@pytest.mark.parametrize("position", [0, 11, 12, 20, -17, -1], ids=["nonce0", "nonce11", "ct0", "ct8", "tag0", "tag15"])
def test_tampered_blob_does_not_open(position: int) -> None:
    sealer = Sealer(SECRET, "intro")
    name = sealer.key_name(ENDPOINT, TOKEN)
    blob = bytearray(sealer.seal(name, b'{"a":true,"c":{"sub":"alice"}}'))
    blob[position] ^= 0x01
    assert sealer.open(name, bytes(blob)) is None


@pytest.mark.parametrize("blob", [b"", b"x" * 27, b"\x00" * 28, b'{"a":true,"f":1e12,"s":1e12,"c":{}}'],
                         ids=["empty", "short", "zeros", "plaintext-entry"])
def test_foreign_blob_does_not_open(blob: bytes) -> None:
    sealer = Sealer(SECRET, "intro")
    assert sealer.open(sealer.key_name(ENDPOINT, TOKEN), blob) is None


def test_truncated_or_extended_blob_does_not_open() -> None:
    sealer = Sealer(SECRET, "intro")
    name = sealer.key_name(ENDPOINT, TOKEN)
    blob = sealer.seal(name, b"claims")
    assert sealer.open(name, blob[:-1]) is None
    assert sealer.open(name, blob + b"\x00") is None


def test_wrong_key_name_does_not_open() -> None:
    """The key name is the associated data: an entry moved to another token's key is a miss."""
    sealer = Sealer(SECRET, "intro")
    alice, mallory = sealer.key_name(ENDPOINT, "alice-token"), sealer.key_name(ENDPOINT, "mallory-token")
    blob = sealer.seal(mallory, b"mallory's claims")
    assert sealer.open(mallory, blob) == b"mallory's claims"
    assert sealer.open(alice, blob) is None
    assert sealer.open(mallory + "x", blob) is None


def test_different_secret_or_purpose_does_not_open() -> None:
    sealer = Sealer(SECRET, "intro")
    name = sealer.key_name(ENDPOINT, TOKEN)
    blob = sealer.seal(name, b"claims")
    assert Sealer(OTHER, "intro").open(name, blob) is None
    assert Sealer(SECRET, "session").open(name, blob) is None
    assert Sealer(None, "intro").open(name, blob) is None


def test_key_names_are_hmacs_without_the_token() -> None:
    sealer = Sealer(SECRET, "intro")
    name = sealer.key_name(ENDPOINT, TOKEN)
    assert KEY_RE.match(name), name
    assert name.startswith(f"certbound:{sealer.namespace}:intro:")
    assert TOKEN not in name and "SECRET-VALUE" not in name and ENDPOINT not in name
    # Deterministic per secret, distinct per token, per endpoint and per secret.
    assert Sealer(SECRET, "intro").key_name(ENDPOINT, TOKEN) == name
    assert sealer.key_name(ENDPOINT, TOKEN + "x") != name
    assert sealer.key_name("https://other.test/introspect", TOKEN) != name
    assert Sealer(OTHER, "intro").key_name(ENDPOINT, TOKEN).split(":")[-1] != name.split(":")[-1]
    # The parts are separated: ("a", "bc") and ("ab", "c") differ.
    assert sealer.key_name("a", "bc") != sealer.key_name("ab", "c")


def test_namespaces_differ_per_secret() -> None:
    a, b = Sealer(SECRET, "intro"), Sealer(OTHER, "intro")
    assert re.fullmatch(r"[0-9a-f]{16}", a.namespace)
    assert a.namespace == Sealer(SECRET, "intro").namespace
    assert a.namespace != b.namespace
    assert a.key_name(ENDPOINT, TOKEN).split(":")[1] != b.key_name(ENDPOINT, TOKEN).split(":")[1]
    # Without a secret, each process gets its own random namespace.
    assert Sealer(None, "intro").namespace != Sealer(None, "intro").namespace
    assert SECRET not in a.namespace


# -- Entry ------------------------------------------------------------------------


def test_entry_roundtrip() -> None:
    original = entry(1030.5, 1090.25, cnf={"x5t#S256": "abc"}, aud=["x", "y"])
    assert Entry.from_bytes(original.to_bytes()) == original
    negative = Entry(False, 1010.0, 1010.0)
    assert Entry.from_bytes(negative.to_bytes()) == negative


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"\xff\xfe",
        b"null",
        b"[]",
        b"42",
        b'"string"',
        b'{"a": true}',
        b'{"a": true, "f": 1, "s": 2}',
        b'{"a": true, "f": "soon", "s": 2, "c": {}}',
        b'{"a": true, "f": 1, "s": 2, "c": 5}',
        b'{"a": true, "f": null, "s": 2, "c": {}}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"c":' * 100_000 + b"1" + b"}" * 100_000,
    ],
    ids=["empty", "text", "bad-utf8", "null", "list", "number", "string", "only-a", "no-claims", "bad-fresh",
         "claims-not-dict", "null-fresh", "deep-list", "deep-dict"],
)
def test_entry_from_garbage_is_none(data: bytes) -> None:
    assert Entry.from_bytes(data) is None


# -- TTLCache and MemoryStore: the one bounded in-process store ----------------------


def test_ttl_cache_add_is_first_writer_wins_until_the_deadline() -> None:
    clock = Clock(0.0)
    cache: TTLCache[str] = TTLCache(10, clock)
    assert cache.add("k", "first", 10.0) is True
    assert cache.add("k", "second", 20.0) is False
    assert cache.get("k") == "first"
    clock.now = 10.0
    assert cache.get("k") is None
    assert cache.add("k", "third", 20.0) is True
    assert cache.get("k") == "third"


def test_ttl_cache_add_is_atomic_across_threads() -> None:
    cache: TTLCache[int] = TTLCache(1000, time.time)
    wins: list[int] = []
    barrier = threading.Barrier(8)

    def race(n: int) -> None:
        barrier.wait()
        if cache.add("jti", n, time.time() + 60):
            wins.append(n)

    threads = [threading.Thread(target=race, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert cache.get("jti") == wins[0]


def test_memory_store_is_bounded_and_expires() -> None:
    clock = Clock(0.0)
    store = MemoryStore(2, clock)
    store.store("a", b"1", 10)
    store.store("b", b"2", 100)
    assert store.fetch("a") == b"1"  # a is now the most recently used
    store.store("c", b"3", 100)
    assert store.fetch("b") is None  # the least recently used made room
    assert (store.fetch("a"), store.fetch("c")) == (b"1", b"3")
    clock.now = 10.0
    assert store.fetch("a") is None
    store.delete("c")
    assert store.fetch("c") is None


# -- MemoryCache --------------------------------------------------------------------


def test_memory_cache_is_a_bounded_lru() -> None:
    clock = Clock()
    cache = MemoryCache(3, clock=clock)
    for key in "abc":
        cache.set(key, entry())
    assert cache.get("a") is not None  # a is now the most recently used
    cache.set("d", entry())
    assert len(cache) == 3
    assert cache.get("b") is None
    assert [k for k in "acd" if cache.get(k) is not None] == ["a", "c", "d"]
    for i in range(100):
        cache.set(f"k{i}", entry())
    assert len(cache) == 3
    # Replacing a key does not grow the cache.
    cache.set("k99", entry(1040.0))
    assert len(cache) == 3
    assert cache.get("k99") == entry(1040.0)


def test_memory_cache_expires_entries() -> None:
    clock = Clock(1000.0)
    cache = MemoryCache(10, clock=clock)
    cache.set("k", entry(fresh=1010.0, stale=1020.0))
    assert cache.get("k") is not None
    clock.now = 1015.0  # stale but still resurrectable: kept
    assert cache.get("k") == entry(fresh=1010.0, stale=1020.0)
    clock.now = 1020.0
    assert cache.get("k") is None
    assert len(cache) == 0


def test_memory_cache_never_stores_past_stale_until() -> None:
    clock = Clock(1000.0)
    cache = MemoryCache(10, clock=clock)
    cache.set("dead", entry(fresh=990.0, stale=999.0))
    assert cache.get("dead") is None


def test_memory_cache_max_age() -> None:
    clock = Clock(1000.0)
    cache = MemoryCache(10, max_age=5, clock=clock)
    cache.set("long", entry(fresh=1300.0))
    cache.set("short", entry(fresh=1002.0))
    clock.now = 1002.0
    assert cache.get("short") is None  # its own stale_until comes first
    assert cache.get("long") is not None
    clock.now = 1004.9
    assert cache.get("long") is not None
    clock.now = 1005.0
    assert cache.get("long") is None  # max_age: L2 must be asked again
    # Setting again restarts the max_age window.
    cache.set("long", entry(fresh=1300.0))
    clock.now = 1009.9
    assert cache.get("long") is not None


def test_memory_cache_is_thread_safe() -> None:
    cache = MemoryCache(50)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(2000):
                key = f"{n}-{i % 80}"
                cache.set(key, entry(fresh=time.time() + 60))
                cache.get(f"{(n + 1) % 8}-{i % 80}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(cache) == 50


# -- RedisCache ---------------------------------------------------------------------


def settings_for(url: str, timeout: float = 0.05) -> Settings:
    return Settings(issuer="https://issuer.test", audience=["https://api.test"], redis_url=url,
                    cache_secret=SECRET, redis_timeout=timeout)


@pytest.fixture()
def sealer() -> Sealer:
    return Sealer(SECRET, "intro")


def make_cache(url: str, sealer: Sealer, clock: Clock | None = None, timeout: float = 0.05,
               lock_ttl: float = 10.0) -> tuple[RedisCache, Stats]:
    stats = Stats()
    client = make_client(settings_for(url, timeout))
    cache = RedisCache(client, sealer, stats, lock_ttl=lock_ttl, **({"clock": clock} if clock else {}))
    return cache, stats


def test_redis_get_set_with_ttl(redis_server: RedisServer, sealer: Sealer) -> None:
    clock = Clock(1000.0)
    cache, stats = make_cache(redis_server.url, sealer, clock)
    key = sealer.key_name(ENDPOINT, "get-set-token")
    assert cache.get(key) is None
    stored = entry(fresh=1010.0, stale=1030.0, cnf={"x5t#S256": "alice-thumb"})
    cache.set(key, stored)
    assert cache.get(key) == stored
    raw = redis_server.client()
    try:
        pttl = raw.pttl(key)
        assert 29_000 <= pttl <= 30_000, pttl  # stale_until - now, in ms
        blob = raw.get(key)
        assert blob is not None
        assert b"alice-thumb" not in blob and b"get-set-token" not in blob
        assert sealer.open(key, blob) == stored.to_bytes()
    finally:
        raw.close()
    assert stats.snapshot()["redis_errors"] == 0


def test_redis_set_skips_dead_entries(redis_server: RedisServer, sealer: Sealer) -> None:
    clock = Clock(1000.0)
    cache, _ = make_cache(redis_server.url, sealer, clock)
    key = sealer.key_name(ENDPOINT, "dead-token")
    cache.set(key, entry(fresh=1000.0, stale=1000.0))
    cache.set(key, entry(fresh=990.0, stale=999.0))
    raw = redis_server.client()
    try:
        assert raw.exists(key) == 0
    finally:
        raw.close()


def test_redis_get_ignores_foreign_entries(redis_server: RedisServer, sealer: Sealer,
                                           caplog: pytest.LogCaptureFixture) -> None:
    cache, stats = make_cache(redis_server.url, sealer)
    key = sealer.key_name(ENDPOINT, "foreign-token")
    other_key = sealer.key_name(ENDPOINT, "other-token")
    raw = redis_server.client()
    try:
        caplog.set_level(logging.WARNING, logger="certbound_wsgi")
        raw.set(key, json.dumps({"a": True, "f": 1e12, "s": 1e12, "c": {"sub": "mallory"}}))
        assert cache.get(key) is None
        raw.set(key, Sealer(OTHER, "intro").seal(key, entry().to_bytes()))
        assert cache.get(key) is None
        raw.set(key, sealer.seal(other_key, entry().to_bytes()))  # transplanted
        assert cache.get(key) is None
        raw.set(key, sealer.seal(key, b"sealed but not an entry"))
        assert cache.get(key) is None
        raw.set(key, sealer.seal(key, entry().to_bytes()))
        assert cache.get(key) == entry()
    finally:
        raw.close()
    assert sum("failed authentication" in r.getMessage() for r in caplog.records) == 3
    assert stats.snapshot()["redis_errors"] == 0
    assert cache.available


def test_redis_entries_opened_before_stay_bound_to_their_key(redis_server: RedisServer, sealer: Sealer) -> None:
    """An entry read again unchanged is not opened again, yet its bytes open nowhere else, and a new
    answer at its key (a revocation written by another worker) is read at once."""
    cache, _ = make_cache(redis_server.url, sealer, Clock(1000.0))
    key = sealer.key_name(ENDPOINT, "opened-token")
    other_key = sealer.key_name(ENDPOINT, "opened-other-token")
    cache.set(key, entry(cnf={"x5t#S256": "alice-thumb"}))
    first = cache.get(key)
    assert first is not None and first.claims["cnf"] == {"x5t#S256": "alice-thumb"}
    assert cache.get(key) is first  # the same sealed bytes: the same entry, not opened again
    raw = redis_server.client()
    try:
        raw.set(other_key, raw.get(key))  # moved, byte for byte
        assert cache.get(other_key) is None
        raw.set(key, sealer.seal(key, Entry(False, 1e12, 1e12).to_bytes()))
        revoked = cache.get(key)
        assert revoked is not None and revoked.active is False
    finally:
        raw.close()


def test_redis_entries_opened_are_bounded(redis_server: RedisServer, sealer: Sealer) -> None:
    cache, _ = make_cache(redis_server.url, sealer, Clock(1000.0))
    for n in range(OPENED_SIZE + 10):
        key = sealer.key_name(ENDPOINT, f"bounded-{n}")
        cache.set(key, entry())
        assert cache.get(key) == entry()
    assert 0 < len(cache._opened) <= OPENED_SIZE


def test_redis_lock(redis_server: RedisServer, sealer: Sealer) -> None:
    first, _ = make_cache(redis_server.url, sealer, lock_ttl=10.0)
    second, _ = make_cache(redis_server.url, sealer)  # another worker
    key = sealer.key_name(ENDPOINT, "lock-token")
    token = first.lock(key)
    assert isinstance(token, str) and len(token) == 32
    assert first.lock(key) is False
    assert second.lock(key) is False
    raw = redis_server.client()
    try:
        assert 9_000 < raw.pttl(key + ":lock") <= 10_000
        # Only the holder can unlock.
        second.unlock(key, "0" * 32)
        assert raw.exists(key + ":lock") == 1
        assert second.lock(key) is False
        first.unlock(key, token)
        assert raw.exists(key + ":lock") == 0
        again = second.lock(key)
        assert isinstance(again, str) and again != token
        first.unlock(key, token)  # a stale holder cannot release the new holder's lock
        assert raw.exists(key + ":lock") == 1
        second.unlock(key, again)
        assert raw.exists(key + ":lock") == 0
        # The lock is not the entry: the entry key is untouched.
        assert raw.exists(key) == 0
    finally:
        raw.close()


def test_redis_lock_expires(redis_server: RedisServer, sealer: Sealer) -> None:
    cache, _ = make_cache(redis_server.url, sealer, lock_ttl=0.2)
    key = sealer.key_name(ENDPOINT, "expiring-lock-token")
    assert isinstance(cache.lock(key), str)
    assert cache.lock(key) is False
    time.sleep(0.3)
    assert isinstance(cache.lock(key), str)


def test_redis_lock_is_exclusive_across_threads(redis_server: RedisServer, sealer: Sealer) -> None:
    key = sealer.key_name(ENDPOINT, "contended-lock-token")
    caches = [make_cache(redis_server.url, sealer)[0] for _ in range(16)]
    barrier = threading.Barrier(16)
    results: list[object] = []

    def take(cache: RedisCache) -> None:
        barrier.wait(5)
        results.append(cache.lock(key))

    threads = [threading.Thread(target=take, args=(c,)) for c in caches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(isinstance(r, str) for r in results) == 1
    assert results.count(False) == 15


class _Silent:
    """A port that accepts connections (into the backlog) and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"redis://127.0.0.1:{self.sock.getsockname()[1]}/0"

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["closed-port", "silent-server"])
def dead_url(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "closed-port":
        yield f"redis://127.0.0.1:{free_port()}/0"
    else:
        silent = _Silent()
        try:
            yield silent.url
        finally:
            silent.close()


def test_breaker(dead_url: str, sealer: Sealer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="certbound_wsgi")
    timeout = 0.05
    cache, stats = make_cache(dead_url, sealer, timeout=timeout)
    key = sealer.key_name(ENDPOINT, "breaker-token")
    assert cache.available

    started = time.monotonic()
    assert cache.get(key) is None
    assert time.monotonic() - started < timeout + 0.4
    assert stats.snapshot()["redis_errors"] == 1
    assert not cache.available
    opened_at = time.monotonic()

    # While open, Redis is not touched at all: no waiting, no further errors, no further log lines.
    started = time.monotonic()
    for _ in range(20):
        assert cache.get(key) is None
        cache.set(key, entry(fresh=time.time() + 60))
        assert cache.lock(key) is None
        cache.unlock(key, "0" * 32)
    assert time.monotonic() - started < 0.2
    assert stats.snapshot()["redis_errors"] == 1
    warnings = [r for r in caplog.records if "Redis unavailable" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING

    # Closed again after about BREAKER_SECONDS.
    time.sleep(max(0.0, opened_at + BREAKER_SECONDS * 0.8 - time.monotonic()))
    assert not cache.available
    time.sleep(max(0.0, opened_at + BREAKER_SECONDS + 0.05 - time.monotonic()))
    assert cache.available
    # A new failure: a new opening, one more line.
    assert cache.lock(key) is None
    assert stats.snapshot()["redis_errors"] == 2
    assert not cache.available
    assert len([r for r in caplog.records if "Redis unavailable" in r.getMessage()]) == 2


def test_breaker_under_concurrency_logs_once(sealer: Sealer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="certbound_wsgi")
    cache, stats = make_cache(f"redis://127.0.0.1:{free_port()}/0", sealer)
    key = sealer.key_name(ENDPOINT, "concurrent-breaker-token")
    barrier = threading.Barrier(8)

    def hit() -> None:
        barrier.wait(5)
        for _ in range(50):
            assert cache.get(key) is None

    threads = [threading.Thread(target=hit) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    errors = stats.snapshot()["redis_errors"]
    assert 1 <= errors <= 8  # only the calls already in flight when it opened
    assert len([r for r in caplog.records if "Redis unavailable" in r.getMessage()]) == 1


def test_redis_restart_is_used_again(tmp_path_factory: pytest.TempPathFactory, sealer: Sealer,
                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="certbound_wsgi")
    server = RedisServer(tmp_path_factory.mktemp("redis-restart"))
    try:
        cache, stats = make_cache(server.url, sealer)
        key = sealer.key_name(ENDPOINT, "restart-token")
        stored = entry(fresh=time.time() + 60)
        cache.set(key, stored)
        assert cache.get(key) == stored
        server.kill()
        assert cache.get(key) is None
        assert stats.snapshot()["redis_errors"] == 1
        server.start()
        time.sleep(BREAKER_SECONDS + 0.05)
        assert cache.available
        assert cache.get(key) is None  # a restarted Redis without persistence is empty: a miss, not an error
        cache.set(key, stored)
        assert cache.get(key) == stored
        assert stats.snapshot()["redis_errors"] == 1
        assert cache.available
    finally:
        server.stop()


def test_slow_redis_opens_breaker_without_desync(redis_server: RedisServer, sealer: Sealer,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A Redis that stops answering (CLIENT PAUSE) costs one redis_timeout; the late answers are never
    read as answers to later commands."""
    caplog.set_level(logging.WARNING, logger="certbound_wsgi")
    cache, stats = make_cache(redis_server.url, sealer, timeout=0.05)
    key_a = sealer.key_name(ENDPOINT, "slow-a")
    key_b = sealer.key_name(ENDPOINT, "slow-b")
    a, b = entry(fresh=time.time() + 60, sub="a"), entry(fresh=time.time() + 60, sub="b")
    cache.set(key_a, a)
    cache.set(key_b, b)
    assert cache.get(key_a) == a
    raw = redis_server.client()
    try:
        raw.client_pause(400, all=True)  # the pausing client itself is not paused
        started = time.monotonic()
        assert cache.get(key_a) is None
        assert time.monotonic() - started < 0.3
        assert stats.snapshot()["redis_errors"] == 1
        time.sleep(BREAKER_SECONDS + 0.05)
        assert cache.available
        for _ in range(5):
            assert cache.get(key_b) == b
            assert cache.get(key_a) == a
            lock = cache.lock(key_b)
            assert isinstance(lock, str)
            assert cache.lock(key_b) is False
            cache.unlock(key_b, lock)
        assert stats.snapshot()["redis_errors"] == 1
    finally:
        raw.close()
