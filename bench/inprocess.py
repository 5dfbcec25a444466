"""Parts 1 and 2: the middleware's cost per request in process, and authlib's beside it.

Each path is timed around two bare apps: a "hello" app, so that no app cost
hides ours, and the shipped echo app. The baselines get the very same requests
(token and certificate included) and ignore them.

The DPoP path (RFC 9449) sends one DPoP-bound token (``cnf.jkt``) with a new
proof on every request, as a client must: the proofs of a sample are signed
before its timing starts, each with its own ``jti``, so that the replay cache
accepts every one of them once. Its baselines are the same bare-app cases as
the other paths' (their requests lack the ``DPoP`` header, whose decoding costs
the loop well under a microsecond).
"""

from __future__ import annotations

import base64
import contextlib
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from certbound_wsgi.dev.echo import echo_app
from certbound_wsgi.middleware import CertBoundMiddleware
from certbound_wsgi.types import WSGIApplication, WSGIEnvironment
from tests.support.dpop import DPoPKey

from .fixtures import AUDIENCE, ISSUER, FakeIntrospection, Workspace, environ_factory, hello_app, opaque_tokens
from .peers import AuthlibMiddleware, authlib_protector
from .timing import Case, RoundEnviron, median, paired, run_interleaved, run_rounds

__all__ = ["run_inprocess"]

APPS: dict[str, WSGIApplication] = {"hello": hello_app, "echo": echo_app}
#: The DPoP case's public_base_url: the URL a client of the bench's proxy (Host 127.0.0.1:8443) addresses.
DPOP_BASE_URL = "https://127.0.0.1:8443"

#: Paths in the order of the report, with a short description.
PATHS = {
    "floor-es256": "Floor: one ES256 verification by cryptography, key imported",
    "floor-redis-get": "Floor: one Redis GET round trip (the L2 client, the L2 entry)",
    "jwt-warm": "JWT, memoized verification (cert-bound ES256)",
    "jwt-cold": "JWT, verified from scratch (a new token per request)",
    "introspection-l1": "Introspection, L1 (in-process) hit",
    "introspection-l2": "Introspection, L2 (Redis) hit, L1 bypassed",
    "dpop": "DPoP (RFC 9449), a new ES256 proof per request",
}


@dataclass
class Sizes:
    """Iterations per sample; a sample of each case lasts roughly 50-100 ms here."""

    bare: int = 20000
    warm: int = 10000
    cold: int = 400
    l1: int = 10000
    l2: int = 2000
    authlib: int = 400
    dpop: int = 400
    floor_es256: int = 400
    floor_redis: int = 2000
    #: Requests of each case per round when the paths and their floors take turns request by request.
    interleaved: int = 400


def _fixed(make: Callable[[int], WSGIEnvironment]) -> Callable[[int], Callable[[int], WSGIEnvironment]]:
    return lambda _round: make


def _fresh(ws: Workspace, count: int) -> Callable[[int], Callable[[int], WSGIEnvironment]]:
    """Each round (and the warm-up, round -1) gets ``count`` tokens never seen before."""

    def for_round(_round: int) -> Callable[[int], WSGIEnvironment]:
        return environ_factory(ws.tokens(count), ws.cert_value)

    return for_round


def _dpop_proofs(ws: Workspace, client: DPoPKey, token: str, count: int) -> RoundEnviron:
    """Each round (and the warm-up, round -1) gets ``count`` requests with proofs never seen before.

    The proofs are signed when the round's requests are made, before its timing starts. Their ``htu``
    is the URI the client addressed: ``public_base_url`` (the bench's ``https://`` + ``Host``) and
    ``PATH_INFO``, which is how ``DPoPVerifier.htu`` builds it.
    """
    base = environ_factory([token], ws.cert_value)
    sample = base(0)
    htu = f"{DPOP_BASE_URL}{sample['SCRIPT_NAME']}{sample['PATH_INFO']}"

    def for_round(_round: int) -> Callable[[int], WSGIEnvironment]:
        proofs = [client.proof(sample["REQUEST_METHOD"], htu, token, jti=secrets.token_urlsafe(16)).encode("latin-1")
                  for _ in range(count)]
        authorization = f"DPoP {token}".encode("latin-1")

        def make(i: int) -> WSGIEnvironment:
            environ = base(i)
            environ["HTTP_AUTHORIZATION"] = authorization.decode("latin-1")
            environ["HTTP_DPOP"] = proofs[i % count].decode("latin-1")
            return environ

        return make

    return for_round


def es256_floor_app(ws: Workspace, app: WSGIApplication) -> WSGIApplication:
    """``app`` behind the one thing a first-seen ES256 token cannot skip: its signature, verified directly by
    ``cryptography`` with the issuer's public key imported beforehand (the signature converted to DER beforehand
    too), over the signing input of a token like the benchmark's."""
    token = ws.tokens(1)[0]
    head, _, raw = token.rpartition(".")
    signature = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
    der = encode_dss_signature(int.from_bytes(signature[:32]), int.from_bytes(signature[32:]))
    public = ws.issuer.key.as_dict(private=False)
    point = b"\x04" + base64.urlsafe_b64decode(public["x"] + "==") + base64.urlsafe_b64decode(public["y"] + "==")
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    data = head.encode("ascii")
    algorithm = ec.ECDSA(hashes.SHA256())

    def floor(environ: WSGIEnvironment, start_response: Any) -> Any:
        key.verify(der, data, algorithm)
        return app(environ, start_response)

    return floor


def redis_floor_app(client: Any, key: str, app: WSGIApplication) -> WSGIApplication:
    """``app`` behind the one thing an L2 hit cannot skip: one GET of the entry, by the L2 cache's own client."""

    def floor(environ: WSGIEnvironment, start_response: Any) -> Any:
        if client.get(key) is None:
            raise RuntimeError("the L2 entry is gone")
        return app(environ, start_response)

    return floor


def _es256_verify_us(rounds: int, iterations: int = 400) -> float:
    """The floor of a DPoP proof check: one P-256 ECDSA verification (SHA-256) by ``cryptography``, alone."""
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    data = secrets.token_bytes(300)
    signature = key.sign(data, ec.ECDSA(hashes.SHA256()))
    samples = []
    for _ in range(rounds):
        begin = time.perf_counter_ns()
        for _ in range(iterations):
            public.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        samples.append((time.perf_counter_ns() - begin) / iterations / 1000)
    return median(samples)


@contextlib.contextmanager
def _redis(directory: Path) -> Iterator[Any]:
    from tests.support.redis_server import RedisServer

    server = RedisServer(directory)
    try:
        yield server
    finally:
        server.stop()


def run_inprocess(ws: Workspace, rounds: int, sizes: Sizes | None = None) -> dict[str, Any]:
    """Time every in-process case; return the rows of the overhead table and the authlib comparison."""
    sizes = sizes or Sizes()
    with _redis(ws.directory / "redis") as redis_server:
        return _run(ws, rounds, sizes, redis_server.url)


def _run(ws: Workspace, rounds: int, sizes: Sizes, redis_url: str) -> dict[str, Any]:
    warm_token = ws.tokens(1)
    opaque = opaque_tokens(1)
    warm_env = environ_factory(warm_token, ws.cert_value)
    opaque_env = environ_factory(opaque, ws.cert_value)

    # DPoP: one client key, one token bound to it (cnf.jkt, no certificate binding), a new proof per request.
    dpop_client = DPoPKey("EC")
    dpop_token = ws.issuer.token(cnf={"jkt": dpop_client.jkt}, client_id="dpop", jti=secrets.token_urlsafe(12),
                                 exp=int(time.time()) + 3600)
    dpop_settings = ws.settings(proof_of_possession_dpop="optional", proof_of_possession_mtls="optional",
                                public_base_url=DPOP_BASE_URL)

    cases: list[Case] = []
    pairs: list[tuple[str, str, Case, Case]] = []
    bases = {}
    for app_name, app in APPS.items():
        bases[app_name] = base = Case(f"bare {app_name}", app, _fixed(warm_env), sizes.bare)
        cases.append(base)

        bearer = ws.settings()
        jwt_mw = CertBoundMiddleware(app, bearer, discovery=ws.discovery(bearer))
        warm = Case(f"jwt-warm {app_name}", jwt_mw, _fixed(warm_env), sizes.warm)
        cold_mw = CertBoundMiddleware(app, bearer, discovery=ws.discovery(bearer))
        cold = Case(f"jwt-cold {app_name}", cold_mw, _fresh(ws, sizes.cold), sizes.cold)

        intro = ws.settings(auth_methods=("introspection",), client_id="bench", client_secret="bench-secret",
                            introspection_endpoint=ISSUER + "/token/introspection")
        l1_mw = CertBoundMiddleware(app, intro, discovery=ws.discovery(intro))
        l1_fake = l1_mw.introspection._client = FakeIntrospection(ws.introspection_answer())  # type: ignore[union-attr]
        l1 = Case(f"introspection-l1 {app_name}", l1_mw, _fixed(opaque_env), sizes.l1)

        shared = ws.settings(auth_methods=("introspection",), client_id="bench", client_secret="bench-secret",
                             introspection_endpoint=ISSUER + "/token/introspection", redis_url=redis_url,
                             cache_secret="bench-cache-secret-0123456789", cache_l1_ttl=0)
        l2_mw = CertBoundMiddleware(app, shared, discovery=ws.discovery(shared))
        l2_fake = l2_mw.introspection._client = FakeIntrospection(ws.introspection_answer())  # type: ignore[union-attr]
        l2 = Case(f"introspection-l2 {app_name}", l2_mw, _fixed(opaque_env), sizes.l2)

        # No Redis: the replay cache is the in-process one.
        dpop_mw = CertBoundMiddleware(app, dpop_settings, discovery=ws.discovery(dpop_settings))
        dpop = Case(f"dpop {app_name}", dpop_mw, _dpop_proofs(ws, dpop_client, dpop_token, sizes.dpop), sizes.dpop)

        cases += [warm, cold, l1, l2, dpop]
        pairs += [("jwt-warm", app_name, warm, base), ("jwt-cold", app_name, cold, base),
                  ("introspection-l1", app_name, l1, base), ("introspection-l2", app_name, l2, base),
                  ("dpop", app_name, dpop, base)]
        if app_name == "hello":
            # The floors, in the same rounds as the paths they bound: each is the bare app plus the one
            # operation the path cannot avoid, so that (path - bare) / (floor - bare) is a ratio of our cost
            # to the hardware's, round by round.
            l2_intro = l2_mw.introspection
            assert l2_intro is not None and l2_intro._l2 is not None
            l2_key = l2_intro._key_name(opaque[0])
            floor_es256 = Case("floor-es256 hello", es256_floor_app(ws, app), _fixed(warm_env), sizes.floor_es256)
            floor_redis = Case("floor-redis-get hello", redis_floor_app(l2_intro._l2._client, l2_key, app),
                               _fixed(opaque_env), sizes.floor_redis)
            cases += [floor_es256, floor_redis]
            pairs += [("floor-es256", app_name, floor_es256, base), ("floor-redis-get", app_name, floor_redis, base)]
            checks: dict[str, Any] = {"jwt-warm": jwt_mw, "jwt-cold": cold_mw, "l1": (l1_mw, l1_fake),
                                      "l2": (l2_mw, l2_fake)}
            dpop_check = dpop_mw

    # Part 2: authlib validating the same kind of token (it cannot bind), through the same loop.
    protector = authlib_protector(ISSUER, AUDIENCE, ws.issuer.jwks())
    peer = Case("authlib hello", AuthlibMiddleware(hello_app, protector), _fresh(ws, sizes.authlib), sizes.authlib)
    peer_same = Case("authlib-same-token hello", AuthlibMiddleware(hello_app, protector), _fixed(warm_env),
                     sizes.authlib)
    cases += [peer, peer_same]

    run_rounds(cases, rounds)

    rows = []
    for path, app_name, ours, base in pairs:
        overhead, ratio = paired(ours, base)
        rows.append({"path": path, "description": PATHS[path], "app": app_name, "ours_us": ours.median,
                     "baseline_us": base.median, "overhead_us": overhead, "ratio": ratio,
                     "samples_us": ours.samples, "baseline_samples_us": base.samples})

    # Our overhead for a cert-bound validation over authlib's for a plain one, round by round.
    hello_base = bases["hello"]
    by_name = {case.name: case for case in cases}
    peer_overheads = [p - b for p, b in zip(peer.samples, hello_base.samples, strict=True)]
    authlib = {
        "authlib_us": peer.median,
        "authlib_same_token_us": peer_same.median,
        "authlib_overhead_us": sorted(peer_overheads)[len(peer_overheads) // 2],
        "how": "authlib ResourceProtector.validate_request(scopes=None, request=JsonRequest(...)) with "
               "JWTBearerTokenValidator (RFC 9068), keys as an imported KeySet, wrapped as a WSGI middleware "
               "around the hello app; overheads are over the bare hello app in the same round",
    }
    for path in ("jwt-warm", "jwt-cold"):
        ours = by_name[f"{path} hello"]
        ratios = [(o - b) / (p - b) for o, b, p in zip(ours.samples, hello_base.samples, peer.samples, strict=True)]
        authlib[f"{path}_overhead_us"] = paired(ours, hello_base)[0]
        authlib[f"{path}_ratio"] = sorted(ratios)[len(ratios) // 2]

    # What a DPoP request costs beyond a warm bearer one, and the one ES256 verification it cannot avoid.
    dpop_hello, warm_hello = by_name["dpop hello"], by_name["jwt-warm hello"]
    assert dpop_check.dpop is not None and dpop_check.jwt is not None
    dpop_replay = dpop_check.dpop._replay
    es256_us = _es256_verify_us(rounds)
    dpop_info = {
        "es256_verify_us": es256_us,
        # Issue 13's target (<= 1.5); python -m bench.dpop times the floor in the same rounds.
        "over_floor": dpop_hello.median / es256_us,
        "over_warm_jwt_us": paired(dpop_hello, warm_hello)[0],
        "overhead_us": paired(dpop_hello, hello_base)[0],
        "proofs_per_sample": sizes.dpop,
        "replay_entries": len(dpop_replay._seen),
        "jwt_memo_entries": dpop_check.jwt.memo_size(),
        "how": "One ES256 access token bound with cnf.jkt to the client's P-256 key, sent as "
               "'Authorization: DPoP <token>' with a DPoP header holding a proof signed before the sample "
               "(distinct jti, htm GET, htu https://127.0.0.1:8443/anything, public_base_url "
               "https://127.0.0.1:8443, ath of the token, iat now); proof_of_possession_dpop and "
               "proof_of_possession_mtls 'optional', replay cache in process (no Redis), no nonces",
    }

    # Each path as a multiple of its floor: the paths and the floors take turns request by request (see
    # run_interleaved), and each round gives (path - bare) / (floor - bare) from its per-request medians.
    n = sizes.interleaved
    # Each path takes turns with its own floor and the bare app only: a heavy case (DPoP) in the same
    # rotation would leave the CPU's caches cold for the next one's first request.
    groups = {
        "jwt-cold": run_interleaved([
            Case("bare hello", hello_app, _fixed(warm_env), n),
            Case("jwt-cold hello", checks["jwt-cold"], _fresh(ws, n), n),
            Case("floor-es256 hello", floor_es256.app, _fixed(warm_env), n),
        ], rounds, n),
        "dpop": run_interleaved([
            Case("bare hello", hello_app, _fixed(warm_env), n),
            Case("dpop hello", dpop_check, _dpop_proofs(ws, dpop_client, dpop_token, n), n),
            Case("floor-es256 hello", floor_es256.app, _fixed(warm_env), n),
        ], rounds, n),
        "introspection-l2": run_interleaved([
            Case("bare hello", hello_app, _fixed(warm_env), n),
            Case("introspection-l2 hello", checks["l2"][0], _fixed(opaque_env), n),
            Case("floor-redis-get hello", floor_redis.app, _fixed(opaque_env), n),
        ], rounds, n),
    }

    def over_floor(path: str, floor: str) -> dict[str, Any]:
        group = groups[path]
        bare_each, ours_each, floor_each = group["bare hello"], group[f"{path} hello"], group[f"{floor} hello"]
        each = [(o - b) / (f - b) for o, b, f in zip(ours_each, bare_each, floor_each, strict=True)]
        return {"path": path, "description": PATHS[path], "floor": floor,
                "overhead_us": median([o - b for o, b in zip(ours_each, bare_each, strict=True)]),
                "floor_us": median([f - b for f, b in zip(floor_each, bare_each, strict=True)]),
                "ratio": median(each), "ratios": each}

    floors = {
        "jwt-cold": over_floor("jwt-cold", "floor-es256"),
        "introspection-l2": over_floor("introspection-l2", "floor-redis-get"),
        "dpop": over_floor("dpop", "floor-es256"),
        "requests_per_round": n,
        "medians_us": groups,
        "tight_loop_redis_get_us": paired(floor_redis, hello_base)[0],
        # The same comparisons from the loops of the table above (means of each loop, garbage collections
        # included, each case in its own loop): noisier, shown for comparison.
        "loops": {path: median([(o - b) / (f - b) for o, b, f in zip(by_name[f"{path} hello"].samples,
                                                                    hello_base.samples, floor.samples, strict=True)])
                  for path, floor in (("jwt-cold", floor_es256), ("dpop", floor_es256),
                                      ("introspection-l2", floor_redis))},
        "how": "Each floor is the bare hello app behind the one operation its path cannot avoid: an ES256 "
               "verification of a benchmark token's signing input by cryptography's EllipticCurvePublicKey.verify "
               "(the key imported and the signature converted to DER beforehand), and a GET of the L2 entry "
               "through the L2 cache's own redis-py client (same connection pool and socket options). Each path "
               f"takes turns with its own floor and the bare app (and no other case), request by request, {n} "
               "requests of each per round, each request timed alone; a round gives each case's median request "
               "(a request that was preempted, or ran a garbage collection, is left out). A ratio is "
               "(path - bare) / (floor - bare) within one round; the median over rounds is shown. Taking turns "
               "matters for the Redis floor: a round trip right after another is faster than one after other "
               "work (the idle core must wake up), and an L2 hit never follows another round trip at once.",
    }

    sanity = {
        "jwt_memo_entries_warm": checks["jwt-warm"].jwt.memo_size(),
        "jwt_memo_entries_cold": checks["jwt-cold"].jwt.memo_size(),
        "introspection_l1_calls": checks["l1"][1].calls,
        "introspection_l1_stats": checks["l1"][0].stats(),
        "introspection_l2_calls": checks["l2"][1].calls,
        "introspection_l2_stats": checks["l2"][0].stats(),
    }
    return {"rows": rows, "authlib": authlib, "dpop": dpop_info, "floors": floors, "sanity": sanity,
            "cases": {case.name: {"median_us": case.median, "samples_us": case.samples,
                                  "iterations": case.iterations} for case in cases}}
