"""The soak run (``bench/soak.py``) for 60 seconds: mixed traffic, faults on a schedule.

Real servers of its own (oidc-provider, redis-server, gunicorn with 4 workers behind
nginx with mutual TLS), so that stopping its IdP or killing its Redis disturbs no other
module. 90% legit traffic, 10% stolen or forged; meanwhile a gunicorn worker is
SIGKILLed, Redis is killed and restarted and made to stall, the IdP is stopped and
started again, and nginx is reloaded. See :mod:`bench.soak` for what each figure means.

The second test pins down, deterministically, a stall that the soak's Redis fault can
only hit by chance: a Redis stall during an introspection leaves the single-flight lock
behind, and the next refresh of that token on every other worker waits for it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from bench.soak import render_markdown, run_soak
from certbound_wsgi.dev.echo import echo_app
from certbound_wsgi.middleware import CertBoundMiddleware
from certbound_wsgi.settings import Settings
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.slow

SECONDS = 60.0
#: Far below what this stack serves even on a loaded 2-core machine (hundreds per second).
MIN_REQUESTS = 1000


def test_soak(tmp_path: Path) -> None:
    report = run_soak(SECONDS, directory=tmp_path / "servers", out=tmp_path)
    summary = render_markdown(report)
    print(summary)  # shown with -s, or when the test fails
    print(f"servers' logs and soak.json: {tmp_path}")

    assert report["total_requests"] > MIN_REQUESTS, summary
    faults = report["faults"]
    assert {f["name"] for f in faults} == {"worker_kill", "redis_kill", "redis_sleep", "idp_stop", "nginx_reload"}, \
        summary
    assert not [f for f in faults if f["error"]], summary

    # A stolen or forged request is never accepted, whatever is broken at the time.
    attack = report["attack"]
    assert attack["total"] > MIN_REQUESTS * 0.05, summary
    assert attack["accepted"] == 0, json.dumps(attack["accepted_examples"])
    # No 5xx but the documented 503 (Retry-After) while the IdP is down.
    assert report["five_xx"]["outside_503_windows"] == 0, json.dumps(report["five_xx"]["outside_examples"])
    # The IdP outage is longer than cache_ttl_max, so the documented 503 did happen.
    assert report["five_xx"]["documented_503"] > 0, summary

    legit = report["legit"]
    assert legit["wrong_identity"] == 0, summary
    outside = legit["outside_windows"]
    assert outside["total"] > MIN_REQUESTS * 0.3, summary
    assert outside["ok"] >= 0.99 * outside["total"], summary
    # Every fault recovered: the last seconds of the run are all successes.
    final = legit["final_seconds"]
    assert final["total"] > 0 and final["ok"] == final["total"], summary
    # A dropped connection was retried once, and the retry was answered.
    assert report["connection_errors"]["unrecovered"] == 0, summary


class _Introspection:
    """Stands in for the issuer's introspection endpoint; ``during`` runs while the call is in flight."""

    def __init__(self, during: Any = None) -> None:
        self.during = during
        self.calls = 0

    def introspect(self, token: str) -> dict[str, Any]:
        self.calls += 1
        if self.during is not None:
            self.during()
        return {"active": True, "aud": "https://opaque.test", "exp": int(time.time()) + 300, "token_type": "Bearer"}


def test_redis_stall_during_an_introspection_does_not_stall_other_workers(tmp_path: Path) -> None:
    redis_server = RedisServer(tmp_path / "redis")
    admin = redis_server.client()
    try:
        settings = Settings(issuer="https://127.0.0.1:9", audience=("https://opaque.test",),
                            auth_methods=("introspection",), client_id="rs-client",
                            client_secret="rs-client-secret-0123456789abcdef", redis_url=redis_server.url,
                            cache_ttl_max=1, http_timeout=2.0, trusted_proxies=("unix",))
        worker_a = CertBoundMiddleware(echo_app, settings)
        worker_b = CertBoundMiddleware(echo_app, settings)
        # Redis stalls for 0.5 s (CLIENT PAUSE: as DEBUG SLEEP, but it has begun when the command returns)
        # while worker A, holding the lock, asks the issuer: A's SET of the answer times out.
        stall = _Introspection(lambda: admin.execute_command("CLIENT", "PAUSE", "500", "ALL"))
        worker_a.introspection._client = stall  # type: ignore[union-attr,assignment]
        worker_b.introspection._client = stand_in = _Introspection()  # type: ignore[union-attr,assignment]
        assert worker_a.introspection.validate("opaque-token")["active"] is True  # type: ignore[union-attr]
        assert worker_a.stats()["redis_errors"] >= 1, "the stall did not reach worker A"
        time.sleep(1.2)  # the stall is long over, and A's answer (cache_ttl_max=1) is stale everywhere

        started = time.monotonic()
        assert worker_b.introspection.validate("opaque-token")["active"] is True  # type: ignore[union-attr]
        took = time.monotonic() - started
        leftover = list(admin.scan_iter(match="certbound:*:lock"))
        assert took < 1.0, (f"worker B waited {took:.2f}s for a lock nobody holds (left behind: {leftover}, "
                            f"B's issuer calls: {stand_in.calls})")
    finally:
        admin.close()
        redis_server.stop()
