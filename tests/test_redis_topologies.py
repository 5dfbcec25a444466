"""The shared (L2) cache behind Redis Sentinel and Redis Cluster, with real servers.

Sentinel: a redis-server master and one sentinel (``redis-server --sentinel``)
monitoring it; ``redis_sentinel_master`` + ``redis_sentinel_nodes`` must reach
the master through the sentinel. Cluster: three masters without replicas joined
by ``redis-cli --cluster create``; ``redis_cluster=true`` with one node's URL
must follow the slots to every node. For each: ``make_client`` works, a sealed
:class:`RedisCache` round trip and its single-flight lock work, and a second
middleware instance gets an L2 hit for what the first one introspected (the
binding still checked on that hit). Introspection is a fake client here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from redis.cluster import RedisCluster
from redis.sentinel import SentinelConnectionPool
from werkzeug.test import Client

from certbound_wsgi.cache import Entry
from certbound_wsgi.cache.redis import RedisCache, make_client
from certbound_wsgi.cache.seal import Sealer
from certbound_wsgi.dev.echo import echo_app
from certbound_wsgi.dev.pki import Issued
from certbound_wsgi.middleware import CertBoundMiddleware
from certbound_wsgi.settings import Settings
from certbound_wsgi.stats import Stats
from tests.conftest import TEST_PROXY_SECRET, ViaProxy
from tests.support.redis_server import RedisClusterNodes, RedisSentinel, RedisServer

ISSUER = "https://issuer.test"
AUDIENCE = "https://api.test"
SECRET = "topology-cache-secret-0123456789"
MASTER = "certbound-master"


class FakeClient:
    """Stands in for IntrospectionClient: every token is active and bound to ``x5t``; calls are counted."""

    def __init__(self, x5t: str) -> None:
        self.x5t = x5t
        self.calls = 0
        self._lock = threading.Lock()

    def introspect(self, token: str) -> dict[str, Any]:
        with self._lock:
            self.calls += 1
        return {"active": True, "iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "exp": int(time.time()) + 300,
                "cnf": {"x5t#S256": self.x5t}, "token_type": "Bearer"}


def settings(**redis: Any) -> Settings:
    return Settings(
        issuer=ISSUER,
        audience=(AUDIENCE,),
        auth_methods=("introspection",),
        client_id="rs",
        client_secret="rs-secret-0123456789abcdef",
        introspection_endpoint=ISSUER + "/introspect",
        cache_secret=SECRET,
        proxy_secret=TEST_PROXY_SECRET,
        # Generous: a loaded machine must not trip the breaker (which would rightly mean one more introspection).
        redis_timeout=1.0,
        **redis,
    )


def worker(config: Settings, x5t: str) -> tuple[Client, CertBoundMiddleware, FakeClient]:
    """One middleware instance (one worker process, in production) with a fake introspection client."""
    middleware = CertBoundMiddleware(echo_app, config)
    fake = FakeClient(x5t)
    assert middleware.introspection is not None
    middleware.introspection._client = fake  # type: ignore[assignment]
    return Client(ViaProxy(middleware)), middleware, fake


def get(client: Client, token: str, cert: Issued) -> Any:
    return client.get("/", headers={"Authorization": f"Bearer {token}"},
                      environ_overrides={"SSL_CLIENT_CERT": cert.cert_pem})


def round_trip(config: Settings) -> None:
    """A sealed set/get, a foreign entry refused, and the single-flight lock, through ``make_client``."""
    cache = RedisCache(make_client(config), Sealer(SECRET, "intro"), Stats())
    entry = Entry(True, time.time() + 60, time.time() + 60, {"sub": "alice", "aud": AUDIENCE})
    keys = [Sealer(SECRET, "intro").key_name(ISSUER, f"token-{i}") for i in range(20)]
    for key in keys:
        cache.set(key, entry)
    for key in keys:
        assert cache.get(key) == entry
    # Another secret neither reads nor names the same entries.
    other = RedisCache(make_client(config), Sealer("another-secret-0123456789abcdef", "intro"), Stats())
    assert other.get(keys[0]) is None
    # The lock: one holder at a time, released by its holder only.
    token = cache.lock(keys[0])
    assert isinstance(token, str)
    assert cache.lock(keys[0]) is False
    cache.unlock(keys[0], "not-the-holder")
    assert cache.lock(keys[0]) is False
    cache.unlock(keys[0], token)
    second = cache.lock(keys[0])
    assert isinstance(second, str)
    cache.unlock(keys[0], second)
    assert cache.available


def l2_hit_across_workers(config: Settings, alice: Issued, mallory: Issued, alice_x5t: str, token: str) -> None:
    client_a, worker_a, fake_a = worker(config, alice_x5t)
    client_b, worker_b, fake_b = worker(config, alice_x5t)

    response = get(client_a, token, alice)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert fake_a.calls == 1
    assert worker_a.stats()["l2_misses"] == 1

    response = get(client_b, token, alice)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["claims"]["sub"] == "alice"
    assert fake_b.calls == 0, "B asked the issuer instead of using A's entry"
    assert worker_b.stats()["l2_hits"] == 1

    # A third worker, and the token used with another certificate: the L2 hit is still checked.
    client_c, worker_c, fake_c = worker(config, alice_x5t)
    assert get(client_c, token, mallory).status_code == 401
    assert fake_c.calls == 0
    assert worker_c.stats()["l2_hits"] == 1
    for instance in (worker_a, worker_b, worker_c):
        assert instance.stats()["redis_errors"] == 0


# -- Redis Sentinel ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, RedisSentinel]]:
    directory = tmp_path_factory.mktemp("sentinel")
    master = RedisServer(directory / "master")
    try:
        watcher = RedisSentinel(directory / "sentinel", MASTER, master.port)
        try:
            yield master, watcher
        finally:
            watcher.stop()
    finally:
        master.stop()


def sentinel_settings(watcher: RedisSentinel, master: str = MASTER) -> Settings:
    return settings(redis_sentinel_master=master, redis_sentinel_nodes=(watcher.node,))


def test_sentinel_make_client_reaches_the_master(sentinel: tuple[RedisServer, RedisSentinel]) -> None:
    master, watcher = sentinel
    client = make_client(sentinel_settings(watcher))
    assert isinstance(client.connection_pool, SentinelConnectionPool)
    assert client.ping() is True
    client.set("through-sentinel", b"yes", px=60_000)
    # It was written on the master the sentinel named.
    assert master.client().get("through-sentinel") == b"yes"
    assert client.connection_pool.get_master_address() == ("127.0.0.1", master.port)  # type: ignore[no-untyped-call]


def test_sentinel_node_forms(sentinel: tuple[RedisServer, RedisSentinel]) -> None:
    """``host:port`` as in the environment (comma separated, spaces around)."""
    _master, watcher = sentinel
    config = Settings.from_env({
        "CERTBOUND_ISSUER": ISSUER, "CERTBOUND_AUDIENCE": AUDIENCE, "CERTBOUND_AUTH_METHODS": "introspection",
        "CERTBOUND_CLIENT_ID": "rs", "CERTBOUND_CLIENT_SECRET": "rs-secret-0123456789abcdef",
        "CERTBOUND_REDIS_SENTINEL_MASTER": MASTER,
        "CERTBOUND_REDIS_SENTINEL_NODES": f" {watcher.node} , 127.0.0.1:1 ",
        "CERTBOUND_CACHE_SECRET": SECRET,
    })
    assert config.redis_sentinel_nodes == (watcher.node, "127.0.0.1:1")
    assert make_client(config).ping() is True


def test_sentinel_cache_round_trip(sentinel: tuple[RedisServer, RedisSentinel]) -> None:
    master, watcher = sentinel
    round_trip(sentinel_settings(watcher))
    # What is on the master is sealed: no claim is readable there.
    raw = master.client()
    values = [raw.get(key) for key in raw.scan_iter(count=1000) if not key.endswith(b":lock")]
    assert values and all(b"alice" not in value for value in values if value)


def test_sentinel_l2_hit_across_workers(sentinel: tuple[RedisServer, RedisSentinel], alice: Issued,
                                       mallory: Issued, alice_x5t: str) -> None:
    _master, watcher = sentinel
    l2_hit_across_workers(sentinel_settings(watcher), alice, mallory, alice_x5t, "opaque-token-via-sentinel")


def test_sentinel_unknown_master_is_skipped(sentinel: tuple[RedisServer, RedisSentinel], alice: Issued,
                                           alice_x5t: str) -> None:
    """A service name the sentinel does not know: no cache, but requests still pass (and are introspected)."""
    _master, watcher = sentinel
    client, middleware, fake = worker(sentinel_settings(watcher, "no-such-master"), alice_x5t)
    assert get(client, "opaque-token-unknown-master", alice).status_code == 200
    assert fake.calls == 1
    assert middleware.stats()["redis_errors"] >= 1


# -- Redis Cluster ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterNodes]:
    nodes = RedisClusterNodes(tmp_path_factory.mktemp("cluster"))
    try:
        yield nodes
    finally:
        nodes.stop()


def test_cluster_make_client(cluster: RedisClusterNodes) -> None:
    client = make_client(settings(redis_url=cluster.url, redis_cluster=True))
    assert isinstance(client, RedisCluster)
    assert len(client.get_primaries()) == 3  # type: ignore[no-untyped-call]
    assert client.ping() is True


def test_cluster_cache_round_trip(cluster: RedisClusterNodes) -> None:
    round_trip(settings(redis_url=cluster.url, redis_cluster=True))
    # The 20 entries were spread over the nodes by slot, and each is on the node owning it.
    holding = [server for server in cluster.servers if server.client().dbsize() > 0]
    assert len(holding) >= 2


def test_cluster_l2_hit_across_workers(cluster: RedisClusterNodes, alice: Issued, mallory: Issued,
                                       alice_x5t: str) -> None:
    config = settings(redis_url=cluster.url, redis_cluster=True)
    # Several tokens, so that their keys land on different nodes (MOVED redirections followed).
    for index in range(3):
        l2_hit_across_workers(config, alice, mallory, alice_x5t, f"opaque-token-via-cluster-{index}")


def test_cluster_seed_may_be_any_node(cluster: RedisClusterNodes) -> None:
    """Each node's URL works as ``redis_url``: the client learns the whole cluster from it."""
    key = Sealer(SECRET, "intro").key_name(ISSUER, "seeded")
    entry = Entry(True, time.time() + 60, time.time() + 60, {"sub": "alice"})
    RedisCache(make_client(settings(redis_url=cluster.servers[0].url, redis_cluster=True)),
               Sealer(SECRET, "intro"), Stats()).set(key, entry)
    for server in cluster.servers:
        cache = RedisCache(make_client(settings(redis_url=server.url, redis_cluster=True)), Sealer(SECRET, "intro"),
                           Stats())
        assert cache.get(key) == entry
