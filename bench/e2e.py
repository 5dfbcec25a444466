"""Parts 3 and 4: real nginx (mutual TLS) in front of gunicorn, under load and under a cold burst.

Stacks are started with the end-to-end tests' helpers (``tests.support.servers``)
and the tokens come from the real oidc-provider (``tests.support.idp``), as in
``tests/e2e``. The unprotected stack is gunicorn serving the echo app directly,
behind the same nginx configuration.
"""

from __future__ import annotations

import os
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from certbound_wsgi.dev.pki import Issued
from tests.support.idp import API_RESOURCE, OPAQUE_RESOURCE, SECRETS, OidcProvider
from tests.support.redis_server import RedisServer
from tests.support.servers import PROXY_SECRET, SERVER_NAME, Gunicorn, Nginx, start_gunicorn, start_nginx

from .fixtures import Workspace
from .loadgen import _Connection, client_context, request_bytes, run_load, send_once
from .timing import median

__all__ = ["run_burst", "run_e2e", "started_idp"]

PROTECTED = "certbound_wsgi.wsgi:application"
#: The app of each comparison, served bare (unprotected) or through ``certbound_wsgi.wsgi`` (``CERTBOUND_APP``).
APPS = {"echo": "certbound_wsgi.dev.echo:echo_app", "hello": "bench.apps:hello_app"}
#: (gunicorn worker class, app) of each protected/unprotected comparison.
CONFIGS = (("sync", "echo"), ("gthread", "echo"), ("sync", "hello"), ("gthread", "hello"))
_TICK = os.sysconf("SC_CLK_TCK")


def _tree(pid: int) -> list[int]:
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return pids
    for child in children:
        pids += _tree(int(child))
    return pids


def busy_seconds() -> float:
    """CPU seconds spent by the whole machine (all cores, not idle or waiting), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / _TICK


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its descendants, from /proc (Linux)."""
    total = 0
    for each in _tree(pid):
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICK


@dataclass
class Stack:
    name: str
    worker_class: str
    app: str
    protected: bool
    gunicorn: Gunicorn
    nginx: Nginx

    def stop(self) -> None:
        self.nginx.stop()
        self.gunicorn.stop()


def _app_env(provider: OidcProvider, **options: str) -> dict[str, str]:
    env = {"CERTBOUND_ISSUER": provider.issuer, "CERTBOUND_AUDIENCE": API_RESOURCE,
           "CERTBOUND_CA_FILE": provider.ca_file, "CERTBOUND_PROXY_SECRET": PROXY_SECRET}
    env.update({f"CERTBOUND_{name.upper()}": value for name, value in options.items()})
    return env


def _stack(ws: Workspace, provider: OidcProvider, server_cert: Issued, name: str, *, worker_class: str,
           protected: bool, app: str = "echo", workers: int = 2, threads: int = 1, **options: str) -> Stack:
    logs = ws.directory / name
    env = _app_env(provider, **options)
    if protected and app != "echo":
        env["CERTBOUND_APP"] = APPS[app]
    gunicorn = start_gunicorn(env, workers=workers, worker_class=worker_class, threads=threads,
                              module=PROTECTED if protected else APPS[app], log_dir=logs)
    try:
        nginx = start_nginx(logs / "nginx", "gunicorn", gunicorn.backend, server_cert, proxy_secret=PROXY_SECRET)
    except BaseException:
        gunicorn.stop()
        raise
    return Stack(name, worker_class, app, protected, gunicorn, nginx)


@contextmanager
def started_idp(ws: Workspace) -> Iterator[OidcProvider]:
    provider = OidcProvider(ws.directory / "idp", ca=ws.ca, bound={"bound": ws.alice})
    provider.start()
    try:
        yield provider
    finally:
        provider.stop()


def _context(ws: Workspace) -> ssl.SSLContext:
    return client_context(str(ws.ca.cert_path), str(ws.alice.cert_path), str(ws.alice.key_path))


def _measure(stack: Stack, context: ssl.SSLContext, request: bytes, *, connections: int, duration: float,
             warmup: float) -> dict[str, float]:
    before = cpu_seconds(stack.gunicorn.process.pid), cpu_seconds(stack.nginx.process.pid), busy_seconds()
    result = run_load(stack.nginx.port, context, request, connections=connections, duration=duration, warmup=warmup)
    after = cpu_seconds(stack.gunicorn.process.pid), cpu_seconds(stack.nginx.process.pid), busy_seconds()
    ours = (after[0] - before[0]) + (after[1] - before[1]) + result.generator_cpu_s
    if result.statuses.get(200, 0) != result.requests or result.errors:
        raise RuntimeError(f"{stack.name}: statuses {result.statuses}, {result.errors} errors")
    # CPU is counted over warm-up and run alike: divide by the requests answered in both, estimated
    # from the measured rate.
    answered = result.rps * (warmup + duration)
    return {
        "rps": result.rps, "p50_ms": result.percentile(0.50), "p99_ms": result.percentile(0.99),
        "requests": result.requests,
        "gunicorn_cpu_us": (after[0] - before[0]) / answered * 1e6 if answered else float("nan"),
        "nginx_cpu_us": (after[1] - before[1]) / answered * 1e6 if answered else float("nan"),
        "generator_cpu_share": result.generator_cpu_s / (warmup + duration),
        # Cores kept busy meanwhile by everything else on the machine (other people's work): noise.
        "others_cores": max(0.0, (after[2] - before[2]) - ours) / (warmup + duration),
    }


def run_e2e(ws: Workspace, provider: OidcProvider, *, pairs: int, duration: float, warmup: float,
            connections: int, gthreads: int = 4) -> dict[str, Any]:
    """Throughput and latency of protected and unprotected stacks.

    For each worker class, ``pairs`` back-to-back pairs of runs, unprotected then protected and
    the other way round in turn (ABBA), so that a slow stretch of the shared machine falls on both
    halves of a pair; each ratio is taken within a pair.
    """
    server_cert = ws.ca.server()
    token = provider.token("bound")
    context = _context(ws)
    samples: dict[str, list[dict[str, float]]] = {}
    ratios: dict[str, list[dict[str, float]]] = {}
    with ExitStack() as cleanup:
        stacks: dict[tuple[str, str, bool], Stack] = {}
        for worker_class, app in CONFIGS:
            for protected in (False, True):
                name = f"{worker_class} {app} {'protected' if protected else 'unprotected'}"
                stack = _stack(ws, provider, server_cert, name.replace(" ", "-"), worker_class=worker_class,
                               protected=protected, app=app, threads=gthreads if worker_class == "gthread" else 1)
                cleanup.callback(stack.stop)
                stacks[worker_class, app, protected] = stack
                samples[name] = []
        # The noise floor: a second unprotected stack, measured against the first as if it were protected.
        twin = _stack(ws, provider, server_cert, "sync-hello-twin", worker_class="sync", protected=False, app="hello")
        cleanup.callback(twin.stop)
        request = request_bytes("/anything", SERVER_NAME, token)
        for stack in [*stacks.values(), twin]:
            # Every worker discovers the issuer's keys on its first request: not part of the measurement.
            for _ in range(8):
                status, body = send_once(stack.nginx.port, context, request)
                if status != 200:
                    raise RuntimeError(f"{stack.name}: answered {status}: {body[:300]!r}")
        for worker_class, app, twin_of in [*((w, a, False) for w, a in CONFIGS), ("sync", "hello", True)]:
            config = f"{worker_class} {app}" + (" twin (unprotected twice: the noise)" if twin_of else "")
            ratios[config] = []
            for r in range(pairs):
                order = (False, True) if r % 2 == 0 else (True, False)
                pair = {}
                for protected in order:
                    stack = twin if twin_of and protected else stacks[worker_class, app, protected and not twin_of]
                    pair[protected] = _measure(stack, context, request, connections=connections,
                                               duration=duration, warmup=warmup)
                    if not twin_of:
                        samples[f"{config} {'protected' if protected else 'unprotected'}"].append(pair[protected])
                prot, unprot = pair[True], pair[False]
                ratios[config].append({
                    "throughput": prot["rps"] / unprot["rps"],
                    "p50": prot["p50_ms"] / unprot["p50_ms"],
                    "gunicorn_cpu_overhead_us": prot["gunicorn_cpu_us"] - unprot["gunicorn_cpu_us"],
                    "cpu_capacity": (unprot["gunicorn_cpu_us"] + unprot["nginx_cpu_us"])
                    / (prot["gunicorn_cpu_us"] + prot["nginx_cpu_us"]),
                })

    rows = []
    for worker_class, app, protected in stacks:
        name = f"{worker_class} {app} {'protected' if protected else 'unprotected'}"
        runs = samples[name]
        rows.append({"stack": name, "worker_class": worker_class, "app": app, "protected": protected,
                     **{key: median([run[key] for run in runs]) for key in runs[0]}, "runs": runs})
    comparisons = {
        config: {
            "throughput_ratio": median([p["throughput"] for p in pairs_]),
            "throughput_ratios": [p["throughput"] for p in pairs_],
            "p50_ratio": median([p["p50"] for p in pairs_]),
            "gunicorn_cpu_overhead_us": median([p["gunicorn_cpu_overhead_us"] for p in pairs_]),
            "cpu_capacity_ratio": median([p["cpu_capacity"] for p in pairs_]),
        }
        for config, pairs_ in ratios.items()
    }
    return {"rows": rows, "comparisons": comparisons, "connections": connections, "duration_s": duration,
            "warmup_s": warmup, "pairs": pairs, "gthread_threads": gthreads}


def _burst(port: int, context: ssl.SSLContext, request: bytes, concurrency: int) -> tuple[dict[int, int], float]:
    """``concurrency`` connections, handshakes done, each send one request at the same instant."""
    connections = [_Connection(port, context) for _ in range(concurrency)]
    for connection in connections:
        connection.connect()
    barrier = threading.Barrier(concurrency + 1)
    statuses: dict[int, int] = {}
    lock = threading.Lock()

    def one(connection: _Connection) -> None:
        barrier.wait()
        try:
            status, _ = connection.exchange(request)
        except OSError:
            status = 0
        finally:
            connection.close()
        with lock:
            statuses[status] = statuses.get(status, 0) + 1

    threads = [threading.Thread(target=one, args=(c,), daemon=True) for c in connections]
    for thread in threads:
        thread.start()
    barrier.wait()
    begin = time.monotonic()
    for thread in threads:
        thread.join(60)
    return statuses, time.monotonic() - begin


def run_burst(ws: Workspace, provider: OidcProvider, *, bursts: int = 3, concurrency: int = 64,
              workers: int = 4) -> dict[str, Any]:
    """Introspections the issuer sees for a burst of first requests with one new opaque token."""
    server_cert = ws.ca.server()
    context = _context(ws)
    redis = RedisServer(ws.directory / "burst-redis")
    results: dict[str, Any] = {"concurrency": concurrency, "workers": workers, "bursts": {}}
    try:
        for worker_class, threads in (("sync", 1), ("gthread", 4)):
            stack = _stack(ws, provider, server_cert, f"burst-{worker_class}", worker_class=worker_class,
                           protected=True, workers=workers, threads=threads, auth_methods="introspection",
                           audience=OPAQUE_RESOURCE, client_id="rs-client", client_secret=SECRETS["rs-client"],
                           redis_url=redis.url)
            try:
                # Warm every worker (issuer metadata, connections) with a token of its own.
                warm = request_bytes("/anything", SERVER_NAME,
                                     provider.token("bound", resource=OPAQUE_RESOURCE))
                statuses, _ = _burst(stack.nginx.port, context, warm, 16)
                if set(statuses) != {200}:
                    raise RuntimeError(f"burst warm-up answered {statuses}")
                runs = []
                for _ in range(bursts):
                    token = provider.token("bound", resource=OPAQUE_RESOURCE)
                    request = request_bytes("/anything", SERVER_NAME, token)
                    provider.reset_stats()
                    statuses, seconds = _burst(stack.nginx.port, context, request, concurrency)
                    runs.append({"introspections": provider.stats()["introspections"], "statuses": statuses,
                                 "seconds": seconds})
                results["bursts"][f"{worker_class} ({workers} workers x {threads} threads)"] = runs
            finally:
                stack.stop()
    finally:
        redis.stop()
    return results
