"""Counters: cache hits and misses, introspection calls, issuer and Redis errors.

Readable in process with :meth:`Stats.snapshot` (``middleware.stats()``) and,
when ``prometheus_client`` is installed, exported through :mod:`certbound_wsgi.metrics`
(``certbound_cache_lookups_total{level,result}``, ``certbound_introspections_total``, ...).
"""

from __future__ import annotations

import threading

from . import metrics

__all__ = ["COUNTERS", "Stats"]

COUNTERS = (
    "l1_hits",
    "l1_misses",
    "l2_hits",
    "l2_misses",
    "introspections",
    "idp_errors",
    "redis_errors",
    "resurrected",
)


class Stats:
    """Thread-safe counters for one middleware instance."""

    def __init__(self) -> None:
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._lock = threading.Lock()

    def incr(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[name] += amount
        metrics.stat(name, amount)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)
