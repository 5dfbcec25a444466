"""DPoP-bound tokens end to end (RFC 9449): oidc-provider -> client -> nginx (TLS) -> gunicorn/uWSGI -> middleware.

The token comes from a real oidc-provider token request carrying a DPoP proof
(``cnf.jkt``). gunicorn runs 4 workers sharing this module's redis-server, so
a proof must be accepted exactly once whichever worker sees it, and a nonce
minted by one worker must be honoured by the others. Every request here opens a
new TLS connection, so nginx spreads them over the workers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

from tests.support.dpop import DPoPKey, ath
from tests.support.idp import OidcProvider, decode_jwt
from tests.support.procs import wait_until
from tests.support.redis_server import RedisServer
from tests.support.tokens import b64url

from .conftest import Stack, StackFactory, foreign_key

WORKERS = 4
SECRET = "dpop-e2e-secret-0123456789abcdef"
ALGS = "ES256 ES384 ES512 RS256 RS384 RS512 PS256 PS384 PS512 EdDSA"
P = "the DPoP proof's "
REPLAYED = "the DPoP proof has already been used"
AS_BEARER = "a DPoP-bound token must be sent with the DPoP scheme"
NONCE_REQUIRED = "a fresh DPoP nonce is required"
REDIS_DOWN = "DPoP replay protection is unavailable; try again shortly"


def assert_unavailable(response: requests.Response) -> None:
    """The replay store cannot be asked: a server fault, 503 with Retry-After, never 401 (issue 11 item 6)."""
    assert response.status_code == 503, response.text
    assert response.json() == {"error": "temporarily_unavailable", "error_description": REDIS_DOWN}
    assert response.headers["Retry-After"] == "2"
    assert response.headers["WWW-Authenticate"] == challenges()


# -- fixtures and helpers -----------------------------------------------------------------


def options(redis_server: RedisServer, **extra: str) -> dict[str, str]:
    # htu is checked against the stack's public URL (issue 11 item 4), never against Host.
    return {"proof_of_possession_dpop": "optional", "proof_of_possession_mtls": "optional",
            "redis_url": redis_server.url, "cache_secret": SECRET, "public_base_url": "{nginx_url}", **extra}


@pytest.fixture(scope="module")
def stack(stacks: StackFactory, idp: OidcProvider, redis_server: RedisServer) -> Stack:
    return stacks(idp, "gunicorn", workers=WORKERS, **options(redis_server))


@pytest.fixture(scope="module")
def nonce_stack(stacks: StackFactory, idp: OidcProvider, redis_server: RedisServer) -> Stack:
    return stacks(idp, "gunicorn", workers=WORKERS, **options(redis_server, dpop_use_nonce="true"))


@pytest.fixture(scope="module")
def key() -> DPoPKey:
    return DPoPKey()


@pytest.fixture(scope="module")
def token(idp: OidcProvider, key: DPoPKey) -> str:
    """A DPoP-bound access token from oidc-provider (the token endpoint's proof has no ath)."""
    token = idp.token("unbound", dpop=key.proof("POST", idp.token_endpoint))
    assert decode_jwt(token)[1]["cnf"] == {"jkt": key.jkt}
    return token


def htu(stack: Stack, path: str = "/anything") -> str:
    return stack.nginx.url + path


def call(stack: Stack, token: str, proof: str | None, *, scheme: str = "DPoP", method: str = "GET",
         path: str = "/anything") -> requests.Response:
    """One request on a new connection (a new session), ignoring the environment's proxies and CA bundle."""
    headers = {"Authorization": f"{scheme} {token}"}
    if proof is not None:
        headers["DPoP"] = proof
    with requests.Session() as session:
        session.trust_env = False
        return session.request(method, htu(stack, path), headers=headers, verify=stack.ca_file, timeout=15)


def concurrently(count: int, request: Callable[[int], requests.Response]) -> list[requests.Response]:
    """``count`` requests released at once by a barrier, each from its own thread and connection."""
    barrier = threading.Barrier(count)

    def run(index: int) -> requests.Response:
        barrier.wait(timeout=15)
        return request(index)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(run, range(count)))


def challenges(error_scheme: str | None = None, error: str = "", description: str = "") -> str:
    """The WWW-Authenticate challenges as requests joins them (optional mode: Bearer, then DPoP)."""
    bearer, dpop = 'Bearer realm="api"', f'DPoP realm="api", algs="{ALGS}"'
    params = f', error="{error}", error_description="{description}"'
    if error_scheme == "Bearer":
        bearer += params
    elif error_scheme == "DPoP":
        dpop += params
    return f"{bearer}, {dpop}"


def assert_refused(response: requests.Response, description: str, *, error: str = "invalid_dpop_proof",
                   scheme: str = "DPoP") -> None:
    assert response.status_code == 401, response.text
    assert response.json() == {"error": error, "error_description": description}
    assert response.headers["WWW-Authenticate"] == challenges(scheme, error, description)


def assert_passed(response: requests.Response, key: DPoPKey, idp: OidcProvider) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    body = dict(response.json())
    assert body["claims"]["cnf"]["jkt"] == key.jkt
    assert body["claims"]["iss"] == idp.issuer
    assert body["claims"]["client_id"] == "unbound"
    assert "Dpop" not in body["headers"] and "Authorization" not in body["headers"]
    return body


def alg_none(key: DPoPKey, stack: Stack, token: str) -> str:
    header = {"typ": "dpop+jwt", "alg": "none", "jwk": key.key.as_dict(private=False)}
    claims = {"jti": f"none-{time.monotonic_ns()}", "htm": "GET", "htu": htu(stack), "iat": int(time.time()),
              "ath": ath(token)}
    return f"{b64url(header)}.{b64url(claims)}."


# -- the legitimate request ------------------------------------------------------------------


def test_legit_request_passes(stack: Stack, idp: OidcProvider, key: DPoPKey, token: str) -> None:
    response = call(stack, token, key.proof("GET", htu(stack), token))
    body = assert_passed(response, key, idp)
    assert body["thumbprint"] is None
    assert body["method"] == "GET" and body["path"] == "/anything"
    assert "DPoP-Nonce" not in response.headers
    # POST to another path, with its own proof.
    response = call(stack, token, key.proof("POST", htu(stack, "/orders"), token), method="POST", path="/orders")
    assert assert_passed(response, key, idp)["path"] == "/orders"


def test_one_proof_is_accepted_once_across_workers(stack: Stack, idp: OidcProvider, key: DPoPKey,
                                                   token: str) -> None:
    proof = key.proof("GET", htu(stack), token)
    responses = concurrently(8, lambda _: call(stack, token, proof))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] + [401] * 7, [(r.status_code, r.text) for r in responses]
    for response in responses:
        if response.status_code == 200:
            assert_passed(response, key, idp)
        else:
            assert_refused(response, REPLAYED)
    # Later, still refused; a fresh proof still passes.
    assert_refused(call(stack, token, proof), REPLAYED)
    assert_passed(call(stack, token, key.proof("GET", htu(stack), token)), key, idp)


def test_fresh_proofs_in_parallel_all_pass(stack: Stack, idp: OidcProvider, key: DPoPKey, token: str) -> None:
    responses = concurrently(8, lambda _: call(stack, token, key.proof("GET", htu(stack), token)))
    assert [r.status_code for r in responses] == [200] * 8, [r.text for r in responses]


# -- refusals -----------------------------------------------------------------------------


REFUSED: list[Any] = [
    pytest.param(lambda k, s, t: k.proof("POST", htu(s), t), P + "htm does not match the request method",
                 "invalid_dpop_proof", "DPoP", id="wrong-htm"),
    pytest.param(lambda k, s, t: k.proof("GET", htu(s, "/other"), t), P + "htu does not match the request URI",
                 "invalid_dpop_proof", "DPoP", id="wrong-htu-path"),
    pytest.param(lambda k, s, t: k.proof("GET", htu(s).replace("https://", "http://"), t),
                 P + "htu does not match the request URI", "invalid_dpop_proof", "DPoP", id="wrong-htu-scheme"),
    pytest.param(lambda k, s, t: k.proof("GET", htu(s).replace("localhost", "127.0.0.1"), t),
                 P + "htu does not match the request URI", "invalid_dpop_proof", "DPoP", id="wrong-htu-host"),
    pytest.param(lambda k, s, t: k.proof("GET", htu(s), t, claims={"ath": ath(t + "x")}),
                 P + "ath does not match the access token", "invalid_dpop_proof", "DPoP", id="wrong-ath"),
    pytest.param(lambda k, s, t: k.proof("GET", htu(s), None), P + "ath claim is missing or invalid",
                 "invalid_dpop_proof", "DPoP", id="missing-ath"),
    pytest.param(lambda k, s, t: k.proof("GET", htu(s), t, iat=time.time() - 301),
                 P + "iat is outside the accepted window", "invalid_dpop_proof", "DPoP", id="expired-iat"),
    pytest.param(lambda k, s, t: k.proof("GET", htu(s), t, key=foreign_key()), P + "signature is invalid",
                 "invalid_dpop_proof", "DPoP", id="signed-by-another-key"),
    pytest.param(lambda k, s, t: DPoPKey().proof("GET", htu(s), t), P + "key does not match the token's cnf.jkt",
                 "invalid_dpop_proof", "DPoP", id="valid-proof-by-another-key"),
    pytest.param(lambda k, s, t: k.proof("GET", htu(s), t, private_jwk=True), P + "jwk contains a private key",
                 "invalid_dpop_proof", "DPoP", id="private-key-in-jwk"),
    pytest.param(alg_none, P + "algorithm is not accepted", "invalid_dpop_proof", "DPoP", id="alg-none"),
    pytest.param(lambda k, s, t: None, "a DPoP proof is required", "invalid_dpop_proof", "DPoP", id="no-proof"),
]


@pytest.mark.parametrize(("build", "description", "error", "scheme"), REFUSED)
def test_refused(build: Callable[[DPoPKey, Stack, str], str | None], description: str, error: str, scheme: str,
                 stack: Stack, key: DPoPKey, token: str) -> None:
    assert_refused(call(stack, token, build(key, stack, token)), description, error=error, scheme=scheme)


def test_dpop_token_sent_as_bearer_is_refused(stack: Stack, key: DPoPKey, token: str) -> None:
    # RFC 9449 section 7.2, even with a valid proof alongside.
    for proof in (None, key.proof("GET", htu(stack), token)):
        assert_refused(call(stack, token, proof, scheme="Bearer"), AS_BEARER, error="invalid_token",
                       scheme="Bearer")


# -- nonces ------------------------------------------------------------------------------


def test_nonce_flow_across_workers(nonce_stack: Stack, idp: OidcProvider, key: DPoPKey, token: str) -> None:
    first = call(nonce_stack, token, key.proof("GET", htu(nonce_stack), token))
    assert_refused(first, NONCE_REQUIRED, error="use_dpop_nonce")
    nonce = first.headers["DPoP-Nonce"]
    assert len(nonce) == 32
    retry = call(nonce_stack, token, key.proof("GET", htu(nonce_stack), token, nonce=nonce))
    assert_passed(retry, key, idp)
    assert "DPoP-Nonce" not in retry.headers
    # The one worker's nonce is good on every worker: fresh proofs, the same nonce, new connections.
    responses = concurrently(8, lambda _: call(nonce_stack, token,
                                               key.proof("GET", htu(nonce_stack), token, nonce=nonce)))
    assert [r.status_code for r in responses] == [200] * 8, [r.text for r in responses]
    # Without a nonce, or with a garbled one: a new challenge, whatever the worker.
    garbled = nonce[:5] + ("A" if nonce[5] != "A" else "B") + nonce[6:]
    for bad in (None, garbled):
        response = call(nonce_stack, token, key.proof("GET", htu(nonce_stack), token, nonce=bad))
        assert_refused(response, NONCE_REQUIRED, error="use_dpop_nonce")
        assert len(response.headers["DPoP-Nonce"]) == 32


def test_nonce_stack_still_refuses_replays(nonce_stack: Stack, idp: OidcProvider, key: DPoPKey,
                                           token: str) -> None:
    nonce = call(nonce_stack, token, key.proof("GET", htu(nonce_stack), token)).headers["DPoP-Nonce"]
    proof = key.proof("GET", htu(nonce_stack), token, nonce=nonce)
    responses = concurrently(4, lambda _: call(nonce_stack, token, proof))
    assert sorted(r.status_code for r in responses) == [200, 401, 401, 401]
    for response in responses:
        if response.status_code == 401:
            assert_refused(response, REPLAYED)


# -- Redis down: fail closed, then recover ----------------------------------------------------


def test_redis_killed_then_restarted(stack: Stack, idp: OidcProvider, key: DPoPKey, token: str,
                                     redis_server: RedisServer) -> None:
    assert_passed(call(stack, token, key.proof("GET", htu(stack), token)), key, idp)
    redis_server.kill()
    try:
        responses = concurrently(8, lambda _: call(stack, token, key.proof("GET", htu(stack), token)))
        for response in responses:
            assert_unavailable(response)
    finally:
        redis_server.start()
    time.sleep(1.2)  # the breaker

    def round_passes() -> bool:
        batch = concurrently(8, lambda _: call(stack, token, key.proof("GET", htu(stack), token)))
        for response in batch:
            if response.status_code != 200:
                assert_unavailable(response)  # a worker meeting its stale connection: still fails closed
        return all(r.status_code == 200 for r in batch)

    assert wait_until(round_passes, timeout=10, interval=0.5), "DPoP requests did not recover after Redis returned"
    # Recovered for good: replay protection is shared again.
    proof = key.proof("GET", htu(stack), token)
    responses = concurrently(8, lambda _: call(stack, token, proof))
    assert sorted(r.status_code for r in responses) == [200] + [401] * 7


# -- uWSGI ---------------------------------------------------------------------------------


def test_uwsgi_rebuilds_htu(stacks: StackFactory, idp: OidcProvider, key: DPoPKey, token: str,
                            redis_server: RedisServer) -> None:
    uwsgi = stacks(idp, "uwsgi", **options(redis_server))
    proof = key.proof("GET", htu(uwsgi), token)
    assert_passed(call(uwsgi, token, proof), key, idp)
    assert_refused(call(uwsgi, token, proof), REPLAYED)
    assert_refused(call(uwsgi, token, key.proof("GET", htu(uwsgi).replace("https://", "http://"), token)),
                   P + "htu does not match the request URI")


# -- issue 11 items 4 and 5 through nginx and gunicorn ----------------------------------------------------------


def _raw(stack: Stack, token: str, proof: str, host: str) -> requests.Response:
    """A request to nginx's address with another ``Host`` (the TLS connection and SNI stay 127.0.0.1's)."""
    with requests.Session() as session:
        session.trust_env = False
        return session.get(htu(stack), headers={"Authorization": f"DPoP {token}", "DPoP": proof, "Host": host},
                           verify=stack.ca_file, timeout=15)


@pytest.mark.parametrize("upstream", ["gunicorn", "uwsgi"])
def test_host_trick_is_refused(upstream: str, stacks: StackFactory, idp: OidcProvider, key: DPoPKey, token: str,
                               redis_server: RedisServer) -> None:
    """A proof made for another resource server, sent here with that server's Host: never accepted."""
    stack = stacks(idp, upstream, workers=WORKERS, **options(redis_server)) if upstream == "gunicorn" else \
        stacks(idp, upstream, **options(redis_server))
    for host in ("other-rs.example", "other-rs.example:443"):
        proof = key.proof("GET", "https://other-rs.example/anything", token)
        try:
            response = _raw(stack, token, proof, host)
        except requests.ConnectionError:
            continue  # nginx's default server closed the connection on the unknown Host (444): refused
        # nginx may refuse the unknown Host itself (4xx); the app refuses the proof; never 200, never 5xx.
        assert 400 <= response.status_code < 500, (response.status_code, response.text)
        if response.status_code == 401:
            assert_refused(response, P + "htu does not match the request URI")
    # The same client's proof for this server still passes.
    assert_passed(call(stack, token, key.proof("GET", htu(stack), token)), key, idp)


def _huge_exponent_jwk() -> dict[str, str]:
    from cryptography.hazmat.primitives.asymmetric import rsa

    n = rsa.generate_private_key(65537, 3072).public_key().public_numbers().n
    e = n - 2 if n % 2 else n - 1
    return {"kty": "RSA", "n": b64url(n.to_bytes(384)), "e": b64url(e.to_bytes((e.bit_length() + 7) // 8))}


def test_expensive_rsa_proof_with_a_stolen_token_is_refused(stack: Stack, idp: OidcProvider, key: DPoPKey,
                                                            token: str) -> None:
    """Issue 11 item 5: refused before any key import or signature work (bench.dpop measures its cost)."""
    header = {"typ": "dpop+jwt", "alg": "RS256", "jwk": _huge_exponent_jwk()}
    claims = {"jti": f"rsa-{time.monotonic_ns()}", "htm": "GET", "htu": htu(stack), "iat": int(time.time()),
              "ath": ath(token)}
    proof = f"{b64url(header)}.{b64url(claims)}.{b64url(b'x' * 384)}"
    assert_refused(call(stack, token, proof), "the DPoP proof's RSA key is not accepted: it needs e = 65537 and "
                   "at most 4096 bits")
    assert_passed(call(stack, token, key.proof("GET", htu(stack), token)), key, idp)
