"""The DPoP replay store under memory pressure (issue 11 item 6), through nginx and gunicorn/uWSGI.

RFC 9449 section 11.1: a proof's ``jti`` must be remembered for the proof's
lifetime. A Redis that evicts (``allkeys-*``, and ``volatile-*``: every key here
has a TTL) forgets it as soon as other writes need the room, and the replayed
proof passes. So the app refuses to start on an evicting store, warns when it
cannot tell, and on the documented ``noeviction`` store a full Redis means 503
with ``Retry-After`` (a server fault), never 200 and never a forgotten proof.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support.dpop import DPoPKey
from tests.support.idp import OidcProvider, decode_jwt
from tests.support.procs import wait_until
from tests.support.redis_server import RedisServer
from tests.support.servers import start_gunicorn, start_uwsgi

from .conftest import Stack, StackFactory, app_env

SECRET = "dpop-e2e-secret-0123456789abcdef"
P = "the DPoP proof's "
REPLAYED = "the DPoP proof has already been used"
UNAVAILABLE = "DPoP replay protection is unavailable; try again shortly"


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RedisServer]]:
    """An evicting cache (as caches are run), a noeviction replay store with little memory, and one whose
    CONFIG command is disabled (as managed Redis services do)."""
    made = {
        "cache": RedisServer(tmp_path_factory.mktemp("cache"), "--maxmemory", "1mb", "--maxmemory-policy",
                             "allkeys-lru"),
        "replay": RedisServer(tmp_path_factory.mktemp("replay"), "--maxmemory", "4mb", "--maxmemory-policy",
                              "noeviction"),
        "no-config": RedisServer(tmp_path_factory.mktemp("no-config"), "--rename-command", "CONFIG", ""),
    }
    try:
        yield made
    finally:
        for server in made.values():
            server.stop()


def options(**extra: str) -> dict[str, str]:
    return {"proof_of_possession_dpop": "optional", "proof_of_possession_mtls": "optional", "cache_secret": SECRET,
            "public_base_url": "{nginx_url}", "redis_timeout": "0.5", **extra}


@pytest.fixture(scope="module")
def key() -> DPoPKey:
    return DPoPKey()


@pytest.fixture(scope="module")
def token(idp: OidcProvider, key: DPoPKey) -> str:
    token = idp.token("unbound", dpop=key.proof("POST", idp.token_endpoint))
    assert decode_jwt(token)[1]["cnf"] == {"jkt": key.jkt}
    return token


@pytest.fixture(scope="module")
def stack(stacks: StackFactory, idp: OidcProvider, servers: dict[str, RedisServer]) -> Stack:
    """The documented layout: the cache in the evicting Redis, the proofs in their own noeviction Redis."""
    return stacks(idp, "gunicorn", workers=2,
                  **options(redis_url=servers["cache"].url, dpop_replay_redis_url=servers["replay"].url))


def call(stack: Stack, token: str, proof: str) -> requests.Response:
    with requests.Session() as session:
        session.trust_env = False
        return session.get(stack.nginx.url + "/anything", headers={"Authorization": f"DPoP {token}", "DPoP": proof},
                           verify=stack.ca_file, timeout=15)


def assert_status(response: requests.Response, status: int, description: str | None = None) -> None:
    assert response.status_code == status, response.text
    if description is not None:
        assert response.json()["error_description"] == description
    if status == 503:
        assert response.json() == {"error": "temporarily_unavailable", "error_description": UNAVAILABLE}
        assert response.headers["Retry-After"] == "2"


# -- start-up ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("upstream", ["gunicorn", "uwsgi"])
@pytest.mark.parametrize("option", ["redis_url", "dpop_replay_redis_url"])
def test_an_evicting_replay_store_stops_the_app_at_start_up(upstream: str, option: str, idp: OidcProvider,
                                                            servers: dict[str, RedisServer],
                                                            tmp_path: Path) -> None:
    env = app_env(idp, **{**options(), "public_base_url": "https://api.example.com", option: servers["cache"].url})
    expected = ("dpop_replay_redis_url: the DPoP replay store's Redis has maxmemory-policy allkeys-lru, which evicts "
                "remembered proofs so that a replay passes")
    if upstream == "uwsgi":
        with pytest.raises((RuntimeError, TimeoutError)) as raised:
            start_uwsgi(env, processes=1, log_dir=tmp_path).stop()
        assert expected in str(raised.value)
        return
    server = start_gunicorn(env, workers=1, log_dir=tmp_path)
    try:
        # gunicorn binds, then its worker cannot import the app: it stops ("Worker failed to boot").
        assert wait_until(lambda: not server.process.alive(), timeout=30), server.output()
        assert expected in server.output()
    finally:
        server.stop()


def test_an_unverifiable_replay_store_is_warned_about_and_used(stacks: StackFactory, idp: OidcProvider,
                                                               servers: dict[str, RedisServer], key: DPoPKey,
                                                               token: str) -> None:
    stack = stacks(idp, "gunicorn", workers=2, **options(redis_url=servers["no-config"].url))
    proof = key.proof("GET", stack.nginx.url + "/anything", token)
    assert_status(call(stack, token, proof), 200)
    assert_status(call(stack, token, proof), 401, REPLAYED)
    assert "cannot verify the DPoP replay store's maxmemory-policy" in stack.app_server.output()


# -- under memory pressure --------------------------------------------------------------------------------------


def test_replayed_proof_stays_refused_after_many_writes(stack: Stack, idp: OidcProvider, key: DPoPKey, token: str,
                                                        servers: dict[str, RedisServer]) -> None:
    url = stack.nginx.url + "/anything"
    alices = key.proof("GET", url, token)
    assert_status(call(stack, token, alices), 200)
    # The attacker's own DPoP-bound token and key: every fresh proof is a write to the replay store.
    attacker = DPoPKey()
    attackers_token = idp.token("unbound", dpop=attacker.proof("POST", idp.token_endpoint))
    for _ in range(200):
        assert_status(call(stack, attackers_token, attacker.proof("GET", url, attackers_token)), 200)
    # And the writes that fill Redis to its limit (the cache Redis beside it evicts as it should).
    written = servers["replay"].fill()
    assert written > 300
    response = call(stack, token, alices)
    assert response.status_code in (401, 503), response.text  # refused, whether or not Redis takes the write
    if response.status_code == 401:
        assert_status(response, 401, REPLAYED)
    admin = servers["replay"].client()
    try:
        # Pinned full: every write is refused now. A fresh proof cannot be remembered: 503, not 200.
        admin.config_set("maxmemory", 1)
        assert_status(call(stack, token, key.proof("GET", url, token)), 503)
        assert_status(call(stack, token, alices), 503)
        admin.config_set("maxmemory", "4mb")
        admin.delete(*[f"junk:{i}" for i in range(written)])
        # Nothing was evicted: every proof accepted is still there.
        assert admin.dbsize() == 201
    finally:
        admin.close()
    time.sleep(1.2)  # the breaker

    def recovered() -> bool:
        return call(stack, token, key.proof("GET", url, token)).status_code == 200

    assert wait_until(recovered, timeout=10, interval=0.3)
    assert_status(call(stack, token, alices), 401, REPLAYED)


def test_replay_store_down_is_503_and_the_cache_keeps_working(stack: Stack, idp: OidcProvider, key: DPoPKey,
                                                              token: str, servers: dict[str, RedisServer]) -> None:
    url = stack.nginx.url + "/anything"
    proof = key.proof("GET", url, token)
    servers["replay"].kill()
    try:
        for _ in range(4):
            assert_status(call(stack, token, key.proof("GET", url, token)), 503)
        # A bearer request needs no replay store: unaffected.
        unbound = idp.token("unbound")
        with requests.Session() as session:
            session.trust_env = False
            response = session.get(url, headers={"Authorization": f"Bearer {unbound}"}, verify=stack.ca_file,
                                   timeout=15)
        assert response.status_code == 200, response.text
    finally:
        servers["replay"].start()
    time.sleep(1.2)  # the breaker

    def recovered() -> bool:
        return call(stack, token, key.proof("GET", url, token)).status_code == 200

    assert wait_until(recovered, timeout=10, interval=0.3)
    assert_status(call(stack, token, proof), 200)  # refused with 503 before: not used up
    assert_status(call(stack, token, proof), 401, REPLAYED)
