"""``python -m bench.soak``: a bounded soak run, mixed traffic with faults injected on a schedule.

Real servers, started here in a work directory of their own: oidc-provider (tokens,
JWKS, introspection), redis-server (the sealed L2 cache), gunicorn (4 sync workers,
``auth_methods=bearer,introspection``, ``cache_ttl_max=5`` so that introspection keeps
happening) behind nginx with mutual TLS, all on loopback. A few client threads keep
keep-alive sessions with real client certificates and send

* 90% legit requests: alice's bound JWT or opaque token with alice's certificate,
  mallory's own bound tokens with mallory's certificate, and tokens minted during the
  run (so that the cold paths, signature checks and introspections, keep running);
* 10% stolen or forged ones: alice's token with mallory's certificate or with none, a
  JWT signed by a foreign key, an expired JWT signed with the IdP's own key, a forged
  certificate header sent through nginx, a garbage opaque token, ``alg: none``.

Meanwhile, on a schedule repeated every :data:`CYCLE_SECONDS`: a gunicorn worker is
SIGKILLed, Redis is killed and restarted, Redis stalls (``DEBUG SLEEP 0.3``), the IdP is
stopped and started again, nginx is reloaded. Each fault's start and end are recorded.

The report (printed, and written to ``bench/results/soak.{md,json}``) says how many
requests were sent, whether any stolen or forged one was accepted (it must never be),
which legit ones were refused and why, whether any 5xx fell outside the documented
503 windows (the IdP down: 503 with ``Retry-After``), latency and throughput.
:func:`run_soak` runs the whole thing and returns the report, for ``tests/e2e/test_soak.py``.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import math
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

from certbound_wsgi.dev.pki import DevCA, Issued
from tests.e2e.conftest import foreign_key, mint
from tests.support.idp import API_RESOURCE, OPAQUE_RESOURCE, SECRETS, OidcProvider, x5t_s256
from tests.support.procs import wait_until
from tests.support.redis_server import RedisServer
from tests.support.servers import PROXY_SECRET, Gunicorn, Nginx, start_gunicorn, start_nginx

__all__ = ["CYCLE", "SoakConfig", "main", "render_markdown", "run_soak", "schedule"]

RESULTS = Path(__file__).resolve().parent / "results"
CACHE_SECRET = "soak-cache-secret-0123456789abcdef"
#: Seconds a client waits for an answer.
CLIENT_TIMEOUT = 10.0
#: One cycle of faults: (offset in the cycle, fault, seconds after its end that still count as its window).
CYCLE: tuple[tuple[float, str, float], ...] = (
    (3.0, "worker_kill", 3.0),     # a gunicorn worker SIGKILLed; ends when the master has replaced it
    (8.0, "redis_kill", 2.0),      # redis-server SIGKILLed, restarted (empty) 3 s later
    (16.0, "redis_sleep", 2.0),    # DEBUG SLEEP 0.3, three times, 0.5 s apart
    (20.0, "idp_stop", 3.0),       # oidc-provider stopped for 7 s (> cache_ttl_max), then started
    (34.0, "nginx_reload", 2.0),   # SIGHUP: new nginx workers, the old ones drained
)
CYCLE_SECONDS = 45.0
#: The shortest run with one whole cycle at its real pace; shorter runs compress the cycle.
ONE_CYCLE_RUN = 60.0
REDIS_DOWN_SECONDS = 3.0
IDP_DOWN_SECONDS = 7.0
#: The end of the run in which every legit request must succeed (all faults recovered).
FINAL_SECONDS = 5.0
#: A request slower than this is listed in the report.
SLOW_SECONDS = 1.0

LEGIT_KINDS = ("alice_jwt", "alice_opaque", "mallory_jwt", "mallory_opaque", "fresh")
ATTACK_KINDS = ("stolen_mallory_cert", "stolen_no_cert", "foreign_key", "expired", "forged_cert_header",
                "garbage_opaque", "alg_none")
#: Shares of the legit traffic (they sum to 1).
LEGIT_WEIGHTS = (0.35, 0.25, 0.15, 0.10, 0.15)


@dataclass(frozen=True)
class SoakConfig:
    seconds: float = 180.0
    threads: int = 8
    workers: int = 4
    #: gunicorn's worker class: ``sync`` (one request per worker) or ``gthread`` (``worker_threads`` each).
    worker_class: str = "sync"
    worker_threads: int = 1
    attack_share: float = 0.10
    cache_ttl_max: int = 5
    seed: int = 8705
    #: Seconds between two tokens minted during the run (cold paths).
    mint_every: float = 1.0


def schedule(seconds: float) -> list[tuple[float, str, float]]:
    """When each fault starts (seconds into the run), for a run of ``seconds``.

    One cycle per :data:`CYCLE_SECONDS` after the first :data:`ONE_CYCLE_RUN`; a run shorter
    than that gets one cycle, compressed. The last fault starts at least 40% of a cycle
    before the end, so that the end of the run shows recovery.
    """
    if seconds < ONE_CYCLE_RUN:
        scale = max(seconds, 10.0) / ONE_CYCLE_RUN
        return [(offset * scale, name, grace) for offset, name, grace in CYCLE]
    cycles = 1 + int((seconds - ONE_CYCLE_RUN) // CYCLE_SECONDS)
    return [(cycle * CYCLE_SECONDS + offset, name, grace) for cycle in range(cycles) for offset, name, grace in CYCLE]


# -- what is recorded ----------------------------------------------------------------------


@dataclass
class Fault:
    name: str
    #: Seconds since the run began.
    start: float
    end: float = 0.0
    #: Seconds after ``end`` that still count as the fault's window (breakers, back-offs, respawns).
    grace: float = 0.0
    detail: str = ""
    error: str | None = None

    @property
    def idp_outage(self) -> bool:
        return self.name == "idp_stop"

    def overlaps(self, t0: float, t1: float) -> bool:
        return t0 <= self.end + self.grace and t1 >= self.start


@dataclass
class Sample:
    kind: str
    legit: bool
    t0: float
    t1: float
    status: int | None
    from_app: bool = False
    error: str | None = None
    description: str | None = None
    retry_after: str | None = None
    #: What went wrong with a first attempt that was retried: an exception name, or "nginx <status>".
    first_failure: str | None = None
    #: A legit 200 whose echoed certificate thumbprint is not the one presented.
    wrong_identity: bool = False
    #: For a request with no HTTP answer: the exception of the last attempt.
    exception: str | None = None


# -- the stack -------------------------------------------------------------------------------


@dataclass
class Stack:
    directory: Path
    ca: DevCA
    alice: Issued
    mallory: Issued
    idp: OidcProvider
    redis: RedisServer
    gunicorn: Gunicorn
    nginx: Nginx

    @property
    def url(self) -> str:
        return self.nginx.url + "/anything"

    def gunicorn_workers(self) -> set[int]:
        pid = self.gunicorn.process.pid
        try:
            return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
        except OSError:
            return set()


def app_env(idp: OidcProvider, redis_url: str, cache_ttl_max: int) -> dict[str, str]:
    options = {
        "issuer": idp.issuer,
        "ca_file": idp.ca_file,
        "auth_methods": "bearer,introspection",
        "audience": f"{API_RESOURCE},{OPAQUE_RESOURCE}",
        "client_id": "rs-client",
        "client_secret": SECRETS["rs-client"],
        "redis_url": redis_url,
        "cache_secret": CACHE_SECRET,
        "cache_ttl_max": str(cache_ttl_max),
        "proxy_secret": PROXY_SECRET,
    }
    return {f"CERTBOUND_{name.upper()}": value for name, value in options.items()}


@contextmanager
def started_stack(directory: Path, config: SoakConfig) -> Iterator[Stack]:
    directory.mkdir(parents=True, exist_ok=True)
    ca = DevCA(directory / "pki")
    alice, mallory, server_cert = ca.client("alice"), ca.client("mallory"), ca.server()
    with ExitStack() as stack:
        idp = OidcProvider(directory / "idp", ca=ca, bound={"bound": alice, "bound2": mallory})
        stack.callback(idp.stop)
        idp.start()
        redis_server = RedisServer(directory / "redis", "--enable-debug-command", "yes")
        stack.callback(redis_server.stop)
        gunicorn = start_gunicorn(app_env(idp, redis_server.url, config.cache_ttl_max), workers=config.workers,
                                  worker_class=config.worker_class, threads=config.worker_threads,
                                  log_dir=directory / "gunicorn")
        stack.callback(gunicorn.stop)
        nginx = start_nginx(directory / "nginx", "gunicorn", gunicorn.backend, server_cert, proxy_secret=PROXY_SECRET)
        stack.callback(nginx.stop)
        yield Stack(directory, ca, alice, mallory, idp, redis_server, gunicorn, nginx)


# -- tokens ----------------------------------------------------------------------------------


class Tokens:
    """The legit tokens in use, renewed as a client would renew them; and the forged ones."""

    def __init__(self, stack: Stack) -> None:
        self._stack = stack
        self._lock = threading.Lock()
        #: Serialises every use of the IdP's client (the faults stop and start it).
        self.idp_lock = threading.Lock()
        self.minted = Counter[str]()
        idp = stack.idp
        self.alice_jwt = idp.token("bound")
        self.mallory_jwt = idp.token("bound2")
        self.alice_opaque = self._opaque("bound")
        self.mallory_opaque = self._opaque("bound2")
        #: (owner, token) minted during the run, the newest last.
        self.fresh: list[tuple[str, str]] = []
        self._next_fresh = 0
        self.forged = self._forge()

    def _opaque(self, client: str) -> str:
        token = self._stack.idp.token(client, resource=OPAQUE_RESOURCE)
        if token.count(".") == 2:
            raise RuntimeError("expected an opaque token from oidc-provider, got a JWT")
        return token

    def _forge(self) -> dict[str, list[str]]:
        idp = self._stack.idp
        cnf = {"x5t#S256": x5t_s256(self._stack.alice)}
        now = int(time.time())
        attacker, impostor = foreign_key("attacker"), foreign_key(idp.kid)
        none_header = {"alg": "none", "typ": "at+jwt", "kid": idp.kid}
        claims = {"iss": idp.issuer, "aud": API_RESOURCE, "sub": "bound", "client_id": "bound", "cnf": cnf,
                  "iat": now, "exp": now + 3600}

        def unsigned(n: int) -> str:
            body = {**claims, "jti": f"none-{n}"}
            return f"{_b64(none_header)}.{_b64(body)}."

        return {
            # An unknown kid, and the IdP's own kid on another key.
            "foreign_key": [mint(idp, key=key, cnf=cnf, sub="bound") for key in (attacker, impostor) for _ in range(3)],
            "expired": [mint(idp, cnf=cnf, sub="bound", iat=now - 4000 - n, exp=now - 3600 - n) for n in range(6)],
            "alg_none": [unsigned(n) for n in range(6)],
        }

    def legit(self, kind: str, rng: random.Random) -> tuple[str, str]:
        """``(owner, token)`` for a legit request of ``kind``."""
        with self._lock:
            if kind == "fresh" and self.fresh:
                return rng.choice(self.fresh)
            if kind in ("alice_jwt", "fresh"):
                return "alice", self.alice_jwt
            if kind == "alice_opaque":
                return "alice", self.alice_opaque
            if kind == "mallory_jwt":
                return "mallory", self.mallory_jwt
            return "mallory", self.mallory_opaque

    def alice_token(self, rng: random.Random) -> str:
        with self._lock:
            return rng.choice((self.alice_jwt, self.alice_opaque))

    def mint_fresh(self) -> None:
        """One new token, of each kind in turn, from the IdP (skipped while it is down)."""
        owner, client, resource = (("alice", "bound", API_RESOURCE), ("alice", "bound", OPAQUE_RESOURCE),
                                   ("mallory", "bound2", API_RESOURCE),
                                   ("mallory", "bound2", OPAQUE_RESOURCE))[self._next_fresh % 4]
        self._next_fresh += 1
        with self.idp_lock:
            try:
                token = self._stack.idp.token(client, resource=resource)
            except (requests.RequestException, AssertionError, RuntimeError):
                self.minted["failed"] += 1
                return
        self.minted["ok"] += 1
        with self._lock:
            self.fresh = [*self.fresh[-3:], (owner, token)]

    def reissue_opaque(self) -> None:
        """After an IdP restart: it forgot every opaque token, so the clients get new ones."""
        alice, mallory = self._opaque("bound"), self._opaque("bound2")
        with self._lock:
            self.alice_opaque, self.mallory_opaque = alice, mallory
            self.fresh = [(owner, token) for owner, token in self.fresh if token.count(".") == 2]
        self.minted["reissued"] += 2


def _b64(value: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


# -- traffic ---------------------------------------------------------------------------------


class Client:
    """One client thread: keep-alive sessions for alice's certificate, mallory's and none."""

    def __init__(self, stack: Stack, tokens: Tokens, config: SoakConfig, index: int, t0: float) -> None:
        self.stack = stack
        self.tokens = tokens
        self.config = config
        self.rng = random.Random(config.seed * 1000 + index)
        self.t0 = t0
        self.samples: list[Sample] = []
        self.sessions: dict[str, requests.Session] = {}
        for owner, cert in (("alice", stack.alice), ("mallory", stack.mallory), ("none", None)):
            session = requests.Session()
            session.trust_env = False  # no REQUESTS_CA_BUNDLE, no proxies: loopback only
            session.cert = cert.pair if cert is not None else None
            self.sessions[owner] = session
        self.thumbprints = {"alice": x5t_s256(stack.alice), "mallory": x5t_s256(stack.mallory)}
        self.alice_cert_header = quote(stack.alice.cert_pem, safe="")

    def close(self) -> None:
        for session in self.sessions.values():
            session.close()

    def run(self, deadline: float, max_requests: int) -> None:
        try:
            for _ in range(max_requests):
                if time.monotonic() >= deadline:
                    break
                self.one()
        finally:
            self.close()

    def one(self) -> None:
        if self.rng.random() < self.config.attack_share:
            kind = self.rng.choice(ATTACK_KINDS)
            owner, token, headers = self._attack(kind)
            legit = False
        else:
            kind = self.rng.choices(LEGIT_KINDS, LEGIT_WEIGHTS)[0]
            owner, token = self.tokens.legit(kind, self.rng)
            headers = {}
            legit = True
        headers["Authorization"] = f"Bearer {token}"
        session = self.sessions[owner]
        t0 = time.monotonic()
        response, exception = self._send(session, headers)
        first_failure = None
        if response is None or (response.status_code in (502, 504) and not _from_app(response)):
            # A connection dropped by an nginx reload, or a request in the hands of a killed
            # worker (nginx's own 502): a client retries an idempotent GET once.
            first_failure = exception if response is None else f"nginx {response.status_code}"
            response, exception = self._send(session, headers)
        t1 = time.monotonic()
        sample = Sample(kind, legit, t0 - self.t0, t1 - self.t0, None, first_failure=first_failure,
                        exception=exception)
        if response is not None:
            self._read(sample, response, owner)
        self.samples.append(sample)

    def _attack(self, kind: str) -> tuple[str, str, dict[str, str]]:
        rng, tokens = self.rng, self.tokens
        if kind == "stolen_mallory_cert":
            return "mallory", tokens.alice_token(rng), {}
        if kind == "stolen_no_cert":
            return "none", tokens.alice_token(rng), {}
        if kind == "forged_cert_header":
            # alice's certificate in the header nginx sets, and in a variant spelling nginx drops;
            # the TLS handshake shows mallory's certificate, or none.
            name = rng.choice(("X-SSL-Client-Cert", "X-SSL_Client-Cert", "x-ssl-client-cert"))
            return (rng.choice(("mallory", "none")), tokens.alice_token(rng),
                    {name: self.alice_cert_header, "X-SSL-Client-Verify": "SUCCESS"})
        if kind == "garbage_opaque":
            return "alice", secrets.token_urlsafe(rng.choice((16, 32, 43))), {}
        return "alice", rng.choice(tokens.forged[kind]), {}

    def _send(self, session: requests.Session,
              headers: dict[str, str]) -> tuple[requests.Response | None, str | None]:
        try:
            # verify= on the call: the machine's REQUESTS_CA_BUNDLE must never win.
            response = session.get(self.stack.url, headers=headers, verify=str(self.stack.ca.cert_path),
                                   timeout=CLIENT_TIMEOUT)
            _ = response.content
            return response, None
        except requests.RequestException as exc:
            return None, type(exc).__name__

    def _read(self, sample: Sample, response: requests.Response, owner: str) -> None:
        sample.status = response.status_code
        sample.from_app = _from_app(response)
        sample.retry_after = response.headers.get("Retry-After")
        if not sample.from_app:
            return
        try:
            body = response.json()
        except ValueError:
            sample.from_app = False
            return
        if response.status_code >= 400:
            sample.error = body.get("error")
            sample.description = body.get("error_description")
        elif sample.legit:
            sample.wrong_identity = body.get("thumbprint") != self.thumbprints.get(owner)


def _from_app(response: requests.Response) -> bool:
    return response.headers.get("Content-Type", "").startswith("application/json")


# -- faults ----------------------------------------------------------------------------------


class Faults:
    """Applies the schedule from one thread; every wait is bounded."""

    def __init__(self, stack: Stack, tokens: Tokens, t0: float, rng: random.Random) -> None:
        self.stack = stack
        self.tokens = tokens
        self.t0 = t0
        self.rng = rng
        self.done: list[Fault] = []

    def now(self) -> float:
        return time.monotonic() - self.t0

    def run(self, plan: list[tuple[float, str, float]], stop: threading.Event) -> None:
        for start, name, grace in plan:
            if stop.wait(max(0.0, start - self.now())):
                return
            fault = Fault(name, self.now(), grace=grace)
            try:
                getattr(self, name)(fault)
            except Exception as exc:  # recorded in the report; the run goes on
                fault.error = f"{type(exc).__name__}: {exc}"
            fault.end = self.now()
            self.done.append(fault)

    def worker_kill(self, fault: Fault) -> None:
        before = self.stack.gunicorn_workers()
        victim = self.rng.choice(sorted(before))
        os.kill(victim, signal.SIGKILL)
        fault.detail = f"SIGKILL worker {victim}"
        if not wait_until(lambda: victim not in (now := self.stack.gunicorn_workers()) and len(now) >= len(before),
                          timeout=30):
            raise TimeoutError(f"gunicorn did not replace worker {victim}")

    def redis_kill(self, fault: Fault) -> None:
        self.stack.redis.kill()
        time.sleep(REDIS_DOWN_SECONDS)
        self.stack.redis.start()
        fault.detail = f"SIGKILL, restarted empty after {REDIS_DOWN_SECONDS:.0f}s"

    def redis_sleep(self, fault: Fault) -> None:
        client = self.stack.redis.client()
        try:
            for n in range(3):
                if n:
                    time.sleep(0.5)
                client.execute_command("DEBUG", "SLEEP", "0.3")
        finally:
            client.close()
        fault.detail = "DEBUG SLEEP 0.3, 3 times, 0.5s apart"

    def idp_stop(self, fault: Fault) -> None:
        with self.tokens.idp_lock:
            self.stack.idp.stop()
        time.sleep(IDP_DOWN_SECONDS)
        with self.tokens.idp_lock:
            self.stack.idp.start()
            self.tokens.reissue_opaque()
        fault.detail = f"stopped for {IDP_DOWN_SECONDS:.0f}s; it forgets its opaque tokens, new ones issued"

    def nginx_reload(self, fault: Fault) -> None:
        self.stack.nginx.reload()
        fault.detail = "SIGHUP, waited for the old workers to exit"


def _minter(tokens: Tokens, deadline: float, every: float, stop: threading.Event) -> None:
    for _ in range(int((deadline - time.monotonic()) / every) + 2):
        if stop.wait(every) or time.monotonic() >= deadline:
            return
        tokens.mint_fresh()


# -- the run ---------------------------------------------------------------------------------


def _warm_up(stack: Stack, tokens: Tokens) -> None:
    """The stack answers legit requests before the clock starts (every worker has the JWKS)."""
    with requests.Session() as session:
        session.trust_env = False
        for token in (tokens.alice_jwt, tokens.alice_opaque) * len(stack.gunicorn_workers()) * 2:
            response = session.get(stack.url, headers={"Authorization": f"Bearer {token}"}, cert=stack.alice.pair,
                                   verify=str(stack.ca.cert_path), timeout=CLIENT_TIMEOUT)
            if response.status_code != 200:
                raise RuntimeError(f"the stack refuses a legit request before the run: {response.status_code} "
                                   f"{response.text[:300]}")


def run_soak(seconds: float = 180.0, directory: Path | None = None, out: Path | None = None,
             config: SoakConfig | None = None, log: Callable[[str], object] = print) -> dict[str, Any]:
    """Start the stack, run the soak for ``seconds``, and return the report.

    :param directory: the servers' files and logs (default: a temporary directory, removed afterwards).
    :param out: where ``soak.md`` and ``soak.json`` go (default: not written).
    """
    config = config or SoakConfig()
    if seconds != config.seconds:
        config = SoakConfig(**{**asdict(config), "seconds": seconds})
    owned = directory is None
    workdir = Path(tempfile.mkdtemp(prefix="certbound-soak-")) if directory is None else directory
    load_before = os.getloadavg()
    try:
        with started_stack(workdir, config) as stack:
            log(f"soak: stack up (nginx {stack.nginx.url}, idp {stack.idp.issuer}, redis {stack.redis.url}); "
                f"running {config.seconds:.0f}s")
            samples, faults, minted, elapsed = _run(stack, config)
    finally:
        if owned:
            shutil.rmtree(workdir, ignore_errors=True)
    report = analyse(samples, faults, config, elapsed)
    report["minted"] = dict(minted)
    report["machine"] = _machine(load_before)
    if out is not None:
        write(report, out)
    return report


def _run(stack: Stack, config: SoakConfig) -> tuple[list[Sample], list[Fault], Counter[str], float]:
    tokens = Tokens(stack)
    _warm_up(stack, tokens)
    stop = threading.Event()
    t0 = time.monotonic()
    deadline = t0 + config.seconds
    clients = [Client(stack, tokens, config, i, t0) for i in range(config.threads)]
    faults = Faults(stack, tokens, t0, random.Random(config.seed))
    threads = [threading.Thread(target=c.run, args=(deadline, 100_000), name=f"soak-client-{i}", daemon=True)
               for i, c in enumerate(clients)]
    threads.append(threading.Thread(target=faults.run, args=(schedule(config.seconds), stop), name="soak-faults",
                                    daemon=True))
    threads.append(threading.Thread(target=_minter, args=(tokens, deadline, config.mint_every, stop),
                                    name="soak-minter", daemon=True))
    for thread in threads:
        thread.start()
    try:
        for thread in threads[: config.threads]:
            thread.join(max(0.0, deadline - time.monotonic()) + 2 * CLIENT_TIMEOUT + 5)
    finally:
        stop.set()
        for thread in threads[config.threads:]:
            thread.join(60)
    elapsed = time.monotonic() - t0
    stuck = [thread.name for thread in threads if thread.is_alive()]
    if stuck:
        raise RuntimeError(f"soak threads still running after the deadline: {stuck}")
    samples = sorted((s for c in clients for s in c.samples), key=lambda s: s.t0)
    return samples, faults.done, tokens.minted, elapsed


# -- the report ------------------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered), max(1, math.ceil(q * len(ordered)))) - 1]


def _window(sample: Sample, faults: list[Fault]) -> str:
    """The faults whose windows the request overlaps (``+``-joined), or ``outside``."""
    return "+".join(dict.fromkeys(f.name for f in faults if f.overlaps(sample.t0, sample.t1))) or "outside"


def _proxy_lost(status: int, from_app: bool, sample: Sample, faults: list[Fault]) -> bool:
    """nginx's own 502/504 for a request that a worker SIGKILLed (or a reload) took down with it."""
    return (status in (502, 504) and not from_app
            and any(f.name in ("worker_kill", "nginx_reload") and f.overlaps(sample.t0, sample.t1) for f in faults))


def _documented_503(sample: Sample, faults: list[Fault]) -> bool:
    return (sample.status == 503 and sample.from_app and sample.error == "temporarily_unavailable"
            and bool(sample.retry_after) and any(f.idp_outage and f.overlaps(sample.t0, sample.t1) for f in faults))


def analyse(samples: list[Sample], faults: list[Fault], config: SoakConfig, elapsed: float) -> dict[str, Any]:
    """The figures of the report, from every sample and fault."""
    legit = [s for s in samples if s.legit]
    attack = [s for s in samples if not s.legit]
    outside = [s for s in legit if _window(s, faults) == "outside"]
    final = [s for s in legit if s.t0 >= config.seconds - FINAL_SECONDS]

    def ok(s: Sample) -> bool:
        return s.status == 200 and s.from_app and not s.wrong_identity

    refused = Counter((s.status, s.description or s.error or s.exception or "(no JSON body)", _window(s, faults))
                      for s in legit if not ok(s))
    accepted = [s for s in attack if s.status is not None and s.status < 400]
    attack_by_kind: dict[str, Counter[str]] = {}
    for s in attack:
        answer = f"{s.status} {s.description or s.error or ''}".strip() if s.status else f"no answer {s.exception}"
        attack_by_kind.setdefault(s.kind, Counter())[answer] += 1

    undocumented: list[dict[str, Any]] = []
    for s in samples:
        answers: list[tuple[int, bool]] = []
        if s.first_failure and s.first_failure.startswith("nginx "):
            answers.append((int(s.first_failure.split()[1]), False))
        if s.status is not None and s.status >= 500:
            answers.append((s.status, s.from_app))
        for status, from_app in answers:
            if from_app and _documented_503(s, faults):
                continue
            if _proxy_lost(status, from_app, s, faults):
                continue  # a request in the hands of a killed worker: counted with the connection errors
            undocumented.append({"t": round(s.t0, 3), "kind": s.kind, "status": status, "from_app": from_app,
                                 "error": s.error if from_app else None, "retry_after": s.retry_after,
                                 "window": _window(s, faults)})

    in_503_window = [s for s in samples if any(f.idp_outage and f.overlaps(s.t0, s.t1) for f in faults)]
    retried = [s for s in samples if s.first_failure]
    unanswered = [s for s in samples
                  if s.status is None or (s.status is not None and _proxy_lost(s.status, s.from_app, s, faults))]
    connection = {
        "total": len(retried),
        "recovered_by_retry": len(retried) - len(unanswered),
        "unrecovered": len(unanswered),
        "by_kind": dict(Counter(s.first_failure for s in retried)),
        "by_window": dict(Counter(_window(s, faults) for s in retried)),
    }
    latencies = [(s.t1 - s.t0) * 1000 for s in samples]
    slow = [s for s in samples if s.t1 - s.t0 > SLOW_SECONDS]
    return {
        "config": asdict(config),
        "elapsed_s": round(elapsed, 1),
        "total_requests": len(samples),
        "requests_per_s": round(len(samples) / elapsed, 1) if elapsed else 0.0,
        "latency_ms": {"p50": round(_percentile(latencies, 0.50), 1), "p99": round(_percentile(latencies, 0.99), 1),
                       "max": round(max(latencies, default=float("nan")), 1)},
        "slow_requests": {"over_s": SLOW_SECONDS, "count": len(slow),
                          "by_window": dict(Counter(_window(s, faults) for s in slow)),
                          "examples": [{"t": round(s.t0, 3), "kind": s.kind, "status": s.status,
                                        "seconds": round(s.t1 - s.t0, 2)} for s in slow[:10]]},
        "legit": {
            "total": len(legit),
            "ok": sum(1 for s in legit if ok(s)),
            "refused": sum(1 for s in legit if not ok(s)),
            "wrong_identity": sum(1 for s in legit if s.wrong_identity),
            "by_kind": {kind: sum(1 for s in legit if s.kind == kind) for kind in LEGIT_KINDS},
            "refused_by": [{"status": status, "why": why, "window": window, "count": count}
                           for (status, why, window), count in sorted(refused.items(), key=lambda kv: -kv[1])],
            "outside_windows": {"total": len(outside), "ok": sum(1 for s in outside if ok(s)),
                                "success_rate": round(sum(1 for s in outside if ok(s)) / len(outside), 5)
                                if outside else None},
            "final_seconds": {"seconds": FINAL_SECONDS, "total": len(final), "ok": sum(1 for s in final if ok(s))},
        },
        "attack": {
            "total": len(attack),
            "accepted": len(accepted),
            "accepted_examples": [{"t": round(s.t0, 3), "kind": s.kind, "status": s.status} for s in accepted[:10]],
            "by_kind": {kind: dict(attack_by_kind.get(kind, {})) for kind in ATTACK_KINDS},
        },
        "five_xx": {
            "documented_503": sum(1 for s in samples if _documented_503(s, faults)),
            "outside_503_windows": len(undocumented),
            "outside_examples": undocumented[:20],
        },
        "window_503": {"requests": len(in_503_window), "answered_503": sum(1 for s in in_503_window
                                                                            if s.status == 503)},
        "connection_errors": connection,
        "faults": [{**asdict(f), "start": round(f.start, 2), "end": round(f.end, 2),
                    "recovered_after_s": _recovered_after(f, faults, legit, elapsed)} for f in faults],
        "timeline": _timeline(samples, faults, elapsed),
    }


def _recovered_after(fault: Fault, faults: list[Fault], legit: list[Sample], elapsed: float) -> float | None:
    """Seconds from the fault's end to the end of its last failed legit request before the next fault."""
    following = [f.start for f in faults if f.start > fault.start]
    until = min(following, default=elapsed)
    failed = [s.t1 for s in legit if fault.start <= s.t0 < until and not (s.status == 200 and s.from_app)]
    if not failed:
        return 0.0
    return round(max(0.0, max(failed) - fault.end), 2)


def _timeline(samples: list[Sample], faults: list[Fault], elapsed: float) -> list[dict[str, Any]]:
    """Per second: legit ok / refused, attacks, 503s and connection errors, and which fault was on."""
    rows: list[dict[str, Any]] = []
    for second in range(int(elapsed) + 1):
        rows.append({"s": second, "legit_ok": 0, "legit_refused": 0, "attack": 0, "503": 0, "conn": 0,
                     "fault": ",".join(f.name for f in faults if f.start < second + 1 and f.end >= second)})
    for s in samples:
        row = rows[min(int(s.t0), len(rows) - 1)]
        if s.legit:
            row["legit_ok" if s.status == 200 and s.from_app else "legit_refused"] += 1
        else:
            row["attack"] += 1
        row["503"] += s.status == 503
        row["conn"] += bool(s.first_failure) or s.status is None
    return rows


def _machine(load_before: tuple[float, float, float]) -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False,
                            cwd=root).stdout.strip() or "unknown"
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": len(os.sched_getaffinity(0)),
        "loadavg_before": " ".join(f"{x:.2f}" for x in load_before),
        "loadavg_after": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": sys.version.split()[0],
        "commit": commit,
    }


def render_markdown(report: dict[str, Any]) -> str:
    legit, attack, fx = report["legit"], report["attack"], report["five_xx"]
    conn, outside = report["connection_errors"], legit["outside_windows"]
    config, machine = report["config"], report.get("machine", {})
    rate = outside["success_rate"]
    lines = [
        "# Soak run",
        "",
        f"`python -m bench.soak --seconds {config['seconds']:g}"
        f"{' --gthread' if config['worker_class'] == 'gthread' else ''}` — {machine.get('date', '')}, "
        f"{machine.get('nproc', '?')} CPUs, load {machine.get('loadavg_before', '?')} before / "
        f"{machine.get('loadavg_after', '?')} after, commit {machine.get('commit', '?')}.",
        f"Stack: oidc-provider, redis-server, nginx (mTLS) → gunicorn {config['workers']} "
        f"{config['worker_class']} workers x {config['worker_threads']} threads, "
        f"`auth_methods=bearer,introspection`, `cache_ttl_max={config['cache_ttl_max']}`; "
        f"{config['threads']} client threads, {config['attack_share']:.0%} stolen or forged traffic.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| requests | {report['total_requests']} in {report['elapsed_s']} s ({report['requests_per_s']} req/s) |",
        f"| latency p50 / p99 / max | {report['latency_ms']['p50']} / {report['latency_ms']['p99']} / "
        f"{report['latency_ms']['max']} ms |",
        f"| requests slower than {report['slow_requests']['over_s']:g} s | {report['slow_requests']['count']} "
        f"{report['slow_requests']['by_window'] or ''} |",
        f"| **stolen or forged accepted** | **{attack['accepted']}** of {attack['total']} |",
        f"| legit ok / refused | {legit['ok']} / {legit['refused']} of {legit['total']} |",
        f"| legit success outside fault windows | {outside['ok']} / {outside['total']}"
        + (f" ({rate:.3%})" if rate is not None else "") + " |",
        f"| legit ok in the last {legit['final_seconds']['seconds']:g} s | {legit['final_seconds']['ok']} / "
        f"{legit['final_seconds']['total']} |",
        f"| **5xx outside the 503 windows** | **{fx['outside_503_windows']}** |",
        f"| documented 503 (Retry-After, IdP down) | {fx['documented_503']} |",
        f"| requests in a 503 window / answered 503 | {report['window_503']['requests']} / "
        f"{report['window_503']['answered_503']} |",
        f"| connection errors (retried once) | {conn['total']}: {conn['recovered_by_retry']} recovered, "
        f"{conn['unrecovered']} not |",
        f"| tokens minted during the run | {report.get('minted', {})} |",
        "",
        "## Faults",
        "",
        "| fault | start s | end s | window ends s | legit failures until | detail |",
        "|---|---|---|---|---|---|",
    ]
    for f in report["faults"]:
        recovered = "—" if f["recovered_after_s"] is None else f"end + {f['recovered_after_s']} s"
        detail = f["detail"] + (f" **ERROR: {f['error']}**" if f["error"] else "")
        lines.append(f"| {f['name']} | {f['start']} | {f['end']} | {f['end'] + f['grace']:.2f} | {recovered} "
                     f"| {detail} |")
    lines += ["", "## Legit requests refused", "", "| status | why | window | count |", "|---|---|---|---|"]
    lines += [f"| {r['status']} | {r['why']} | {r['window']} | {r['count']} |" for r in legit["refused_by"]] or [
        "| — | none | — | 0 |"]
    lines += ["", "## Stolen or forged requests, by answer", "", "| kind | answer | count |", "|---|---|---|"]
    lines += [f"| {kind} | {answer} | {count} |" for kind, counts in attack["by_kind"].items()
              for answer, count in sorted(counts.items(), key=lambda kv: -kv[1])]
    if fx["outside_examples"]:
        lines += ["", "## 5xx outside the 503 windows", "", "```", *map(json.dumps, fx["outside_examples"]), "```"]
    lines += ["", f"Connection errors by kind: {conn['by_kind']}; by window: {conn['by_window']}.", ""]
    return "\n".join(lines)


def write(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "soak.md").write_text(render_markdown(report))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=180.0, help="length of the run (default 180)")
    parser.add_argument("--threads", type=int, default=8, help="client threads (default 8)")
    parser.add_argument("--gthread", action="store_true",
                        help="2 gthread workers x 4 threads instead of 4 sync workers")
    parser.add_argument("--seed", type=int, default=SoakConfig.seed)
    parser.add_argument("--out", type=Path, default=RESULTS, help="where soak.md and soak.json go")
    parser.add_argument("--keep", type=Path, default=None, help="keep the servers' files and logs in this directory")
    args = parser.parse_args(argv)
    if args.seconds < 10 or args.seconds > 3600:
        parser.error("--seconds must be between 10 and 3600")
    workers = {"workers": 2, "worker_class": "gthread", "worker_threads": 4} if args.gthread else {}
    config = SoakConfig(seconds=args.seconds, threads=args.threads, seed=args.seed, **workers)
    report = run_soak(args.seconds, directory=args.keep, out=args.out, config=config,
                      log=lambda m: print(m, file=sys.stderr))
    print(render_markdown(report))
    print(f"written: {args.out / 'soak.md'}, {args.out / 'soak.json'}", file=sys.stderr)
    failed = report["attack"]["accepted"] or report["five_xx"]["outside_503_windows"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
