"""Readiness: 200 when tokens can be validated, 503 with Retry-After when not, in JSON."""

from __future__ import annotations

import json

import pytest
from werkzeug.test import Client

from certbound_wsgi.health import Readiness, live

UP, DOWN = (lambda: True), (lambda: False)


def boom() -> bool:
    raise OSError("connection refused")


@pytest.mark.parametrize(("checks", "status", "states"), [
    pytest.param({"keys_loaded": UP, "issuer_reachable": UP}, 200,
                 {"keys": "ok", "issuer": "ok", "redis": "off"}, id="no-redis"),
    pytest.param({"keys_loaded": None, "issuer_reachable": UP, "redis": UP}, 200,
                 {"keys": "off", "issuer": "ok", "redis": "ok"}, id="introspection-only"),
    pytest.param({"keys_loaded": DOWN, "issuer_reachable": UP}, 503,
                 {"keys": "down", "issuer": "ok", "redis": "off"}, id="no-keys"),
    pytest.param({"keys_loaded": UP, "issuer_reachable": boom}, 503,
                 {"keys": "ok", "issuer": "down", "redis": "off"}, id="issuer-raises"),
    pytest.param({"keys_loaded": UP, "issuer_reachable": UP, "redis": DOWN}, 503,
                 {"keys": "ok", "issuer": "ok", "redis": "down"}, id="redis-required"),
    pytest.param({"keys_loaded": UP, "issuer_reachable": UP, "redis": DOWN, "redis_required": False}, 200,
                 {"keys": "ok", "issuer": "ok", "redis": "down"}, id="redis-optional"),
])
def test_readiness(checks: dict[str, object], status: int, states: dict[str, str]) -> None:
    response = Client(Readiness(**checks)).get("/readyz")  # type: ignore[arg-type]
    assert response.status_code == status
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["Cache-Control"] == "no-store"
    assert json.loads(response.get_data()) == {"status": "ready" if status == 200 else "unavailable",
                                               "checks": states}
    assert ("Retry-After" in response.headers) is (status == 503)


def test_results_are_reused_for_cache_seconds() -> None:
    calls = []
    now = [0.0]

    def issuer() -> bool:
        calls.append(now[0])
        return True

    readiness = Readiness(keys_loaded=UP, issuer_reachable=issuer, cache_seconds=2, clock=lambda: now[0])
    client = Client(readiness)
    for t in (0.0, 1.0, 1.9, 2.0, 3.0):
        now[0] = t
        assert client.get("/readyz").status_code == 200
    assert calls == [0.0, 2.0]


def test_methods() -> None:
    client = Client(Readiness(keys_loaded=UP, issuer_reachable=UP))
    assert client.head("/readyz").get_data() == b""
    assert client.post("/readyz").status_code == 405
    response = Client(live).get("/healthz")
    assert response.status_code == 200 and response.json == {"status": "ok"}
