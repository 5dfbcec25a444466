"""Issuer keys as a shared, refreshed resource (issue 14), with real gunicorn workers, Redis and oidc-provider.

The module owns its IdPs (restarting them disturbs no other module) and its stacks:
three gunicorn workers sharing this module's redis-server. Periods are short so that
the tests are fast: ``rediscovery_lifetime=1`` and ``discovery_max_staleness=12``
(``rediscovery_lifetime=300`` where only an unknown kid may cause a refresh).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from joserfc.jwk import KeySet

from tests.support.idp import API_RESOURCE, OidcProvider, decode_jwt, x5t_s256
from tests.support.idp_fixtures import Pki
from tests.support.procs import wait_until
from tests.support.redis_server import RedisServer
from tests.support.servers import PROXY_SECRET, start_gunicorn, start_nginx

from .conftest import Stack, StackFactory, app_env, log_of, mint
from .test_issuer_faults import workers_of

WORKERS = 3
MAX_STALENESS = 12
SECRET = "issuer-keys-e2e-secret-0123456789"
API_B = "https://api-b.test"


def started_idp(pki: Pki, directory: Path) -> Iterator[OidcProvider]:
    """An IdP of this module's own (restarting it disturbs no other module), bound client: alice."""
    provider = OidcProvider(directory, ca=pki.ca, bound={"bound": pki.alice})
    provider.start()
    try:
        yield provider
    finally:
        provider.stop()


@pytest.fixture(scope="module")
def own_idp(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    yield from started_idp(pki, tmp_path_factory.mktemp("idp-keys"))


@pytest.fixture(scope="module")
def idp_b(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    """A second issuer."""
    yield from started_idp(pki, tmp_path_factory.mktemp("idp-b"))


def shared(redis_server: RedisServer, **extra: str) -> dict[str, str]:
    return {"redis_url": redis_server.url, "cache_secret": SECRET,
            "discovery_max_staleness": str(MAX_STALENESS), **extra}


@pytest.fixture()
def stack(stacks: StackFactory, own_idp: OidcProvider, redis_server: RedisServer) -> Stack:
    own_idp.start()
    return stacks(own_idp, "gunicorn", workers=WORKERS, **shared(redis_server))


@pytest.fixture()
def slow_stack(stacks: StackFactory, own_idp: OidcProvider, redis_server: RedisServer) -> Stack:
    """Keys refreshed every 300 s: only an unknown kid can make a worker ask sooner."""
    own_idp.start()
    return stacks(own_idp, "gunicorn", workers=WORKERS, **shared(redis_server, rediscovery_lifetime="300"))


def statuses(stack: Stack, token: str, pki: Pki, n: int = 3 * WORKERS) -> list[int]:
    """``n`` calls; with keep-alive off at nginx's upstream, they spread over the workers."""
    return [stack.call(token, pki.alice).status_code for _ in range(n)]


def hup(stack: Stack) -> None:
    """``kill -HUP`` gunicorn's master, and wait until every worker is a new one."""
    old = workers_of(stack)
    os.kill(stack.app_server.process.pid, signal.SIGHUP)
    assert wait_until(lambda: (now := workers_of(stack)).isdisjoint(old) and len(now) == WORKERS, timeout=20), \
        "gunicorn did not replace its workers"


def bound_token(provider: OidcProvider, pki: Pki, **kwargs: object) -> str:
    """A never-used token signed with one of the IdP's keys (default: the current one)."""
    return mint(provider, cnf={"x5t#S256": x5t_s256(pki.alice)}, **kwargs)  # type: ignore[arg-type]


# -- the IdP down, the workers restarted ---------------------------------------------------------------------------


def test_idp_down_and_hup_serve_from_the_shared_copy_then_fail_closed(
    stack: Stack, own_idp: OidcProvider, pki: Pki, record_property: Any
) -> None:
    known = own_idp.token("bound")
    assert statuses(stack, known, pki) == [200] * 9
    own_idp.stop()
    try:
        stopped = time.monotonic()
        hup(stack)
        # New workers, nothing in their memory, the IdP down: the keys come from Redis.
        assert statuses(stack, known, pki) == [200] * 9
        assert statuses(stack, bound_token(own_idp, pki), pki) == [200] * 9  # a key, not a remembered token
        # Past discovery_max_staleness every worker fails closed: 503 with Retry-After, never 401 or 200.
        seen: list[int] = []

        def closed() -> bool:
            round_ = statuses(stack, known, pki)
            seen.extend(round_)
            return round_ == [503] * 9

        assert wait_until(closed, timeout=MAX_STALENESS + 6, interval=0.3), seen[-9:]
        failed_after = time.monotonic() - stopped
        assert set(seen) <= {200, 503}, seen
        response = stack.call(known, pki.alice)
        assert response.status_code == 503
        assert int(response.headers["Retry-After"]) >= 1
        assert response.json()["error"] == "temporarily_unavailable"
        record_property("seconds_until_all_503", round(failed_after, 2))
        assert failed_after <= MAX_STALENESS + 4, failed_after
    finally:
        own_idp.start()
    assert wait_until(lambda: statuses(stack, known, pki) == [200] * 9, timeout=10), "did not recover"


# -- a key removed at the IdP --------------------------------------------------------------------------------------


def test_a_key_removed_at_the_idp_is_refused_by_every_worker_within_the_period(
    stack: Stack, own_idp: OidcProvider, pki: Pki, record_property: Any
) -> None:
    own_idp.restart(new_key=True, keep_old_key=True)
    old_key = KeySet.import_key_set(own_idp.private_jwks()).keys[1]
    used = bound_token(own_idp, pki, key=old_key)
    assert wait_until(lambda: statuses(stack, used, pki) == [200] * 9, timeout=5)  # every worker trusts the old key
    own_idp.withdraw_key(old_key.kid)
    back = time.monotonic()
    fresh = bound_token(own_idp, pki, key=old_key)
    results: list[tuple[float, int, int]] = []

    def refused() -> bool:
        round_ = statuses(stack, used, pki) + statuses(stack, fresh, pki)
        results.append((time.monotonic() - back, round_.count(200), round_.count(401)))
        return round_ == [401] * 18

    assert wait_until(refused, timeout=10, interval=0.05), results[-3:]
    took = results[-1][0]
    record_property("seconds_until_refused_everywhere", round(took, 2))
    # The documented bound: rediscovery_lifetime (1 s), plus the retry delay (2 s) after the
    # restart made the IdP unreachable for a moment, plus the time of one round of requests.
    assert took <= 1 + 2 + 1.5, results
    assert all(count == 18 for *_, count in results[-1:])
    # Tokens signed with the key that remains are still accepted.
    assert statuses(stack, own_idp.token("bound"), pki) == [200] * 9


# -- rotation ------------------------------------------------------------------------------------------------------


def test_an_abrupt_rotation_is_accepted_at_once_with_no_401(
    slow_stack: Stack, own_idp: OidcProvider, pki: Pki, record_property: Any
) -> None:
    old = own_idp.token("bound")
    assert statuses(slow_stack, old, pki) == [200] * 9
    own_idp.restart(new_key=True)  # the old key is gone, a new one signs
    own_idp.reset_stats()
    new = own_idp.token("bound")
    assert decode_jwt(new)[0]["kid"] != decode_jwt(old)[0]["kid"]
    started = time.monotonic()
    assert statuses(slow_stack, new, pki) == [200] * 9
    took = time.monotonic() - started
    record_property("seconds_for_9_calls_with_the_new_kid", round(took, 2))
    assert took < 1.5, took
    # One worker asked the IdP; the others took its answer from Redis.
    assert own_idp.stats()["jwks"] == 1


# -- several issuers -----------------------------------------------------------------------------------------------


@pytest.fixture()
def two_issuers(stacks: StackFactory, own_idp: OidcProvider, idp_b: OidcProvider, redis_server: RedisServer) -> Stack:
    own_idp.start()
    return stacks(own_idp, "gunicorn", workers=WORKERS, issuers_allowed=idp_b.issuer,
                  issuer_audiences=f"{idp_b.issuer}={API_B}", **shared(redis_server))


def test_two_issuers_each_with_their_own_keys(two_issuers: Stack, own_idp: OidcProvider, idp_b: OidcProvider,
                                             pki: Pki) -> None:
    assert statuses(two_issuers, own_idp.token("bound"), pki) == [200] * 9
    token_b = idp_b.token("bound", resource=API_B)
    assert statuses(two_issuers, token_b, pki) == [200] * 9
    response = two_issuers.call(token_b, pki.alice)
    assert response.json()["claims"]["iss"] == idp_b.issuer


def key_of(provider: OidcProvider) -> object:
    return KeySet.import_key_set(provider.private_jwks()).keys[0]


@pytest.mark.parametrize(
    ("forge", "description"),
    [
        pytest.param(lambda a, b, cnf: mint(a, key=key_of(b), cnf=cnf),
                     "the token is signed with an unknown key", id="claims-a-signed-by-b"),
        pytest.param(lambda a, b, cnf: mint(b, key=key_of(a), aud=API_B, cnf=cnf),
                     "the token is signed with an unknown key", id="claims-b-signed-by-a"),
        pytest.param(lambda a, b, cnf: mint(b, header={"kid": a.kid}, aud=API_B, cnf=cnf),
                     "the token is signed with an unknown key", id="claims-b-signed-by-b-naming-a-kid"),
        pytest.param(lambda a, b, cnf: mint(b, cnf=cnf), "the token is not meant for this audience",
                     id="b-with-a-audience"),
        pytest.param(lambda a, b, cnf: mint(a, iss="https://127.0.0.1:1", cnf=cnf),
                     "the token was issued by another issuer", id="issuer-not-allowed"),
    ],
)
def test_cross_issuer_key_confusion_is_refused(
    forge: Any, description: str, two_issuers: Stack, own_idp: OidcProvider, idp_b: OidcProvider, pki: Pki
) -> None:
    token = forge(own_idp, idp_b, {"x5t#S256": x5t_s256(pki.alice)})
    responses = [two_issuers.call(token, pki.alice) for _ in range(WORKERS)]
    assert [r.status_code for r in responses] == [401] * WORKERS
    assert {r.json()["error_description"] for r in responses} == {description}


# -- check-config -----------------------------------------------------------------------------------------------------


def test_check_config_reports_the_keys_per_issuer_and_their_ages(
    two_issuers: Stack, own_idp: OidcProvider, idp_b: OidcProvider, redis_server: RedisServer, pki: Pki
) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("CERTBOUND_")}
    env.update({f"CERTBOUND_{name.upper()}": value for name, value in {
        "issuer": own_idp.issuer, "audience": API_RESOURCE, "ca_file": own_idp.ca_file,
        "issuers_allowed": idp_b.issuer, "issuer_audiences": f"{idp_b.issuer}={API_B}",
        "proof_of_possession_mtls": "optional", "proxy_secret": PROXY_SECRET, **shared(redis_server),
    }.items()})
    time.sleep(1.1)  # the stack shared its copy at least a second ago: the ages count from then

    def check_config() -> subprocess.CompletedProcess[str]:
        return subprocess.run([os.path.join(os.path.dirname(sys.executable), "certbound-wsgi"), "check-config"],
                              env=env, capture_output=True, text=True, timeout=60, check=False)

    done = check_config()
    assert done.returncode == 0, done.stderr
    for provider in (own_idp, idp_b):
        assert f"issuer metadata: {provider.issuer} (jwks_uri {provider.jwks_uri})" in done.stdout
        for kid in (key["kid"] for key in provider.jwks()["keys"]):
            match = re.search(re.escape(kid) + r" \(age (\d+)s\)", done.stdout)
            assert match is not None, done.stdout
            assert int(match.group(1)) >= 1  # from the shared copy, not from this run's fetch
    idp_b.stop()
    try:
        down = check_config()
    finally:
        idp_b.start()
    assert down.returncode == 1
    assert f"discovery failed: {idp_b.issuer}:" in down.stderr
    assert f"issuer metadata: {own_idp.issuer}" in down.stdout


# -- gunicorn --preload ------------------------------------------------------------------------------------------------


@pytest.fixture()
def preloaded(own_idp: OidcProvider, redis_server: RedisServer, pki: Pki,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The app built once in gunicorn's master (which fetches the keys), then forked into the workers."""
    own_idp.start()
    env = app_env(own_idp, **shared(redis_server, rediscovery_lifetime="300"))
    env["GUNICORN_CMD_ARGS"] = "--preload"
    server = start_gunicorn(env, workers=WORKERS, log_dir=tmp_path_factory.mktemp("gunicorn-preload"))
    try:
        nginx = start_nginx(tmp_path_factory.mktemp("nginx-preload"), "gunicorn", server.backend, pki.server,
                            proxy_secret=PROXY_SECRET)
    except BaseException:
        server.stop()
        raise
    try:
        yield Stack(nginx, server, pki.ca_file)
    finally:
        nginx.stop()
        server.stop()


def test_preloaded_workers_fetch_with_their_own_connections(preloaded: Stack, own_idp: OidcProvider,
                                                            pki: Pki) -> None:
    assert statuses(preloaded, own_idp.token("bound"), pki) == [200] * 9
    own_idp.restart(new_key=True)
    new = own_idp.token("bound")
    # Each worker meets the new kid and asks the IdP (or takes the shared copy) over its own pool:
    # none reuses a kept-alive socket of the master's, which the restart closed anyway.
    results: list[int] = []

    def one() -> None:
        results.append(preloaded.call(new, pki.alice).status_code)

    threads = [threading.Thread(target=one) for _ in range(3 * WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == [200] * 9
    assert "Traceback" not in log_of(preloaded.app_server.process.log)
