"""Counters: cache hits and misses, introspection calls, issuer and Redis errors.

Readable in process with :meth:`Stats.snapshot` (``middleware.stats()``) and,
when ``prometheus_client`` is installed, exported as Prometheus counters.
"""

from __future__ import annotations

import importlib
import threading
from typing import Any

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


def _prometheus_counters() -> dict[str, Any]:
    try:
        prometheus = importlib.import_module("prometheus_client")
    except ImportError:
        return {}
    counters: dict[str, Any] = {}
    for name in COUNTERS:
        try:
            counters[name] = prometheus.Counter(f"certbound_{name}", f"certbound-wsgi: {name.replace('_', ' ')}")
        except ValueError:  # already registered by another middleware instance in this process
            counters[name] = prometheus.REGISTRY._names_to_collectors.get(f"certbound_{name}")
    return {k: v for k, v in counters.items() if v is not None}


class Stats:
    """Thread-safe counters for one middleware instance."""

    def __init__(self) -> None:
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._lock = threading.Lock()
        self._prometheus = _prometheus_counters()

    def incr(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[name] += amount
        counter = self._prometheus.get(name)
        if counter is not None:
            counter.inc(amount)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)
