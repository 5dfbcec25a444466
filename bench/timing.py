"""A raw WSGI call loop, run in interleaved rounds; every figure is a median of rounds.

Every case of a part is timed once per round, in a rotating order, so that the
machine's noise (2 shared cores) falls on all of them alike; a comparison
between two cases is a ratio of their times in the same round.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from certbound_wsgi.types import WSGIApplication, WSGIEnvironment

from .fixtures import StatusRecorder, start_response

__all__ = ["Case", "loop_us", "median", "run_interleaved", "run_rounds"]

#: Builds the environ factory of one round: ``make(round)(i)`` is request ``i``'s environ.
RoundEnviron = Callable[[int], Callable[[int], WSGIEnvironment]]


@dataclass
class Case:
    """One thing to time: an app, its requests, and how many per sample."""

    name: str
    app: WSGIApplication
    environ: RoundEnviron
    iterations: int
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return median(self.samples)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def loop_us(app: WSGIApplication, make_environ: Callable[[int], WSGIEnvironment], iterations: int) -> float:
    """Microseconds per request of ``app``, called like a server calls it."""
    sr = start_response
    gc.collect()
    begin = time.perf_counter_ns()
    for i in range(iterations):
        result = app(make_environ(i), sr)
        for _chunk in result:
            pass
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return (time.perf_counter_ns() - begin) / iterations / 1000


def check(case: Case) -> None:
    """Refuse to time a case that does not answer 200: a benchmark of a refusal measures nothing."""
    recorder = StatusRecorder()
    result = case.app(case.environ(-1)(0), recorder)
    body = b"".join(result)
    if not recorder.status.startswith("200"):
        raise RuntimeError(f"{case.name}: answered {recorder.status}: {body[:300]!r}")


def run_rounds(cases: Sequence[Case], rounds: int) -> None:
    """Time every case once per round (after one untimed warm-up round), rotating the order."""
    for case in cases:
        check(case)
        loop_us(case.app, case.environ(-1), max(1, case.iterations // 10))
    for r in range(rounds):
        shift = r % len(cases)
        for case in [*cases[shift:], *cases[:shift]]:
            case.samples.append(loop_us(case.app, case.environ(r), case.iterations))


def paired(ours: Case, base: Case) -> tuple[float, float]:
    """Median over rounds of (ours - base) and of (ours / base), each from the same round."""
    diffs = [a - b for a, b in zip(ours.samples, base.samples, strict=True)]
    ratios = [a / b for a, b in zip(ours.samples, base.samples, strict=True)]
    return median(diffs), median(ratios)


def run_interleaved(cases: Sequence[Case], rounds: int, requests: int) -> dict[str, list[float]]:
    """Per round, each case's median request, the cases taking turns request by request.

    For comparisons with a floor: each request follows another case's, so the machine's noise (other
    processes coming and going, a core waking up for a round trip) falls on all of them alike, and a
    median over single requests leaves out those that were preempted or ran a garbage collection.
    The environs are built before each request's timing starts.

    :returns: each case's name and its per-round medians, in microseconds.
    """
    for case in cases:
        check(case)
    out: dict[str, list[float]] = {case.name: [] for case in cases}
    clock = time.perf_counter_ns
    sr = start_response
    for r in range(-1, rounds):  # round -1 warms up and is not kept
        makes = [case.environ(r) for case in cases]
        times: list[list[int]] = [[] for _ in cases]
        gc.collect()
        for i in range(requests):
            shift = i % len(cases)
            for j in [*range(shift, len(cases)), *range(shift)]:
                environ = makes[j](i)
                begin = clock()
                result = cases[j].app(environ, sr)
                for _chunk in result:
                    pass
                close = getattr(result, "close", None)
                if close is not None:
                    close()
                times[j].append(clock() - begin)
        if r >= 0:
            for case, each in zip(cases, times, strict=True):
                out[case.name].append(statistics.median(each) / 1000)
    return out
