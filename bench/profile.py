"""``python -m bench.profile``: where the time of each request path goes.

Two views of each path (warm JWT, cold JWT, cold JWT with a full memo, L1 and
L2 introspection hits, DPoP with a new proof per request): cProfile's functions by own time, and a stage-by-stage
timing of the warm path, each stage timed alone in a loop, so that what a
change would save can be read off directly. With ``--gunicorn``, also py-spy
(``pip install py-spy``) on a real gunicorn worker behind nginx under load: the
middleware's share of each request where caches are not as warm as in a loop.
Not part of ``python -m bench``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import hmac
import io
import json
import pstats
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from certbound_wsgi import metrics
from certbound_wsgi.authenticator import Identity
from certbound_wsgi.binding import check_mtls, cnf_x5t
from certbound_wsgi.jose import copy_claims
from certbound_wsgi.jwt_tokens import looks_like_jwt
from certbound_wsgi.middleware import CertBoundMiddleware

from .fixtures import ISSUER, FakeIntrospection, Workspace, environ_factory, hello_app, opaque_tokens, start_response
from .timing import loop_us, median

__all__ = ["main"]


def _profile(label: str, run: Callable[[], Any], top: int, out: io.TextIOBase) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    run()
    profiler.disable()
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream).strip_dirs().sort_stats("tottime")
    stats.print_stats(top)
    text = stream.getvalue()
    body = text[text.find("   ncalls"):]
    print(f"\n=== {label}: cProfile, top {top} by own time ===\n{body}", file=out)


def _per_call_ns(fn: Callable[[], Any], iterations: int = 100_000, rounds: int = 5) -> float:
    samples = []
    for _ in range(rounds):
        begin = time.perf_counter_ns()
        for _ in range(iterations):
            fn()
        samples.append((time.perf_counter_ns() - begin) / iterations)
    return median(samples)


@contextlib.contextmanager
def _redis(ws: Workspace) -> Iterator[str]:
    from tests.support.redis_server import RedisServer

    server = RedisServer(ws.directory / "profile-redis")
    try:
        yield server.url
    finally:
        server.stop()


def warm_stages(ws: Workspace, out: io.TextIOBase) -> None:
    """The warm JWT path, one stage at a time (each on a fresh ``str``, as a server would pass it)."""
    settings = ws.settings()
    mw = CertBoundMiddleware(hello_app, settings, discovery=ws.discovery(settings))
    token = ws.tokens(1)[0]
    make = environ_factory([token], ws.cert_value)
    mw(make(0), start_response)
    environ = make(0)
    header = ("Bearer " + token).encode()
    cert = ws.cert_value.encode()
    assert mw.jwt is not None
    claims = mw.jwt.validate(token)
    thumbprint = mw.certificates.thumbprint(environ)
    credential = mw.credentials.read(environ)
    assert credential is not None

    def fresh_env() -> dict[str, Any]:
        env = dict(environ)
        env["HTTP_AUTHORIZATION"] = header.decode("latin-1")
        env["SSL_CLIENT_CERT"] = cert.decode("latin-1")
        return env

    def fresh_token() -> str:
        return header.decode("latin-1")[7:]

    # (stage, what to time, what part of that is the server's work and is subtracted)
    stages: list[tuple[str, Callable[[], Any], Callable[[], Any] | None]] = [
        ("credentials.read (partition, two strips for the b64token syntax)",
         lambda: mw.credentials.read(fresh_env()), fresh_env),
        ("certificates.thumbprint (lru_cache keyed by the PEM text)",
         lambda: mw.certificates.thumbprint(fresh_env()), fresh_env),
        ("looks_like_jwt (str.count over the token)", lambda: looks_like_jwt(fresh_token()), fresh_token),
        ("jwt.validate, memo hit (hash of the token, clock)",
         lambda: mw.jwt.validate(fresh_token()), fresh_token),  # type: ignore[union-attr]
        ("check_mtls (two encode() and hmac.compare_digest)",
         lambda: check_mtls("strict", cnf_x5t(claims), thumbprint), None),
        ("Identity(...)", lambda: Identity(claims, token, thumbprint, "bearer"), None),
        ("copy_claims(claims): the deep copy put in the environ", lambda: copy_claims(claims), None),
        ("  for scale: dict(claims), a shallow copy", lambda: dict(claims), None),
        ("= middleware.authenticate, whole", lambda: mw.authenticate(fresh_env()), fresh_env),
        ("= middleware __call__ + hello app, whole", lambda: mw(fresh_env(), start_response), fresh_env),
        ("  hello app alone", lambda: hello_app(fresh_env(), start_response), fresh_env),
    ]
    print("\n=== warm JWT path, stage by stage (ns per call, median of 5 x 100,000) ===", file=out)
    for name, fn, server in stages:
        ns = _per_call_ns(fn) - (_per_call_ns(server) if server is not None else 0)
        print(f"  {ns:8.0f} ns  {name}", file=out)

    # The certificate memo: a hit still hashes the whole PEM text (a new str per request).
    pem = cert.decode("latin-1")
    print(f"  (hash of a fresh {len(pem)}-char certificate string: "
          f"{_per_call_ns(lambda: hash(cert.decode('latin-1'))) - _per_call_ns(lambda: cert.decode('latin-1')):.0f} ns;"
          f" of a fresh {len(token)}-char token: "
          f"{_per_call_ns(lambda: hash(fresh_token())) - _per_call_ns(fresh_token):.0f} ns)", file=out)
    key = b"k" * 32
    print(f"  (for scale: hmac.new(...).hexdigest() of the token: "
          f"{_per_call_ns(lambda: hmac.new(key, token.encode(), 'sha256').hexdigest(), 20000):.0f} ns)", file=out)


def polluted_warm(ws: Workspace, out: io.TextIOBase, requests: int = 300) -> None:
    """The warm path as a real worker runs it: between two requests the server, the kernel and nginx
    evict the middleware's code and data from the CPU's caches. Each request (and each stage, timed
    alone) follows a pass over 4 MB of memory and some Python; the median request is shown, beside the
    same with the caches left warm. This, not the loop's figure, is what the end-to-end CPU per request
    sees."""
    settings = ws.settings()
    mw = CertBoundMiddleware(hello_app, settings, discovery=ws.discovery(settings))
    auth = mw.authenticator
    base = environ_factory(ws.tokens(1), None)
    cert = ws.cert_value.encode()

    def make(i: int) -> dict[str, Any]:
        environ = base(i)
        environ["HTTP_X_SSL_CLIENT_CERT"] = cert.decode("latin-1")  # the header, from a trusted proxy
        return environ

    list(mw(make(0), start_response))
    junk = bytearray(4 * 1024 * 1024)
    doc = {f"k{i}": [i, str(i), {"x": i}] for i in range(300)}

    def pollute() -> None:
        for i in range(0, len(junk), 64):
            junk[i] ^= 1
        json.loads(json.dumps(doc))

    credential = auth.credentials.read(make(0))
    assert credential is not None and auth.jwt is not None
    identity = auth.authenticate(make(0), credential)
    record = metrics.recorder("accepted", "ok")

    def count(environ: dict[str, Any]) -> None:
        if record is not None:
            record(0.00001)

    stages: dict[str, Callable[[dict[str, Any]], Any]] = {
        "bare hello app": lambda e: list(hello_app(e, start_response)),
        "whole middleware (hello app)": lambda e: list(mw(e, start_response)),
        "channel.verdict (takes the proxy secret)": auth.certificates.channel.verdict,
        "credentials.read": auth.credentials.read,
        "certificates.thumbprint": auth.certificates.thumbprint,
        "jwt.validate (memo hit)": lambda e: auth.jwt.validate(credential.token),  # type: ignore[union-attr]
        "authenticate (all of it, in full)": lambda e: auth.authenticate(e, credential),
        "decide (the accepted decision remembered)": auth.decide,
        "copy_claims": lambda e: copy_claims(identity.claims),
        "metrics (accepted counter + latency histogram)": count,
    }
    print(f"\n=== warm JWT path, caches polluted before each request vs left warm ({requests} requests, "
          "median) ===", file=out)
    for name, stage in stages.items():
        figures = []
        for dirty in (True, False):
            times = []
            for i in range(requests):
                if dirty:
                    pollute()
                environ = make(i)
                begin = time.perf_counter_ns()
                stage(environ)
                times.append(time.perf_counter_ns() - begin)
            figures.append(median(times) / 1000)
        print(f"  {figures[0]:6.1f} µs polluted, {figures[1]:5.1f} µs warm  {name}", file=out)


def cold_memo(ws: Workspace, out: io.TextIOBase, fill: int) -> None:
    """The cold path with an empty memo and with a full one (every insert evicts the oldest)."""
    settings = ws.settings()
    print(f"\n=== cold JWT path: empty memo vs full memo ({settings.token_cache_size:,} entries) ===", file=out)
    empty = CertBoundMiddleware(hello_app, settings, discovery=ws.discovery(settings))
    full = CertBoundMiddleware(hello_app, settings, discovery=ws.discovery(settings))
    assert full.jwt is not None
    for token in ws.tokens(fill):
        full.jwt.validate(token)
    print(f"  filled the memo with {full.jwt.memo_size():,} tokens", file=out)
    results: dict[str, list[float]] = {"empty": [], "full": []}
    for _ in range(5):
        for name, mw in (("empty", empty), ("full", full)):
            results[name].append(loop_us(mw, environ_factory(ws.tokens(300), ws.cert_value), 300))
    for name, samples in results.items():
        print(f"  {median(samples):7.1f} µs/request, memo {name}  (samples {', '.join(f'{s:.0f}' for s in samples)})",
              file=out)
    # The eviction alone: pop the oldest of an OrderedDict kept at a fixed size, as JWTValidator._remember does.
    memo = collections.OrderedDict((f"k{i}", i) for i in range(settings.token_cache_size))
    counter = iter(range(10**9))

    def evict_and_insert() -> None:
        while len(memo) >= settings.token_cache_size:
            memo.popitem(last=False)
        memo[f"x{next(counter)}"] = 0

    print(f"  eviction + insert alone: {_per_call_ns(evict_and_insert, 20000):.0f} ns per insert "
          "(OrderedDict.popitem(last=False))", file=out)

    cold_env = environ_factory(ws.tokens(1500), ws.cert_value)  # minted before the profiler starts

    def cold_run() -> None:
        loop_us(full, cold_env, 1500)

    _profile("cold JWT path, full memo", cold_run, 25, out)


def cold_without_verification(ws: Workspace, out: io.TextIOBase, rounds: int = 5, per_round: int = 400) -> None:
    """The cold path as it is, and with the P-256 verification replaced by a no-op (the signature's DER
    form still made): what is left is the cold path's own Python work; the difference from the real path
    minus one verification is what the verification costs the code that follows it (cold caches)."""
    from certbound_wsgi import jose

    from .inprocess import _es256_verify_us

    settings = ws.settings()
    tokens = ws.tokens(rounds * per_round * 2 + 100)
    make = environ_factory(tokens, ws.cert_value)
    mw = CertBoundMiddleware(hello_app, settings, discovery=ws.discovery(settings))
    next_token = iter(range(len(tokens)))

    def round_us() -> float:
        batch = [make(next(next_token)) for _ in range(per_round)]  # fresh strings, as a server's
        times = []
        for environ in batch:
            begin = time.perf_counter_ns()
            list(mw(environ, start_response))
            times.append(time.perf_counter_ns() - begin)
        return median(times) / 1000

    for _ in range(100):
        list(mw(make(next(next_token)), start_response))
    real = median([round_us() for _ in range(rounds)])
    original = jose.Verifier.verify

    def no_verification(self: jose.Verifier, alg: str, signing_input: bytes, signature: bytes) -> bool:
        size = self.size
        jose.encode_dss_signature(int.from_bytes(signature[:size]), int.from_bytes(signature[size:]))
        return alg in self.algs

    jose.Verifier.verify = no_verification  # type: ignore[method-assign]
    try:
        without = median([round_us() for _ in range(rounds)])
    finally:
        jose.Verifier.verify = original  # type: ignore[method-assign]
    verify = _es256_verify_us(rounds)
    print(f"\n=== cold JWT path (hello app, median request of {rounds} rounds of {per_round}) ===\n"
          f"  {real:6.1f} µs as it is\n"
          f"  {without:6.1f} µs with the verification a no-op: the cold path's own work\n"
          f"  {verify:6.1f} µs one ES256 verification alone (a loop)\n"
          f"  {real - without - verify:6.1f} µs left: what the verification costs the code after it", file=out)


def dpop_path(ws: Workspace, out: io.TextIOBase, top: int, count: int = 3000) -> None:
    """A DPoP-bound token with a new ES256 proof per request (in-process replay cache), beside one
    bare P-256 verification: the part of the proof check no cache can save."""
    from tests.support.dpop import DPoPKey

    from .inprocess import DPOP_BASE_URL, _dpop_proofs, _es256_verify_us

    client = DPoPKey("EC")
    token = ws.issuer.token(cnf={"jkt": client.jkt}, client_id="dpop", exp=int(time.time()) + 3600)
    settings = ws.settings(proof_of_possession_dpop="optional", proof_of_possession_mtls="optional",
                           public_base_url=DPOP_BASE_URL)
    mw = CertBoundMiddleware(hello_app, settings, discovery=ws.discovery(settings))
    proofs = _dpop_proofs(ws, client, token, count)
    loop_us(mw, proofs(-1), 100)
    timed = median([loop_us(mw, proofs(r), count) for r in range(3)])
    print(f"\n=== DPoP path: {timed:.1f} µs/request (hello app included); one ES256 verification alone: "
          f"{_es256_verify_us(5):.1f} µs ===", file=out)
    env = proofs(99)  # signed before the profiler starts
    _profile("DPoP path, a new proof per request", lambda: loop_us(mw, env, count), top, out)


def _spy_stacks(path: str) -> Iterator[tuple[list[str], int]]:
    with open(path) as fh:
        for line in fh:
            stack, _, count = line.rstrip().rpartition(" ")
            yield stack.split(";"), int(count)


def gunicorn_spy(ws: Workspace, out: io.TextIOBase, seconds: float = 8.0, worker_class: str = "sync",
                 app: str = "hello") -> None:
    """py-spy on one worker of a protected stack under load, with alice's bound JWT: one sync worker, or
    one of the two gthread workers of the end-to-end benchmark (4 threads each, 8 connections)."""
    import shutil
    import subprocess

    from tests.support.servers import SERVER_NAME

    from .e2e import _context, _stack, _tree, started_idp
    from .loadgen import request_bytes, run_load, send_once

    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("\n=== gunicorn worker: skipped, py-spy is not installed (pip install py-spy) ===", file=out)
        return
    with started_idp(ws) as provider:
        request = request_bytes("/anything", SERVER_NAME, provider.token("bound"))
        context = _context(ws)
        gthread = worker_class == "gthread"
        stack = _stack(ws, provider, ws.ca.server(), "spy", worker_class=worker_class, protected=True, app=app,
                       workers=2 if gthread else 1, threads=4 if gthread else 1)
        try:
            for _ in range(20):
                send_once(stack.nginx.port, context, request)
            worker = next(p for p in _tree(stack.gunicorn.process.pid) if p != stack.gunicorn.process.pid)
            raw = ws.directory / "spy.txt"
            recorder = subprocess.Popen([spy, "record", "-p", str(worker), "-d", str(int(seconds)), "-r", "1000",
                                         "-f", "raw", "-o", str(raw)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            load = run_load(stack.nginx.port, context, request, connections=8 if gthread else 4, duration=seconds,
                            warmup=0)
            recorder.wait(60)
            if load.statuses.get(200, 0) != load.requests or load.errors:
                raise RuntimeError(f"profiled load failed: statuses {load.statuses}, {load.errors} errors")
        finally:
            stack.stop()
    # The worker spied on answered about its share of the requests.
    requests = load.requests / (2 if gthread else 1)
    inside: collections.Counter[str] = collections.Counter()
    outside: collections.Counter[str] = collections.Counter()
    in_app = 0
    app_function = f"{app}_app"
    for frames, count in _spy_stacks(str(raw)):
        calls = [i for i, frame in enumerate(frames) if "CertBoundMiddleware.__call__" in frame]
        if not calls:
            outside[_short(frames)] += count
            continue
        if any(app_function in frame for frame in frames[calls[-1]:]):
            in_app += count
            continue
        inside[frames[-1]] += count
    total = sum(inside.values())
    # A thread waiting (for a connection, an event, a queue item) is sampled too: what is left is work.
    waiting = sum(count for frame, count in outside.items() if _WAITING.search(frame.split(" <- ")[0]))
    busy = total + in_app + sum(outside.values()) - waiting
    print(f"\n=== gunicorn {worker_class} worker ({app} app) behind nginx, py-spy at 1 kHz for {seconds:g} s, "
          f"{requests:.0f} requests ===", file=out)
    # py-spy stops the worker for each sample: absolute times are inflated, shares are what to read.
    print(f"  {total * 1000 / requests:6.1f} µs/request sampled in the middleware, app excluded (the {app} app: "
          f"{in_app * 1000 / requests:.1f} µs/request; outside the middleware: "
          f"{sum(outside.values()) * 1000 / requests:.1f} µs/request, idle threads included; sampling stops "
          "inflate all three). Share of the middleware's by innermost frame:", file=out)
    for frame, count in inside.most_common(15):
        print(f"  {count / total:6.1%}  {frame}", file=out)
    print(f"  The middleware's share of the worker's busy samples (waits left out): {total / busy:.1%} "
          f"({total} of {busy}).", file=out)
    print("  Outside the middleware, by innermost two frames:", file=out)
    for frame, count in outside.most_common(12):
        print(f"  {count * 1000 / requests:6.1f} µs/request  {frame}", file=out)


#: Innermost frames of a thread that waits rather than works.
_WAITING = re.compile(r"^(select|poll|wait|_worker|accept|sleep|EpollSelector\.select|_PollLikeSelector\.select|"
                      r"Condition\.wait|Event\.wait|SyncWorker\.wait|SimpleQueue\.get|Queue\.get) ")


def _short(frames: list[str]) -> str:
    return " <- ".join(reversed(frames[-2:]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--fill", type=int, default=10_000, help="tokens to fill the memo with (default 10000)")
    parser.add_argument("--gunicorn", action="store_true", help="also py-spy a real gunicorn worker under load")
    parser.add_argument("--worker-class", choices=("sync", "gthread"), default="sync",
                        help="the gunicorn worker class for --gunicorn (gthread: 2 workers x 4 threads)")
    parser.add_argument("--app", choices=("hello", "echo"), default="hello", help="the app for --gunicorn")
    parser.add_argument("--only-gunicorn", action="store_true", help="skip the in-process profiles")
    parser.add_argument("--only-polluted", action="store_true", help="only the warm path with polluted caches")
    parser.add_argument("--only-cold", action="store_true",
                        help="only the cold path, as it is and with the verification a no-op")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    out: io.TextIOBase = sys.stdout  # type: ignore[assignment]
    ws = Workspace()
    if args.only_cold:
        cold_without_verification(ws, out)
        return 0
    if args.only_gunicorn:
        gunicorn_spy(ws, out, worker_class=args.worker_class, app=args.app)
        return 0
    if args.only_polluted:
        polluted_warm(ws, out)
        return 0

    settings = ws.settings()
    warm = CertBoundMiddleware(hello_app, settings, discovery=ws.discovery(settings))
    warm_env = environ_factory(ws.tokens(1), ws.cert_value)
    loop_us(warm, warm_env, 1000)
    _profile("warm JWT path (memo hit)", lambda: loop_us(warm, warm_env, 200_000), args.top, out)
    warm_stages(ws, out)
    polluted_warm(ws, out)
    cold_memo(ws, out, args.fill)

    intro = ws.settings(auth_methods=("introspection",), client_id="bench", client_secret="bench-secret",
                        introspection_endpoint=ISSUER + "/token/introspection")
    l1 = CertBoundMiddleware(hello_app, intro, discovery=ws.discovery(intro))
    l1.introspection._client = FakeIntrospection(ws.introspection_answer())  # type: ignore[union-attr]
    opaque = environ_factory(opaque_tokens(1), ws.cert_value)
    loop_us(l1, opaque, 1000)
    _profile("introspection, L1 hit", lambda: loop_us(l1, opaque, 100_000), args.top, out)

    with _redis(ws) as url:
        shared = ws.settings(auth_methods=("introspection",), client_id="bench", client_secret="bench-secret",
                             introspection_endpoint=ISSUER + "/token/introspection", redis_url=url,
                             cache_secret="bench-cache-secret-0123456789", cache_l1_ttl=0)
        l2 = CertBoundMiddleware(hello_app, shared, discovery=ws.discovery(shared))
        l2.introspection._client = FakeIntrospection(ws.introspection_answer())  # type: ignore[union-attr]
        assert l2.introspection is not None
        key_name = l2.introspection._key_name
        opaque_token = opaque(0)["HTTP_AUTHORIZATION"][7:]
        print(f"\n  introspection cache key per request (HMAC-SHA256 of endpoint and token): "
              f"{_per_call_ns(lambda: key_name(opaque_token), 20000):.0f} ns", file=out)
        loop_us(l2, opaque, 100)
        _profile("introspection, L2 (Redis) hit", lambda: loop_us(l2, opaque, 10_000), args.top, out)
    dpop_path(ws, out, args.top)
    if args.gunicorn:
        gunicorn_spy(ws, out, worker_class=args.worker_class, app=args.app)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
