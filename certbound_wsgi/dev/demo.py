"""``certbound-wsgi demo``: certificate-bound tokens, shown end to end on loopback.

Everything is throwaway and development-only: a CA in a temporary directory, a
development issuer (:mod:`certbound_wsgi.dev.issuer`) and the echo app behind
:class:`~certbound_wsgi.CertBoundMiddleware`, both served over mutual TLS by
:mod:`certbound_wsgi.dev.server`. Alice obtains a token bound to her certificate
(RFC 8705 section 3.1); the demo then presents it with her certificate, with
Mallory's, and with none, and checks that only the first gets through.
"""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import shlex
import signal
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import requests

from .. import CertBoundMiddleware, Settings
from ..certificates import thumbprint_from_pem
from .echo import echo_app
from .issuer import DevIssuer
from .pki import DevCA, Issued
from .server import DevServer, server_ssl_context

__all__ = ["run_demo"]

AUDIENCE = "https://api.demo"
RESOURCE_PATH = "/hello"
# Everything is on loopback; a stuck call means a bug, not a slow network.
TIMEOUT = 10.0


@dataclass(frozen=True)
class _Step:
    title: str
    cert: Issued | None
    expected_status: int
    expected_error: str | None


@dataclass(frozen=True)
class _Outcome:
    status: int
    error: str | None
    description: str | None
    body: dict[str, Any] | None


def _call(method: str, url: str, *, ca: Path, cert: Issued | None, **kwargs: Any) -> requests.Response:
    """One request on a fresh connection, trusting only the demo CA.

    A fresh session per call: the replayed token must arrive on a new TLS
    connection with the other client's certificate, not on a pooled one.
    ``trust_env`` is off so that proxy variables cannot route loopback traffic
    elsewhere, and ``verify`` is passed on every call because a session-level
    ``verify`` loses to ``REQUESTS_CA_BUNDLE``.
    """
    with requests.Session() as session:
        session.trust_env = False
        return session.request(
            method, url, verify=str(ca), cert=cert.pair if cert else None, timeout=TIMEOUT, **kwargs
        )


def _json_body(response: requests.Response) -> dict[str, Any] | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _outcome(response: requests.Response) -> _Outcome:
    body = _json_body(response)
    error = body.get("error") if body else None
    description = body.get("error_description") if body else None
    return _Outcome(
        response.status_code,
        error if isinstance(error, str) else None,
        description if isinstance(description, str) else None,
        body,
    )


def _truncated(token: str) -> str:
    return f"{token[:16]}...{token[-6:]} ({len(token)} characters)"


def _unverified_claims(token: str) -> dict[str, Any]:
    """The payload of a JWT, for display only: nothing here is verified."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return {}
    return claims if isinstance(claims, dict) else {}


def _curl(api_url: str, ca: Path, cert: Issued | None, token: str) -> str:
    words = ["curl", "--cacert", str(ca)]
    if cert is not None:
        words += ["--cert", str(cert.cert_path), "--key", str(cert.key_path)]
    words += ["-H", f"Authorization: Bearer {token}", api_url + RESOURCE_PATH]
    return shlex.join(words)


def _fetch_token(issuer_url: str, ca: Path, alice: Issued) -> str:
    """Discovery, then the client_credentials grant at the mTLS token endpoint (RFC 8705 section 5)."""
    metadata = _call("GET", f"{issuer_url}/.well-known/openid-configuration", ca=ca, cert=None)
    metadata.raise_for_status()
    document = metadata.json()
    token_endpoint = document.get("mtls_endpoint_aliases", {}).get("token_endpoint") or document["token_endpoint"]
    response = _call(
        "POST",
        token_endpoint,
        ca=ca,
        cert=alice,
        data={"grant_type": "client_credentials", "client_id": "alice", "scope": "demo"},
    )
    if response.status_code != 200:
        raise RuntimeError(f"token request failed: HTTP {response.status_code} {response.text.strip()}")
    token = response.json().get("access_token")
    if not isinstance(token, str):
        raise RuntimeError("token response has no access_token")
    return token


def _show(index: int, step: _Step, outcome: _Outcome) -> list[str]:
    """Print one step; return what went wrong with it (empty when as expected)."""
    problems: list[str] = []
    if outcome.status != step.expected_status:
        problems.append(f"step {index}: HTTP {outcome.status}, expected {step.expected_status}")
    if step.expected_error is not None and outcome.error != step.expected_error:
        problems.append(f"step {index}: error {outcome.error!r}, expected {step.expected_error!r}")
    mark = "ok" if not problems else "UNEXPECTED"
    print(f"[{index}] {step.title}")
    print(f"    -> HTTP {outcome.status} (expected {step.expected_status}) {mark}")
    if outcome.status == 200 and outcome.body is not None:
        claims = outcome.body.get("claims") or {}
        print(
            f"    the app saw REMOTE_USER={outcome.body.get('remote_user')}"
            f" certbound.thumbprint={outcome.body.get('thumbprint')}"
            f" scope={claims.get('scope') if isinstance(claims, dict) else None!r}"
        )
    if outcome.error or outcome.description:
        print(f"    error={outcome.error} error_description={outcome.description!r}")
    return problems


def _serve_until_interrupted(
    api_url: str, issuer_url: str, ca: Path, alice: Issued, mallory: Issued, token: str
) -> None:
    print()
    print("Still serving. Try it yourself (the token expires in a few minutes):")
    print()
    print("  # alice, with her certificate: 200")
    print("  " + _curl(api_url, ca, alice, token))
    print("  # replayed with mallory's certificate: 401")
    print("  " + _curl(api_url, ca, mallory, token))
    print("  # a fresh token for alice")
    fresh = [
        "curl", "--cacert", str(ca), "--cert", str(alice.cert_path), "--key", str(alice.key_path),
        "-d", "grant_type=client_credentials", f"{issuer_url}/token",
    ]
    print("  " + shlex.join(fresh))
    print()
    previous = None
    if threading.current_thread() is threading.main_thread():
        # SIGTERM would otherwise end the process without removing the keys.
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            print("Press Ctrl-C to stop; the certificates are deleted on exit.", flush=True)
            threading.Event().wait()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print()
    print("Stopped; the temporary certificates and keys are removed.")


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_demo(once: bool = False, port: int = 0) -> int:
    """Run the demonstration; 0 when the binding held in all three cases, else 1.

    :param once: stop after the three requests instead of serving until Ctrl-C.
    :param port: port of the protected echo app; ``0`` picks a free one.
    """
    print("certbound-wsgi demo: RFC 8705 certificate-bound access tokens")
    print("DEVELOPMENT ONLY: throwaway CA, in-memory development issuer, loopback only.")
    print()
    with tempfile.TemporaryDirectory(prefix="certbound-demo-") as tmp, contextlib.ExitStack() as servers:
        directory = Path(tmp)
        ca = DevCA(directory)
        ca_path = ca.cert_path
        server_cert = ca.server(hosts=("localhost", "127.0.0.1"))
        alice = ca.client("alice")
        mallory = ca.client("mallory")
        context = server_ssl_context(server_cert.cert_path, server_cert.key_path, client_ca=ca_path)

        try:
            issuer_server = servers.enter_context(DevServer(context))
            # The certificate reaches the middleware as in production: with the proxy secret.
            proxy_secret = secrets.token_urlsafe(32)
            api_server = servers.enter_context(DevServer(context, port=port, proxy_secret=proxy_secret))
        except OSError as exc:
            print(f"demo: {exc}")
            return 1
        issuer_server.start(DevIssuer(issuer_server.url, audience=AUDIENCE))
        settings = Settings(issuer=issuer_server.url, audience=(AUDIENCE,), ca_file=str(ca_path),
                            proxy_secret=proxy_secret)
        api_server.start(CertBoundMiddleware(echo_app, settings))

        print(f"  issuer   {issuer_server.url}  (development-only issuer, mTLS token endpoint)")
        print(f"  api      {api_server.url}{RESOURCE_PATH}  (echo app behind CertBoundMiddleware, aud {AUDIENCE})")
        print(f"  CA       {ca_path}")
        print(f"  alice    x5t#S256 = {thumbprint_from_pem(alice.cert_pem)}")
        print(f"  mallory  x5t#S256 = {thumbprint_from_pem(mallory.cert_pem)}")
        print()

        try:
            token = _fetch_token(issuer_server.url, ca_path, alice)
        except (requests.RequestException, RuntimeError, KeyError, ValueError) as exc:
            print(f"[0] alice asks the issuer for a token: FAILED: {exc}")
            print()
            print("verdict: FAIL - could not obtain a token, nothing was shown")
            return 1
        cnf = _unverified_claims(token).get("cnf", {})
        print("[0] alice asks the issuer for a token, authenticating with her certificate")
        print(f"    token {_truncated(token)}")
        print(f"    bound to cnf.x5t#S256 = {cnf.get('x5t#S256') if isinstance(cnf, dict) else None}")

        steps = (
            _Step("alice's token with alice's certificate", alice, 200, None),
            _Step("the same token replayed with mallory's certificate", mallory, 401, "invalid_token"),
            _Step("the same token with no client certificate", None, 401, None),
        )
        problems: list[str] = []
        for index, step in enumerate(steps, start=1):
            try:
                response = _call(
                    "GET",
                    api_server.url + RESOURCE_PATH,
                    ca=ca_path,
                    cert=step.cert,
                    headers={"Authorization": f"Bearer {token}"},
                )
            except requests.RequestException as exc:
                print(f"[{index}] {step.title}")
                print(f"    -> request failed: {exc}")
                problems.append(f"step {index}: request failed: {exc}")
                continue
            problems += _show(index, step, _outcome(response))

        print()
        if problems:
            print("verdict: FAIL - " + "; ".join(problems))
            return 1
        print("verdict: PASS - the token worked only with the certificate it was bound to.")
        if not once:
            _serve_until_interrupted(api_server.url, issuer_server.url, ca_path, alice, mallory, token)
        return 0
