"""Prometheus metrics, when ``prometheus_client`` is installed (the ``prometheus`` extra).

Without it every function here does nothing, cheaply: the request path never
pays for metrics nobody collects. The instruments live in ``prometheus_client``'s
default registry, created on first use in each process.

Under gunicorn or uWSGI each worker is a process with its own counters; set
``PROMETHEUS_MULTIPROC_DIR`` to an empty directory before the server starts and
``prometheus_client`` keeps them in files there, which :func:`metrics_app` sums
on every scrape, whichever worker answers it. See docs/operations.md.
"""

from __future__ import annotations

import atexit
import collections
import functools
import importlib
import math
import os
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Any, Final, NamedTuple

from .types import StartResponse, WSGIEnvironment
from .workers import threads_run

__all__ = [
    "cache_lookup",
    "child_exit",
    "decision",
    "dpop_replay",
    "enabled",
    "flush",
    "introspection",
    "key_fetch",
    "metrics_app",
    "recorder",
    "request",
    "stat",
]

# Seconds: the middleware's own work is a dict lookup on the warm path and one
# round trip to the issuer or Redis on a miss.
LATENCY_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _Instruments(NamedTuple):
    requests: Any
    latency: Any
    unavailable: Any
    key_fetches: Any
    keys_fetched_at: Any
    introspections: Any
    cache: Any
    dpop_replays: Any
    redis_errors: Any
    resurrected: Any


def _client() -> Any | None:
    try:
        return importlib.import_module("prometheus_client")
    except ImportError:
        return None


_made: list[_Instruments | None] = []  # empty until the first call; then the one result
_making = threading.Lock()


def _instruments() -> _Instruments | None:
    """The process's instruments, made once: registering a metric twice raises, so the first
    call from two threads at once (gthread workers, the key-refresh thread) must not make two."""
    if _made:
        return _made[0]
    with _making:
        if not _made:
            _made.append(_make_instruments())
    return _made[0]


def _make_instruments() -> _Instruments | None:
    prometheus = _client()
    if prometheus is None:
        return None
    counter, histogram, gauge = prometheus.Counter, prometheus.Histogram, prometheus.Gauge
    # Ahead of the instruments, so that a collection adds the batched decisions before it reads them.
    prometheus.REGISTRY.register(_FlushFirst())
    return _Instruments(
        requests=counter("certbound_requests", "Access decisions, by outcome and reason code",
                         ["outcome", "reason"]),
        latency=histogram("certbound_request_duration_seconds",
                          "Time the middleware spent deciding (the application's time excluded)",
                          ["outcome"], buckets=LATENCY_BUCKETS),
        unavailable=counter("certbound_unavailable", "Requests answered 503 (issuer or Redis down)", ["reason"]),
        key_fetches=counter("certbound_key_fetches", "Fetches of the issuer's metadata and JWKS", ["result"]),
        # The oldest keys any live worker uses: alert on time() - this.
        keys_fetched_at=gauge("certbound_keys_fetched_timestamp_seconds",
                              "When this worker last fetched the issuer's keys (Unix time)",
                              multiprocess_mode="livemin"),
        introspections=counter("certbound_introspections", "RFC 7662 introspection calls", ["result"]),
        cache=counter("certbound_cache_lookups", "Introspection cache lookups", ["level", "result"]),
        dpop_replays=counter("certbound_dpop_replays", "DPoP proofs refused as replays (RFC 9449 section 11.1)"),
        redis_errors=counter("certbound_redis_errors", "Redis commands that failed"),
        resurrected=counter("certbound_resurrected",
                            "Expired introspection results served while the issuer was down"),
    )


def enabled() -> bool:
    """Whether ``prometheus_client`` is installed, so that metrics are collected."""
    return _instruments() is not None


def request(outcome: str, reason: str, seconds: float | None, status: int | None = None) -> None:
    """Count one access decision and how long the middleware took for it.

    :param outcome: ``accepted``, ``refused`` or ``fault`` (as in the audit event).
    :param reason: the audit reason code (:data:`certbound_wsgi.audit.REASONS`).
    :param seconds: the middleware's own time, from ``time.perf_counter()``; ``None`` when it is not
        known (a refusal by the application, such as ``require_scope``'s), which the histogram skips.
    :param status: the answer's status; a 503 is also counted in ``certbound_unavailable_total``.
    """
    m = _instruments()
    if m is None:
        return
    count, latency = _decision(m, outcome, reason)
    count.inc()
    if seconds is not None:
        latency.observe(seconds)
    if status == 503:
        m.unavailable.labels(reason).inc()
    if reason == "dpop_replay":
        m.dpop_replays.inc()


def decision(outcome: str, reason: str) -> tuple[Any, Any] | None:
    """The counter and latency histogram of one decision, found once (:func:`recorder` keeps them for
    the middleware's accepted path); ``None`` without ``prometheus_client``."""
    m = _instruments()
    return None if m is None else _decision(m, outcome, reason)


def recorder(outcome: str, reason: str) -> Callable[[float], None] | None:
    """Counts one decision and observes its seconds, for the middleware's accepted path, which runs it
    on every request; ``None`` without ``prometheus_client``.

    Where threads run, the decisions are kept in the worker and added to ``prometheus_client``'s
    values in batches (:class:`_Batch`): at most :data:`FLUSH_AFTER` seconds later, and before
    anything in this process reads them (a scrape, ``REGISTRY.get_sample_value``). A request then
    costs one append instead of three locked additions. Under uWSGI without threads each decision
    is added at once.
    """
    found = decision(outcome, reason)
    if found is None:
        return None
    values = _Values(*found)
    if not threads_run():
        return values.add_one
    batch = _batches.get((outcome, reason))
    if batch is None:
        with _making:
            batch = _batches.setdefault((outcome, reason), _Batch(values))
    return batch.record


#: Seconds at most between an accepted decision and its count in ``prometheus_client``'s values.
FLUSH_AFTER: Final = 1.0
#: Decisions kept at most before they are added at once, timer or not.
MAX_PENDING: Final = 4096


class _Values:
    """The values a decision's counter and latency histogram keep, added to directly.

    The same values :meth:`Counter.inc` and :meth:`Histogram.observe` update (in multiprocess mode
    too): those methods' checks (labels, exemplars) were settled when the children were made, and
    cost more than the additions. A ``prometheus_client`` whose instruments are laid out otherwise
    gets its public methods instead.
    """

    def __init__(self, count: Any, latency: Any) -> None:
        self._count, self._latency = count, latency
        try:
            self._add, self._add_seconds = count._value.inc, latency._sum.inc
            self._bucket_incs = tuple(bucket.inc for bucket in latency._buckets)
            self._bounds = tuple(latency._upper_bounds)
        except (AttributeError, TypeError):
            self._bucket_incs, self._bounds = (), ()
        self.direct = bool(self._bucket_incs) and len(self._bucket_incs) == len(self._bounds) and (
            self._bounds[-1] == math.inf)

    def add_one(self, seconds: float) -> None:
        """One decision that took ``seconds``."""
        if not self.direct:
            self._count.inc()
            self._latency.observe(seconds)
            return
        self._add(1)
        self._add_seconds(seconds)
        # The first bucket whose upper bound is at least the value, as Histogram.observe picks it.
        self._bucket_incs[bisect_left(self._bounds, seconds)](1)

    def add_all(self, seconds: list[float]) -> None:
        """Decisions that took these ``seconds``: one addition per value touched, not per decision."""
        if not seconds:
            return
        if not self.direct:
            for each in seconds:
                self.add_one(each)
            return
        bounds = self._bounds
        per_bucket = [0] * len(bounds)
        for each in seconds:
            per_bucket[bisect_left(bounds, each)] += 1
        self._add(len(seconds))
        self._add_seconds(math.fsum(seconds))
        for index, count in enumerate(per_bucket):
            if count:
                self._bucket_incs[index](count)


class _Batch:
    """Decisions kept in the worker until they are added to ``prometheus_client``'s values.

    :meth:`record` appends to a deque (atomic, no lock) and, when no flush is due yet, schedules one
    :data:`FLUSH_AFTER` seconds later in a daemon timer thread. :meth:`flush` takes every pending
    decision out of the deque, so that two flushes (the timer's and a scrape's) never count one twice.
    """

    def __init__(self, values: _Values) -> None:
        self._values = values
        self._pending: collections.deque[float] = collections.deque()
        self._scheduled = False
        self._lock = threading.Lock()

    def record(self, seconds: float) -> None:
        pending = self._pending
        pending.append(seconds)
        if not self._scheduled:
            self._schedule()
        elif len(pending) >= MAX_PENDING:
            # Bounded whatever becomes of the timer (a server whose threads run late, or not at all).
            self.flush()

    def _schedule(self) -> None:
        with self._lock:
            if self._scheduled:
                return
            self._scheduled = True
        timer = threading.Timer(FLUSH_AFTER, self.flush)
        timer.daemon = True
        try:
            timer.start()
        except RuntimeError:  # the interpreter is shutting down: no more threads
            self.flush()

    def flush(self) -> None:
        """Add every pending decision to the values now."""
        # Cleared first: a decision recorded from here on schedules the next flush itself.
        self._scheduled = False
        taken: list[float] = []
        pending = self._pending
        while True:
            try:
                taken.append(pending.popleft())
            except IndexError:
                break
        self._values.add_all(taken)

    def forget(self) -> None:
        """In a forked child: the parent's decisions are the parent's, and its timer is not here."""
        self._pending.clear()
        self._scheduled = False


_batches: dict[tuple[str, str], _Batch] = {}


def flush() -> None:
    """Add the decisions this process keeps in batches to ``prometheus_client``'s values now
    (a scrape and the default registry's readers do this themselves)."""
    for batch in list(_batches.values()):
        batch.flush()


class _FlushFirst:
    """Registered in the default registry ahead of the instruments: every collection (a scrape,
    ``get_sample_value``) first adds what the batches keep, so that what is read is exact."""

    def collect(self) -> Iterable[Any]:
        flush()
        return ()


def _after_fork_in_child() -> None:
    for batch in _batches.values():
        batch.forget()


if hasattr(os, "register_at_fork"):  # POSIX; elsewhere there is no fork to survive
    os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(flush)  # a worker that exits cleanly leaves nothing uncounted


@functools.cache
def _decision(m: _Instruments, outcome: str, reason: str) -> tuple[Any, Any]:
    """The labelled children for one decision, found once: ``labels()`` takes a lock and a lookup
    on every call, which is most of the cost of counting on the warm path. Bounded: three
    outcomes times the reason codes."""
    return m.requests.labels(outcome, reason), m.latency.labels(outcome)


def key_fetch(ok: bool, fetched_at: float | None = None) -> None:
    """Count a fetch of the issuer's keys; on success, remember when (default: now)."""
    m = _instruments()
    if m is None:
        return
    m.key_fetches.labels("ok" if ok else "error").inc()
    if ok:
        m.keys_fetched_at.set(time.time() if fetched_at is None else fetched_at)


def introspection(result: str) -> None:
    """Count an introspection call: ``ok`` or ``error``."""
    m = _instruments()
    if m is not None:
        m.introspections.labels(result).inc()


def cache_lookup(level: str, hit: bool, amount: int = 1) -> None:
    """Count a cache lookup at ``level`` (``l1`` in process, ``l2`` in Redis)."""
    m = _instruments()
    if m is not None:
        m.cache.labels(level, "hit" if hit else "miss").inc(amount)


def dpop_replay() -> None:
    """Count a replayed DPoP proof (when it is not counted through :func:`request`)."""
    m = _instruments()
    if m is not None:
        m.dpop_replays.inc()


def stat(name: str, amount: int = 1) -> None:
    """The Prometheus side of :class:`certbound_wsgi.stats.Stats`: one of its counter names."""
    m = _instruments()
    if m is None:
        return
    if name in ("l1_hits", "l1_misses", "l2_hits", "l2_misses"):
        level, _, result = name.partition("_")
        m.cache.labels(level, "hit" if result == "hits" else "miss").inc(amount)
    elif name == "introspections":
        m.introspections.labels("ok").inc(amount)
    elif name == "idp_errors":
        m.introspections.labels("error").inc(amount)
    elif name == "redis_errors":
        m.redis_errors.inc(amount)
    elif name == "resurrected":
        m.resurrected.inc(amount)


def _exposition() -> tuple[bytes, str]:
    prometheus = _client()
    if prometheus is None:
        return b"# prometheus_client is not installed: pip install 'certbound-wsgi[prometheus]'\n", "text/plain"
    # Registered on first use: a scrape before the first request still lists every family.
    _instruments()
    flush()  # this worker's batched decisions; the others' reach their files within FLUSH_AFTER
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Every worker's files, summed: the answer does not depend on which worker scrapes.
        multiprocess = importlib.import_module("prometheus_client.multiprocess")
        registry = prometheus.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = prometheus.REGISTRY
    return prometheus.generate_latest(registry), prometheus.CONTENT_TYPE_LATEST


def metrics_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """A WSGI app answering ``GET /metrics`` in Prometheus' text format.

    Mount it beside the protected app, on a path or port only the scraper reaches (see
    docs/operations.md); it is not protected by the middleware itself. Answers 404 when
    ``prometheus_client`` is not installed, so a scraper notices.
    """
    if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
        start_response("405 Method Not Allowed", [("Allow", "GET, HEAD"), ("Content-Length", "0")])
        return [b""]
    body, content_type = _exposition()
    status = "200 OK" if _client() is not None else "404 Not Found"
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body))),
                            ("Cache-Control", "no-store")])
    return [b""] if environ.get("REQUEST_METHOD") == "HEAD" else [body]


def child_exit(server: Any, worker: Any) -> None:
    """A gunicorn ``child_exit`` hook: forget a dead worker's live gauges.

    In ``gunicorn.conf.py``: ``from certbound_wsgi.metrics import child_exit``.
    """
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR") or _client() is None:
        return
    multiprocess = importlib.import_module("prometheus_client.multiprocess")
    multiprocess.mark_process_dead(worker.pid)
