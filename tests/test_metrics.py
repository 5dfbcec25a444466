"""Metrics: counted when prometheus_client is installed, nothing (and no error) when it is not."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from werkzeug.test import Client

from certbound_wsgi import metrics
from certbound_wsgi.stats import Stats


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_request_counts_outcome_reason_latency_and_503() -> None:
    before = (sample("certbound_requests_total", outcome="fault", reason="store_unavailable"),
              sample("certbound_request_duration_seconds_count", outcome="fault"),
              sample("certbound_unavailable_total", reason="store_unavailable"))
    metrics.request("fault", "store_unavailable", 0.002, 503)
    after = (sample("certbound_requests_total", outcome="fault", reason="store_unavailable"),
             sample("certbound_request_duration_seconds_count", outcome="fault"),
             sample("certbound_unavailable_total", reason="store_unavailable"))
    assert [b - a for a, b in zip(before, after, strict=True)] == [1, 1, 1]


def _histogram(outcome: str) -> list[float]:
    """Every sample of the latency histogram for ``outcome``: the buckets, then count and sum."""
    buckets = [sample("certbound_request_duration_seconds_bucket", outcome=outcome, le=metrics_le(bound))
               for bound in (*metrics.LATENCY_BUCKETS, float("inf"))]
    return [*buckets, sample("certbound_request_duration_seconds_count", outcome=outcome),
            sample("certbound_request_duration_seconds_sum", outcome=outcome)]


def metrics_le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


@pytest.mark.parametrize("seconds", [0.0, 0.000004, 0.0005, 0.00051, 0.3, 5.0, 7.5])
def test_the_accepted_recorder_counts_as_the_public_methods_do(seconds: float) -> None:
    """The accepted path's recorder touches prometheus_client's values directly: it must leave exactly
    what Counter.inc and Histogram.observe leave, bucket boundaries included (le is "at most")."""
    record = metrics.recorder("accepted", "ok")
    found = metrics.decision("fault", "internal_error")
    assert record is not None and found is not None
    before = ([sample("certbound_requests_total", outcome="accepted", reason="ok"), *_histogram("accepted")],
              [sample("certbound_requests_total", outcome="fault", reason="internal_error"), *_histogram("fault")])
    record(seconds)
    found[0].inc()
    found[1].observe(seconds)
    after = ([sample("certbound_requests_total", outcome="accepted", reason="ok"), *_histogram("accepted")],
             [sample("certbound_requests_total", outcome="fault", reason="internal_error"), *_histogram("fault")])
    direct = [b - a for a, b in zip(before[0], after[0], strict=True)]
    public = [b - a for a, b in zip(before[1], after[1], strict=True)]
    assert direct == pytest.approx(public)
    assert direct[0] == 1 and sum(direct[1:len(metrics.LATENCY_BUCKETS) + 2]) >= 1


def test_the_accepted_recorder_falls_back_to_the_public_methods(monkeypatch: pytest.MonkeyPatch) -> None:
    """A prometheus_client laid out otherwise gets Counter.inc and Histogram.observe."""

    class Opaque:
        def __init__(self) -> None:
            self.calls: list[tuple[str, float]] = []

        def inc(self) -> None:
            self.calls.append(("inc", 1))

        def observe(self, seconds: float) -> None:
            self.calls.append(("observe", seconds))

    opaque = Opaque()
    monkeypatch.setattr(metrics, "decision", lambda outcome, reason: (opaque, opaque))
    record = metrics.recorder("refused", "fallback_test")
    assert record is not None
    record(0.25)
    record(0.5)
    metrics.flush()
    assert opaque.calls == [("inc", 1), ("observe", 0.25), ("inc", 1), ("observe", 0.5)]


def _accepted_raw() -> float:
    """The accepted counter's own value, read without a collection (which would flush the batch)."""
    found = metrics.decision("accepted", "ok")
    assert found is not None
    return float(found[0]._value.get())


def _flushed_recorder() -> tuple[Callable[[float], None], float]:
    """The accepted path's recorder, with nothing pending, and the accepted count so far."""
    record = metrics.recorder("accepted", "ok")
    assert record is not None
    metrics.flush()
    return record, _accepted_raw()


def test_batched_decisions_reach_the_values_within_flush_after() -> None:
    record, before = _flushed_recorder()
    for _ in range(5):
        record(0.00001)
    assert _accepted_raw() == before  # kept in the worker: one append per request
    deadline = time.monotonic() + metrics.FLUSH_AFTER + 5
    while _accepted_raw() != before + 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _accepted_raw() == before + 5  # the timer added them, with no scrape
    record(0.00001)
    assert sample("certbound_requests_total", outcome="accepted", reason="ok") == before + 6  # a read flushes first


def test_batched_decisions_from_many_threads_are_all_counted_once() -> None:
    record = metrics.recorder("accepted", "ok")
    assert record is not None
    before = [sample("certbound_requests_total", outcome="accepted", reason="ok"), *_histogram("accepted")]
    durations = [0.0001, 0.0007, 0.003, 0.2]

    def work(offset: int) -> None:
        for i in range(2000):
            record(durations[(i + offset) % 4])
            if i % 500 == 0:
                metrics.flush()  # flushes racing the appends and each other

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = [sample("certbound_requests_total", outcome="accepted", reason="ok"), *_histogram("accepted")]
    delta = [b - a for a, b in zip(before, after, strict=True)]
    assert delta[0] == 16000
    assert delta[-2] == 16000  # the histogram's count
    assert delta[-1] == pytest.approx(4000 * sum(durations))  # its sum
    # Cumulative buckets: le=0.0005 holds the 0.0001s, le=0.001 also the 0.0007s, le=0.005 the 0.003s.
    assert delta[1:4] == [4000, 8000, 8000] and delta[4] == 12000 and delta[-3] == 16000


def test_the_batch_is_bounded_even_if_its_timer_never_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server whose threads never run (or run late) must not let the batch grow without bound."""
    record, before = _flushed_recorder()
    started: list[object] = []
    monkeypatch.setattr(threading.Timer, "start", lambda timer: started.append(timer))  # noqa: PLW0108 - a method
    for _ in range(metrics.MAX_PENDING + 10):
        record(0.00001)
    # One flush scheduled, none more while it is pending; the inline flush at the bound lets the
    # next decision schedule one again.
    assert len(started) == 2
    assert before + metrics.MAX_PENDING - 1 <= _accepted_raw() <= before + metrics.MAX_PENDING + 10
    metrics.flush()
    assert _accepted_raw() == before + metrics.MAX_PENDING + 10


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_worker_does_not_count_its_parent_s_decisions() -> None:
    record, before = _flushed_recorder()
    for _ in range(3):
        record(0.00001)  # pending in the parent when it forks
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: counts its own decision only, and can schedule its own flush
        try:
            child_record = metrics.recorder("accepted", "ok")
            assert child_record is not None
            child_record(0.00001)
            metrics.flush()
            os.write(write, str(_accepted_raw() - before).encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    assert os.read(read, 64) == b"1.0"
    os.close(read)
    metrics.flush()
    assert _accepted_raw() == before + 3


def test_replays_and_key_fetches() -> None:
    replays = sample("certbound_dpop_replays_total")
    metrics.request("refused", "dpop_replay", 0.001, 401)
    assert sample("certbound_dpop_replays_total") == replays + 1
    errors = sample("certbound_key_fetches_total", result="error")
    metrics.key_fetch(False)
    metrics.key_fetch(True, fetched_at=1_700_000_000.0)
    assert sample("certbound_key_fetches_total", result="error") == errors + 1
    assert sample("certbound_keys_fetched_timestamp_seconds") == 1_700_000_000.0


@pytest.mark.parametrize(("name", "metric", "labels"), [
    pytest.param("l1_hits", "certbound_cache_lookups_total", {"level": "l1", "result": "hit"}, id="l1-hit"),
    pytest.param("l2_misses", "certbound_cache_lookups_total", {"level": "l2", "result": "miss"}, id="l2-miss"),
    pytest.param("introspections", "certbound_introspections_total", {"result": "ok"}, id="introspection"),
    pytest.param("idp_errors", "certbound_introspections_total", {"result": "error"}, id="idp-error"),
    pytest.param("redis_errors", "certbound_redis_errors_total", {}, id="redis"),
    pytest.param("resurrected", "certbound_resurrected_total", {}, id="resurrected"),
])
def test_stats_counters_are_bridged(name: str, metric: str, labels: dict[str, str]) -> None:
    stats = Stats()
    before = sample(metric, **labels)
    stats.incr(name, 2)
    assert sample(metric, **labels) == before + 2
    assert stats.snapshot()[name] == 2  # the in-process API is unchanged


def test_metrics_app() -> None:
    metrics.request("refused", "token_missing", 0.001, 401)
    client = Client(metrics.metrics_app)
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    assert 'certbound_requests_total{outcome="refused",reason="token_missing"}' in response.get_data(as_text=True)
    assert client.head("/metrics").get_data() == b""
    assert client.post("/metrics").status_code == 405


@pytest.fixture()
def without_prometheus(monkeypatch: pytest.MonkeyPatch) -> None:
    # As if the import failed; the registered instruments stay for the other tests
    # (prometheus_client's registry refuses a second registration of a name).
    monkeypatch.setattr(metrics, "_client", lambda: None)
    monkeypatch.setattr(metrics, "_instruments", lambda: None)


@pytest.mark.usefixtures("without_prometheus")
def test_without_prometheus_everything_is_a_no_op() -> None:
    assert not metrics.enabled()
    metrics.request("refused", "token_missing", 0.001, 401)
    metrics.key_fetch(True)
    metrics.introspection("ok")
    metrics.cache_lookup("l1", hit=True)
    metrics.dpop_replay()
    Stats().incr("l1_hits")
    response = Client(metrics.metrics_app).get("/metrics")
    assert response.status_code == 404
    assert b"pip install" in response.get_data()


_RACE = """
import sys, threading
from certbound_wsgi import metrics
barrier = threading.Barrier(16)
made, errors = [], []
def first_use():
    barrier.wait()
    try:
        made.append(metrics._instruments())
    except Exception as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=first_use) for _ in range(16)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(len(errors), len({id(m) for m in made}), errors[:1])
"""


@pytest.mark.parametrize("run", range(3))
def test_the_first_use_from_many_threads_registers_once(run: int) -> None:
    """Registering a metric twice raises DuplicateTimeseries; a request that met it was a 500."""
    done = subprocess.run([sys.executable, "-c", _RACE], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split(" ", 2)[:2] == ["0", "1"], done.stdout + done.stderr


def test_a_clean_exit_adds_the_pending_decisions(tmp_path: Path) -> None:
    """A worker that exits before its timer fires still leaves its accepted decisions in its files."""
    code = ("from certbound_wsgi import metrics\n"
            "record = metrics.recorder('accepted', 'ok')\n"
            "for _ in range(3):\n"
            "    record(0.00001)\n")  # exits at once: the timer, a daemon, never fires
    subprocess.run([sys.executable, "-c", code], env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)},
                   check=True, timeout=60)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))
    assert registry.get_sample_value("certbound_requests_total", {"outcome": "accepted", "reason": "ok"}) == 3
    assert registry.get_sample_value("certbound_request_duration_seconds_count", {"outcome": "accepted"}) == 3
