"""Issue 15 end to end: audit lines in a bare server's stderr, metrics summed over gunicorn workers,
health paths, and one readable line for a configuration error.

gunicorn and uWSGI run the shipped entry point (``certbound_wsgi.wsgi:application``), or the
documented ``/metrics`` recipe around it, behind the shipped nginx configuration, with no logging
configuration at all.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support.idp import OidcProvider, x5t_s256
from tests.support.idp_fixtures import Pki
from tests.support.procs import wait_until
from tests.support.servers import (
    DEFAULT_MODULE,
    PROXY_SECRET,
    UWSGI,
    Gunicorn,
    start_gunicorn,
    start_nginx,
    start_uwsgi,
)

from .conftest import Stack, app_env

MODULE = DEFAULT_MODULE
METRICS_MODULE = "tests.support.serve_metrics:application"


def _stack(tmp: Path, pki: Pki, upstream: str, env: dict[str, str], workers: int, module: str = MODULE) -> Stack:
    server: Gunicorn | UWSGI
    if upstream == "gunicorn":
        server = start_gunicorn(env, workers=workers, module=module, log_dir=tmp / "logs")
    else:
        server = start_uwsgi(env, processes=workers, module=module, log_dir=tmp / "logs")
    try:
        nginx = start_nginx(tmp / "nginx", upstream, server.backend, pki.server,  # type: ignore[arg-type]
                            proxy_secret=PROXY_SECRET)
    except BaseException:
        server.stop()
        raise
    return Stack(nginx, server, pki.ca_file)


@pytest.fixture(params=["gunicorn", "uwsgi"])
def audited(request: pytest.FixtureRequest, tmp_path: Path, pki: Pki, idp: OidcProvider) -> Iterator[Stack]:
    stack = _stack(tmp_path, pki, request.param, app_env(idp), workers=2)
    try:
        yield stack
    finally:
        stack.nginx.stop()
        stack.app_server.stop()


def _fields(line: str) -> dict[str, str]:
    return dict(re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line))


def _audit_line(stack: Stack, reason: str) -> dict[str, str]:
    marker = f"reason={reason} "
    assert wait_until(lambda: marker in stack.app_server.output(), timeout=10), stack.app_server.output()
    line = next(line for line in stack.app_server.output().splitlines() if marker in line)
    assert line.startswith("certbound outcome="), line
    return _fields(line)


def test_a_stolen_token_and_a_missing_one_are_logged_with_their_fields(audited: Stack, idp: OidcProvider,
                                                                       pki: Pki) -> None:
    token = idp.token("bound")
    # Mallory replays alice's token with her own certificate, and claims to be someone else.
    response = audited.call(token, pki.mallory, path="/hello", headers={"X-Forwarded-For": "203.0.113.9",
                                                                          "X-Request-Id": "forged-by-client"})
    assert response.status_code == 401
    assert audited.call(None, pki.alice, path="/nothing").status_code == 401

    stolen = _audit_line(audited, "cert_mismatch")
    assert stolen["outcome"] == "refused" and stolen["status"] == "401"
    assert stolen["method"] == "GET" and stolen["path"] == "/hello"
    assert stolen["bound"] == x5t_s256(pki.alice)
    assert stolen["presented"] == x5t_s256(pki.mallory)
    assert stolen["sub"] and stolen["client_id"] == "bound" and stolen["jti"]
    assert stolen["client"] == "127.0.0.1"  # nginx's view, not the client's X-Forwarded-For
    assert re.fullmatch(r"[0-9a-f]{16}", stolen["request_id"])  # generated: nginx forwards no request id

    missing = _audit_line(audited, "token_missing")
    assert missing["outcome"] == "refused" and missing["path"] == "/nothing"
    assert missing["presented"] == x5t_s256(pki.alice)
    assert token not in audited.app_server.output()
    assert token.split(".")[1] not in audited.app_server.output()


def _counter(text: str, reason: str) -> float:
    match = re.search(rf'^certbound_requests_total{{outcome="refused",reason="{reason}"}} (\S+)$', text, re.M)
    assert match, text
    return float(match.group(1))


@pytest.mark.parametrize("upstream", ["gunicorn", "uwsgi"])
def test_metrics_from_four_workers_are_summed(tmp_path: Path, pki: Pki, idp: OidcProvider, upstream: str) -> None:
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    env = {**app_env(idp), "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    stack = _stack(tmp_path, pki, upstream, env, workers=4, module=METRICS_MODULE)
    # gunicorn directly, a new connection each, so that the kernel hands them to different
    # workers; uWSGI through nginx, which opens a new uwsgi connection per request.
    base = f"http://127.0.0.1:{stack.app_server.port}" if upstream == "gunicorn" else stack.nginx.url

    def get(path: str) -> requests.Response:
        if upstream == "gunicorn":
            return requests.get(base + path, timeout=10, headers={"Connection": "close"})
        return stack.call(None, pki.alice, path=path, headers={"Connection": "close"})

    try:
        # Concurrent batches until at least two workers have answered: sequential requests
        # may all be accepted by the same idle worker.
        sent = 0
        pids: set[str] = set()
        with ThreadPoolExecutor(max_workers=8) as pool:
            while len(pids) < 2 and sent < 400:
                statuses = list(pool.map(lambda _: get("/spread").status_code, range(40)))
                assert statuses == [401] * 40
                sent += 40
                pids = {path.stem.rsplit("_", 1)[-1] for path in metrics_dir.glob("counter_*.db")}
        assert len(pids) >= 2, f"{sent} requests reached only {pids}"
        values = set()
        for _ in range(8):  # whichever worker answers the scrape, the answer is the sum
            scrape = get("/metrics")
            assert scrape.status_code == 200
            assert scrape.headers["Content-Type"].startswith("text/plain")
            values.add(_counter(scrape.text, "token_missing"))
        assert values == {float(sent)}
        assert re.search(rf'^certbound_request_duration_seconds_count{{outcome="refused"}} {sent}.0$', scrape.text,
                         re.M)
    finally:
        stack.nginx.stop()
        stack.app_server.stop()


def test_json_audit_format_is_one_option_away(tmp_path: Path, pki: Pki, idp: OidcProvider) -> None:
    stack = _stack(tmp_path, pki, "gunicorn", app_env(idp, audit_log_format="json"), workers=1)
    try:
        assert stack.call(None, pki.alice, path="/json").status_code == 401
        assert wait_until(lambda: '"reason":"token_missing"' in stack.app_server.output(), timeout=10)
        line = next(line for line in stack.app_server.output().splitlines() if '"reason":"token_missing"' in line)
        event = json.loads(line)
        assert event["outcome"] == "refused" and event["status"] == 401 and event["path"] == "/json"
    finally:
        stack.nginx.stop()
        stack.app_server.stop()


def _doc_recipe(marker: str) -> str:
    """The Python block of docs/operations.md that contains ``marker``, to run as written."""
    page = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```$", page, re.M | re.S)
    return next(block for block in blocks if marker in block)


@pytest.mark.parametrize(("reachable", "status"), [pytest.param(True, 200, id="idp-up"),
                                                   pytest.param(False, 503, id="idp-down")])
def test_the_documented_readiness_recipe(monkeypatch: pytest.MonkeyPatch, idp: OidcProvider, reachable: bool,
                                         status: int) -> None:
    from werkzeug.test import Client

    from tests.support.procs import free_port

    for name in [name for name in os.environ if name.startswith("CERTBOUND_")]:
        monkeypatch.delenv(name)
    env = app_env(idp)
    if not reachable:
        env["CERTBOUND_ISSUER"] = f"https://127.0.0.1:{free_port()}"  # nothing listens there
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    namespace: dict[str, object] = {}
    exec(_doc_recipe("Readiness("), namespace)  # noqa: S102  # our own documentation
    client = Client(namespace["application"])  # type: ignore[arg-type]
    response = client.get("/readyz")
    assert response.status_code == status
    body = response.json
    assert body == {"status": "ready" if reachable else "unavailable",
                    "checks": {"keys": "off", "issuer": "ok" if reachable else "down", "redis": "off"}}
    assert ("Retry-After" in response.headers) is (not reachable)
    assert client.get("/healthz").status_code == 200
    assert client.get("/anything").status_code == 401  # everything else stays protected


def test_the_documented_metrics_mount(monkeypatch: pytest.MonkeyPatch, idp: OidcProvider) -> None:
    from werkzeug.test import Client

    for name in [name for name in os.environ if name.startswith("CERTBOUND_")]:
        monkeypatch.delenv(name)
    for name, value in app_env(idp).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    namespace: dict[str, object] = {}
    exec(_doc_recipe('{"/metrics": metrics_app}'), namespace)  # noqa: S102  # our own documentation
    client = Client(namespace["application"])  # type: ignore[arg-type]
    scrape = client.get("/metrics")
    assert scrape.status_code == 200
    assert "# TYPE certbound_requests_total counter" in scrape.get_data(as_text=True)
    assert client.get("/anything").status_code == 401


@pytest.mark.parametrize("server", ["gunicorn", "uwsgi"])
def test_refusals_go_to_the_servers_stderr(tmp_path: Path, idp: OidcProvider, server: str) -> None:
    """stdout and stderr apart: the audit line is on stderr, where both servers' logs go."""
    import sys

    from tests.support.procs import Process, free_port, wait_for_port
    from tests.support.servers import REPO_ROOT

    port = free_port()
    binary = str(Path(sys.executable).parent / server)
    if server == "gunicorn":
        argv = [binary, MODULE, "--bind", f"127.0.0.1:{port}", "--workers", "1"]
    else:
        argv = [binary, "--strict", "--master", "--processes", "1", "--need-app", "--die-on-term",
                "--http-socket", f"127.0.0.1:{port}", "--module", MODULE, "--virtualenv", sys.prefix]
    stderr = tmp_path / "stderr.log"
    env = {key: value for key, value in os.environ.items() if not key.startswith("CERTBOUND_")}
    env.update(app_env(idp), PYTHONPATH=str(REPO_ROOT))
    process = Process(["sh", "-c", 'exec "$@" 2>"$STDERR_LOG"', "sh", *argv], tmp_path / "stdout.log",
                      env={**env, "STDERR_LOG": str(stderr)}, cwd=REPO_ROOT)
    try:
        wait_for_port(port, proc=process.proc, log=stderr)
        assert wait_until(lambda: _get_status(port) == 401, timeout=20), stderr.read_text()
        assert wait_until(lambda: "reason=token_missing" in stderr.read_text(), timeout=10), stderr.read_text()
        assert "reason=token_missing" not in process.output()
    finally:
        process.stop()


def _get_status(port: int) -> int | None:
    try:
        return requests.get(f"http://127.0.0.1:{port}/private", timeout=5).status_code
    except requests.ConnectionError:
        return None


# -- the real wiring: options, not wrappers ----------------------------------------------------------------------


class _From(requests.adapters.HTTPAdapter):
    """Connect from another loopback address, so that nginx's view of the client differs from gunicorn's
    view of nginx (127.0.0.1)."""

    def __init__(self, source: str) -> None:
        self._source = source
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["source_address"] = (self._source, 0)
        super().init_poolmanager(*args, **kwargs)


@pytest.mark.parametrize("upstream", ["gunicorn", "uwsgi"])
def test_the_client_address_and_request_id_come_from_nginx(tmp_path: Path, pki: Pki, idp: OidcProvider,
                                                           upstream: str) -> None:
    """The client's address is nginx's view (X-Forwarded-For's last entry from a trusted peer, or uWSGI's
    REMOTE_ADDR), never what the client wrote; the request id is nginx's $request_id once trusted."""
    env = app_env(idp, audit_trust_request_id="true")
    stack = _stack(tmp_path, pki, upstream, env, workers=1)
    try:
        with requests.Session() as session:
            session.mount("https://", _From("127.0.0.2"))
            response = session.get(stack.nginx.url + "/from-elsewhere", cert=pki.alice.pair, verify=stack.ca_file,
                                   timeout=15, headers={"X-Forwarded-For": "203.0.113.9",
                                                        "X-Request-Id": "forged-by-client"})
        assert response.status_code == 401
        line = _audit_line(stack, "token_missing")
        assert line["client"] == "127.0.0.2"
        assert re.fullmatch(r"[0-9a-f]{32}", line["request_id"]), line  # nginx's $request_id
    finally:
        stack.nginx.stop()
        stack.app_server.stop()


@pytest.mark.parametrize("upstream", ["gunicorn", "uwsgi"])
def test_health_paths_and_public_paths_pass_without_a_token(tmp_path: Path, pki: Pki, idp: OidcProvider,
                                                            upstream: str) -> None:
    env = app_env(idp, readiness_path="/readyz", liveness_path="/healthz", public_paths="/static/")
    stack = _stack(tmp_path, pki, upstream, env, workers=1)
    try:
        live = stack.call(None, None, path="/healthz")
        assert (live.status_code, live.json()) == (200, {"status": "ok"})
        ready = stack.call(None, None, path="/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json() == {"status": "ready", "checks": {"issuer": "ok", "keys": "ok", "redis": "off"}}
        assert stack.call(None, None, path="/static/app.css").status_code == 200  # the echo app answered
        assert stack.call(None, None, path="/static/../private").status_code == 401
        assert stack.call(None, None, path="/private").status_code == 401
    finally:
        stack.nginx.stop()
        stack.app_server.stop()


def test_readiness_is_503_with_the_documented_body_when_the_issuer_is_down(tmp_path: Path, pki: Pki,
                                                                           idp: OidcProvider) -> None:
    from tests.support.procs import free_port

    env = app_env(idp, readiness_path="/readyz", liveness_path="/healthz")
    env["CERTBOUND_ISSUER"] = f"https://127.0.0.1:{free_port()}"  # nothing listens there
    stack = _stack(tmp_path, pki, "gunicorn", env, workers=1)
    try:
        ready = stack.call(None, None, path="/readyz")
        assert ready.status_code == 503
        assert ready.headers["Retry-After"].isdigit()
        assert ready.json() == {"status": "unavailable", "checks": {"issuer": "down", "keys": "down", "redis": "off"}}
        assert stack.call(None, None, path="/healthz").status_code == 200  # alive, only not ready
    finally:
        stack.nginx.stop()
        stack.app_server.stop()


def _start_with(tmp_path: Path, server: str, env: dict[str, str], workers: int) -> tuple[int, str]:
    """Start ``server`` with ``env`` and no logging configuration; its exit status and its stderr."""
    import subprocess
    import sys

    from tests.support.procs import free_port
    from tests.support.servers import REPO_ROOT

    binary = str(Path(sys.executable).parent / server)
    if server == "gunicorn":
        argv = [binary, MODULE, "--bind", f"127.0.0.1:{free_port()}", "--workers", str(workers)]
    else:
        argv = [binary, "--strict", "--master", "--processes", str(workers), "--need-app", "--die-on-term",
                "--http-socket", f"127.0.0.1:{free_port()}", "--module", MODULE, "--virtualenv", sys.prefix]
    clean = {key: value for key, value in os.environ.items() if not key.startswith("CERTBOUND_")}
    result = subprocess.run(argv, env={**clean, **env, "PYTHONPATH": str(REPO_ROOT)}, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, check=False)
    return result.returncode, result.stderr


@pytest.mark.parametrize("server", ["gunicorn", "uwsgi"])
def test_a_typo_in_one_variable_is_one_line_not_a_traceback_per_worker(tmp_path: Path, idp: OidcProvider,
                                                                       server: str) -> None:
    env = app_env(idp)
    env["CERTBOUND_AUDIENSE"] = env.pop("CERTBOUND_AUDIENCE")
    status, stderr = _start_with(tmp_path, server, env, workers=4)
    ours = [line for line in stderr.splitlines() if "certbound" in line.lower()]
    assert ours == ["certbound-wsgi: ConfigurationError: audiense: CERTBOUND_AUDIENSE is not a known option; "
                    "did you mean CERTBOUND_AUDIENCE?"], stderr
    assert "Traceback" not in stderr and 'File "' not in stderr
    assert status == 4  # gunicorn's "App failed to load": it stops instead of booting workers forever
    if server == "gunicorn":
        assert "Reason: App failed to load." in stderr


def test_the_metrics_module_is_the_documented_recipe() -> None:
    module = (Path(__file__).resolve().parents[1] / "support" / "serve_metrics.py").read_text()
    recipe = _doc_recipe('{"/metrics": metrics_app}')
    assert recipe in module
