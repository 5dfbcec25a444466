"""Readiness for a load balancer: can this worker validate tokens right now?

:class:`Readiness` is a WSGI app. It answers ``200`` with
``{"status":"ready",...}`` when the issuer's keys are loaded, the issuer is
reachable and (when configured) Redis answers, and ``503`` with
``Retry-After`` and ``{"status":"unavailable",...}`` otherwise, naming each
check, so that HAProxy, nginx, Kubernetes or an AWS target group take the
worker out of rotation without parsing anything. It reads no settings: the
checks are injected callables, each of which must be quick and bounded (a
ping with a short timeout), and their results are reused for ``cache_seconds``
so that a fleet of probes cannot turn into a flood on the issuer.

A liveness probe needs none of this: :func:`live` answers 200 while the
process serves requests.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Final

from .types import StartResponse, WSGIEnvironment

__all__ = ["Readiness", "live"]

log = logging.getLogger("certbound_wsgi.health")

Check = Callable[[], bool]

_HEADERS: Final = [("Content-Type", "application/json"), ("Cache-Control", "no-store")]


def _respond(environ: WSGIEnvironment, start_response: StartResponse, status: str, payload: Mapping[str, object],
             extra: Iterable[tuple[str, str]] = ()) -> list[bytes]:
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    start_response(status, [*_HEADERS, ("Content-Length", str(len(body))), *extra])
    return [b""] if environ.get("REQUEST_METHOD") == "HEAD" else [body]


def live(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
    """Liveness: 200 ``{"status":"ok"}`` from any process that can run Python."""
    return _respond(environ, start_response, "200 OK", {"status": "ok"})


class Readiness:
    """A WSGI app reporting whether tokens can be validated.

    :param keys_loaded: the issuer's signing keys (JWKS) are in memory, e.g.
        ``lambda: discovery.keys_loaded()``; ``None`` when only introspection is used.
    :param issuer_reachable: the issuer answered recently (its metadata or a cheap request); ``None`` when
        there is no issuer to ask (introspection at a configured endpoint). Run before ``keys_loaded``,
        so that a first probe which fetches the keys also reports them loaded.
    :param redis: Redis answers a ``PING``; ``None`` when Redis is not configured (reported ``"off"``).
    :param redis_required: whether Redis being down makes the worker unready. True when sessions
        or DPoP replay protection live in Redis (requests would get 503 anyway); False when it
        is only the second-level introspection cache, which the middleware can do without.
    :param cache_seconds: how long a result is reused.
    :param retry_after: the ``Retry-After`` of a 503, in seconds.
    :param clock: monotonic seconds; injectable for tests.
    """

    def __init__(
        self,
        *,
        keys_loaded: Check | None,
        issuer_reachable: Check | None,
        redis: Check | None = None,
        redis_required: bool = True,
        cache_seconds: float = 2.0,
        retry_after: int = 5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._checks: dict[str, Check | None] = {"issuer": issuer_reachable, "keys": keys_loaded, "redis": redis}
        self._required = {"keys", "issuer"} | ({"redis"} if redis_required else set())
        self._cache_seconds = cache_seconds
        self._retry_after = max(1, retry_after)
        self._clock = clock
        # (expires, states): replaced whole, so readers never need a lock and no
        # check (which may do I/O) ever runs while one is held.
        self._last: tuple[float, dict[str, str]] = (float("-inf"), {})

    def states(self) -> dict[str, str]:
        """Each check's state: ``"ok"``, ``"down"`` or ``"off"`` (not configured)."""
        expires, states = self._last
        now = self._clock()
        if now < expires:
            return states
        states = {name: self._run(name, check) for name, check in self._checks.items()}
        self._last = (now + self._cache_seconds, states)
        return states

    @staticmethod
    def _run(name: str, check: Check | None) -> str:
        if check is None:
            return "off"
        try:
            return "ok" if check() else "down"
        except Exception:  # a failing probe means "not ready", never a 500 to the load balancer
            log.warning("certbound: readiness check %s failed", name, exc_info=True)
            return "down"

    def ready(self) -> bool:
        """Whether every required check is ``ok`` (or ``off``)."""
        states = self.states()
        return all(states[name] != "down" for name in self._required)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD"), ("Content-Length", "0")])
            return [b""]
        states = self.states()
        if all(states[name] != "down" for name in self._required):
            return _respond(environ, start_response, "200 OK", {"status": "ready", "checks": states})
        return _respond(environ, start_response, "503 Service Unavailable",
                        {"status": "unavailable", "checks": states}, [("Retry-After", str(self._retry_after))])
