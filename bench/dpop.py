"""``python -m bench.dpop``: what a DPoP request costs, as a multiple of the one thing it cannot avoid.

Every case is timed in the same process, in interleaved rounds (the order rotates
each round), and reported as a median over rounds:

- ``floor``: one P-256 ECDSA (SHA-256) verification by ``cryptography``, the key
  already imported: the irreducible work of a request with a new ES256 proof;
- ``dpop``: a request through :class:`CertBoundMiddleware` (hello app) with one
  DPoP-bound token (memoized after the first request) and a new ES256 proof each
  time (signed before the sample; the replay cache in process);
- ``dpop-redis``: the same with the replay store in Redis (one ``SET NX`` round trip);
- ``hostile-stolen``: the proof of issue 11 item 5, sent with a stolen DPoP-bound
  token: a 3072-bit RSA key with a huge public exponent and a garbage signature;
  refused (its thumbprint is not the token's ``cnf.jkt``);
- ``hostile-bound``: the same key sent with a token bound to it (an issuer that
  binds whatever it is given): refused for its exponent, before any import;
- ``hostile-verify``: what such a proof cost before: one RSA verification with that
  key by ``cryptography`` (so the refusal's saving is visible).

Targets (issue 13, issue 11 item 5): ``dpop`` / ``floor`` <= 1.5; ``hostile-*`` <= ``dpop``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from certbound_wsgi.middleware import CertBoundMiddleware
from certbound_wsgi.types import WSGIApplication, WSGIEnvironment
from tests.support.dpop import DPoPKey, ath

from .fixtures import StatusRecorder, Workspace, environ_factory, hello_app
from .timing import loop_us, median

__all__ = ["run_dpop"]

PUBLIC_BASE_URL = "https://127.0.0.1:8443"


@dataclass
class Case:
    name: str
    app: WSGIApplication
    environ: Callable[[int], Callable[[int], WSGIEnvironment]]
    iterations: int
    status: str
    samples: list[float] = field(default_factory=list)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class _Floor:
    """A WSGI app doing nothing but one ES256 verification of a fixed 300-byte input."""

    def __init__(self) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        self.public = key.public_key()
        self.data = secrets.token_bytes(300)
        self.signature = key.sign(self.data, ec.ECDSA(hashes.SHA256()))
        self.algorithm = ec.ECDSA(hashes.SHA256())

    def __call__(self, environ: WSGIEnvironment, start_response: Any) -> list[bytes]:
        self.public.verify(self.signature, self.data, self.algorithm)
        start_response("200 OK", [])
        return [b""]


class _HostileVerify:
    """What the hostile proof cost before issue 11 item 5: one RSA verification with its key."""

    def __init__(self, public: rsa.RSAPublicKey) -> None:
        self.public = public
        self.signature = secrets.token_bytes(384)

    def __call__(self, environ: WSGIEnvironment, start_response: Any) -> list[bytes]:
        try:
            self.public.verify(self.signature, b"x" * 300, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            pass
        start_response("401 Unauthorized", [])
        return [b""]


def _huge_exponent_key() -> tuple[rsa.RSAPublicKey, dict[str, str]]:
    """A 3072-bit modulus with an odd public exponent just below it (OpenSSL caps e only above 3072 bits)."""
    n = rsa.generate_private_key(65537, 3072).public_key().public_numbers().n
    e = n - 2 if n % 2 else n - 1
    while e % 2 == 0:
        e -= 1
    public = rsa.RSAPublicNumbers(e, n).public_key()
    jwk = {"kty": "RSA", "n": _b64(n.to_bytes(384)), "e": _b64(e.to_bytes((e.bit_length() + 7) // 8))}
    return public, jwk


def _thumbprint(jwk: dict[str, str]) -> str:
    canonical = json.dumps({k: jwk[k] for k in ("e", "kty", "n")}, separators=(",", ":"), sort_keys=True)
    return _b64(hashlib.sha256(canonical.encode()).digest())


def _proofs(client: DPoPKey, token: str, count: int, base: Callable[[int], WSGIEnvironment],
            htu: str) -> Callable[[int], Callable[[int], WSGIEnvironment]]:
    """Each round gets ``count`` proofs never seen before, signed before its timing starts."""

    def for_round(_round: int) -> Callable[[int], WSGIEnvironment]:
        proofs = [client.proof("GET", htu, token, jti=secrets.token_urlsafe(16)) for _ in range(count)]

        def make(i: int) -> WSGIEnvironment:
            environ = base(i)
            environ["HTTP_AUTHORIZATION"] = f"DPoP {token}"
            environ["HTTP_DPOP"] = proofs[i % count]
            return environ

        return make

    return for_round


def _hostile(jwk: dict[str, str], token: str, base: Callable[[int], WSGIEnvironment], htu: str,
             ) -> Callable[[int], Callable[[int], WSGIEnvironment]]:
    """The same hostile proof every time: it is refused before its jti could be remembered."""
    header = _b64(json.dumps({"typ": "dpop+jwt", "alg": "RS256", "jwk": jwk}).encode())
    claims = _b64(json.dumps({"jti": secrets.token_urlsafe(16), "htm": "GET", "htu": htu, "iat": int(time.time()),
                              "ath": ath(token)}).encode())
    proof = f"{header}.{claims}.{_b64(secrets.token_bytes(384))}"

    def make(i: int) -> WSGIEnvironment:
        environ = base(i)
        environ["HTTP_AUTHORIZATION"] = f"DPoP {token}"
        environ["HTTP_DPOP"] = proof
        return environ

    return lambda _round: make


def _status(case: Case) -> str:
    recorder = StatusRecorder()
    body = b"".join(case.app(case.environ(-1)(0), recorder))
    if not recorder.status.startswith(case.status):
        raise RuntimeError(f"{case.name}: answered {recorder.status} {body[:300]!r}, expected {case.status}")
    return recorder.status


def run_dpop(ws: Workspace, rounds: int, iterations: int = 400, redis_url: str | None = None) -> dict[str, Any]:
    """Time every case; return medians (microseconds) and the ratios of the targets."""
    client = DPoPKey("EC")
    token = ws.issuer.token(cnf={"jkt": client.jkt}, client_id="dpop", jti=secrets.token_urlsafe(12),
                            exp=int(time.time()) + 3600)
    base = environ_factory([token], None)
    sample = base(0)
    htu = PUBLIC_BASE_URL + sample["SCRIPT_NAME"] + sample["PATH_INFO"]
    options = {"proof_of_possession_dpop": "optional", "proof_of_possession_mtls": "optional",
               "public_base_url": PUBLIC_BASE_URL}
    settings = ws.settings(**options)
    dpop_mw = CertBoundMiddleware(hello_app, settings, discovery=ws.discovery(settings))

    public, jwk = _huge_exponent_key()
    bound_token = ws.issuer.token(cnf={"jkt": _thumbprint(jwk)}, client_id="evil", exp=int(time.time()) + 3600)
    cases = [
        Case("floor", _Floor(), lambda _r: base, iterations, "200"),
        Case("dpop", dpop_mw, _proofs(client, token, iterations, base, htu), iterations, "200"),
        Case("hostile-stolen", dpop_mw, _hostile(jwk, token, base, htu), iterations, "401"),
        Case("hostile-bound", dpop_mw, _hostile(jwk, bound_token, base, htu), iterations, "401"),
        Case("hostile-verify", _HostileVerify(public), lambda _r: base, max(1, iterations // 20), "401"),
    ]
    if redis_url:
        shared = ws.settings(**options, redis_url=redis_url, cache_secret="bench-cache-secret-0123456789")
        redis_mw = CertBoundMiddleware(hello_app, shared, discovery=ws.discovery(shared))
        cases.append(Case("dpop-redis", redis_mw, _proofs(client, token, iterations, base, htu), iterations, "200"))
    statuses = {case.name: _status(case) for case in cases}
    for case in cases:
        loop_us(case.app, case.environ(-1), max(1, case.iterations // 10))
    for r in range(rounds):
        shift = r % len(cases)
        for case in [*cases[shift:], *cases[:shift]]:
            case.samples.append(loop_us(case.app, case.environ(r), case.iterations))
    by_name = {case.name: case for case in cases}

    def ratio(a: str, b: str) -> float:
        return median([x / y for x, y in zip(by_name[a].samples, by_name[b].samples, strict=True)])

    result: dict[str, Any] = {
        "rounds": rounds,
        "iterations": {case.name: case.iterations for case in cases},
        "median_us": {case.name: median(case.samples) for case in cases},
        "statuses": statuses,
        "dpop_over_floor": ratio("dpop", "floor"),
        "hostile_stolen_over_dpop": ratio("hostile-stolen", "dpop"),
        "hostile_bound_over_dpop": ratio("hostile-bound", "dpop"),
        "key_memo_entries": len(dpop_mw.dpop._keys) if dpop_mw.dpop is not None else 0,
    }
    if redis_url:
        result["dpop_redis_over_floor"] = ratio("dpop-redis", "floor")
    result["targets"] = {
        "dpop <= 1.5 x floor": result["dpop_over_floor"] <= 1.5,
        "hostile-stolen <= dpop": result["hostile_stolen_over_dpop"] <= 1.0,
        "hostile-bound <= dpop": result["hostile_bound_over_dpop"] <= 1.0,
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dpop", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--iterations", type=int, default=400, help="requests per sample")
    parser.add_argument("--redis", action="store_true", help="also time the replay store in a real redis-server")
    args = parser.parse_args(argv)
    ws = Workspace()
    if args.redis:
        from tests.support.redis_server import RedisServer

        server = RedisServer(ws.directory / "redis")
        try:
            result = run_dpop(ws, args.rounds, args.iterations, server.url)
        finally:
            server.stop()
    else:
        result = run_dpop(ws, args.rounds, args.iterations)
    result["command"] = " ".join(["python -m bench.dpop", *(argv if argv is not None else sys.argv[1:])])
    print(json.dumps(result, indent=2))
    return 0 if all(result["targets"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
