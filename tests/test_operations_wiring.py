"""Issue 15 in the middleware: one audit event and one count per decision, public and health paths.

Driven through werkzeug's test client with the in-memory issuer; the end-to-end tests repeat the
essentials under real gunicorn and uWSGI (tests/e2e/test_operations.py).
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import REGISTRY
from werkzeug.test import Client

from certbound_wsgi.dev.pki import Issued
from certbound_wsgi.middleware import CertBoundMiddleware
from tests.conftest import TEST_PROXY_SECRET, CountingApp, MakeClient, bearer, cert_env, make_settings, middleware_of
from tests.support.session_options import SESSION
from tests.support.tokens import ISSUER, StaticDiscovery, TestIssuer, other_keys

AUDIT = "certbound_wsgi.audit"


def fields(line: str) -> dict[str, str]:
    return {key: value.strip('"') for key, value in re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line)}


@pytest.fixture()
def events(caplog: pytest.LogCaptureFixture) -> Callable[[], list[tuple[int, dict[str, str]]]]:
    """The audit events logged so far: (level, fields)."""
    caplog.set_level(logging.DEBUG, logger="certbound_wsgi")

    def read() -> list[tuple[int, dict[str, str]]]:
        return [(r.levelno, fields(r.getMessage())) for r in caplog.records if r.name == AUDIT]

    return read


def count(outcome: str, reason: str) -> float:
    return REGISTRY.get_sample_value("certbound_requests_total", {"outcome": outcome, "reason": reason}) or 0.0


class Handles:
    """What a refusal row needs: tokens, certificates and the issuer."""

    def __init__(self, issuer: TestIssuer, alice: Issued, mallory: Issued, alice_x5t: str) -> None:
        self.issuer, self.alice, self.mallory, self.x5t = issuer, alice, mallory, alice_x5t

    def token(self, **claims: Any) -> str:
        return self.issuer.token(cnf={"x5t#S256": self.x5t}, jti="j-1", client_id="app", **claims)


REFUSALS: list[Any] = [
    pytest.param({}, lambda h: {}, 401, "token_missing", id="missing-token"),
    pytest.param({}, lambda h: {"headers": bearer("not-a-jwt")}, 401, "token_invalid", id="not-a-jwt"),
    pytest.param({}, lambda h: {"headers": bearer(h.token(exp=1)), "environ_overrides": cert_env(h.alice.cert_pem)},
                 401, "token_expired", id="expired"),
    pytest.param({}, lambda h: {"headers": bearer(h.token(nbf=2**31)),
                                "environ_overrides": cert_env(h.alice.cert_pem)},
                 401, "token_not_yet_valid", id="nbf"),
    pytest.param({}, lambda h: {"headers": bearer(h.token(aud="https://other.test")),
                                "environ_overrides": cert_env(h.alice.cert_pem)}, 401, "audience_mismatch", id="aud"),
    pytest.param({}, lambda h: {"headers": bearer(h.token(iss="https://other.test")),
                                "environ_overrides": cert_env(h.alice.cert_pem)}, 401, "issuer_mismatch", id="iss"),
    pytest.param({}, lambda h: {"headers": bearer(h.issuer.token(header={"kid": "rotated-away"}))}, 401,
                 "key_unknown", id="unknown-kid"),
    pytest.param({}, lambda h: {"headers": bearer(h.issuer.token(key=other_keys()["ec"]))}, 401, "token_invalid",
                 id="bad-signature"),
    pytest.param({}, lambda h: {"headers": bearer(h.token()), "environ_overrides": cert_env(h.mallory.cert_pem)},
                 401, "cert_mismatch", id="stolen"),
    pytest.param({}, lambda h: {"headers": bearer(h.token())}, 401, "cert_missing", id="no-certificate"),
    pytest.param({}, lambda h: {"headers": bearer(h.issuer.token()), "environ_overrides": cert_env(h.alice.cert_pem)},
                 401, "claim_missing", id="unbound"),
    pytest.param({"bearer_token_param_type": ["header", "query"]},
                 lambda h: {"headers": bearer(h.token()), "query_string": {"access_token": h.token()}}, 400,
                 "request_invalid", id="two-tokens"),
    pytest.param({"scopes_required": ["admin"]},
                 lambda h: {"headers": bearer(h.token()), "environ_overrides": cert_env(h.alice.cert_pem)}, 403,
                 "scope_insufficient", id="scope"),
    pytest.param({"down": True}, lambda h: {"headers": bearer(h.token()),
                                            "environ_overrides": cert_env(h.alice.cert_pem)},
                 503, "issuer_unavailable", id="issuer-down"),
]


@pytest.mark.parametrize(("overrides", "request_kwargs", "status", "reason"), REFUSALS)
def test_every_refusal_is_one_event_and_one_count(
    overrides: dict[str, Any], request_kwargs: Callable[[Handles], dict[str, Any]], status: int, reason: str,
    make_client: MakeClient, issuer: TestIssuer, alice: Issued, mallory: Issued, alice_x5t: str,
    events: Callable[[], list[tuple[int, dict[str, str]]]],
) -> None:
    overrides = dict(overrides)
    issuer.down = overrides.pop("down", False)
    client = make_client(**overrides)
    handles = Handles(issuer, alice, mallory, alice_x5t)
    kwargs = request_kwargs(handles)
    outcome = "fault" if status >= 500 else "refused"
    before = count(outcome, reason)
    response = client.get("/orders", **kwargs)
    assert response.status_code == status
    ((level, event),) = events()
    assert event["outcome"] == outcome and event["reason"] == reason and event["status"] == str(status)
    assert level == (logging.WARNING if status >= 500 else logging.INFO)
    assert event["path"] == "/orders" and event["method"] == "GET"
    assert count(outcome, reason) == before + 1
    for token in re.findall(r"ey[\w-]+\.[\w-]+\.[\w-]+", repr(kwargs)):
        assert token not in repr(events())


def test_a_stolen_token_names_whom_it_was_issued_to_and_both_thumbprints(
    make_client: MakeClient, issuer: TestIssuer, alice: Issued, mallory: Issued, alice_x5t: str, mallory_x5t: str,
    events: Callable[[], list[tuple[int, dict[str, str]]]],
) -> None:
    token = Handles(issuer, alice, mallory, alice_x5t).token()
    # From nginx (a trusted proxy), which appended the address it saw to what the client wrote.
    via_nginx = {**cert_env(mallory.cert_pem), "REMOTE_ADDR": "127.0.0.1",
                 "HTTP_X_FORWARDED_FOR": "10.9.9.9, 198.51.100.7"}
    response = make_client().get("/orders", headers=bearer(token), environ_overrides=via_nginx)
    assert response.status_code == 401
    ((_, event),) = events()
    assert {key: event.get(key) for key in ("sub", "client_id", "jti", "bound", "presented", "client")} == {
        "sub": "alice", "client_id": "app", "jti": "j-1", "bound": alice_x5t, "presented": mallory_x5t,
        "client": "198.51.100.7"}
    assert re.fullmatch(r"[0-9a-f]{16}", event["request_id"])


def test_accepted_is_one_debug_event_and_one_count(
    make_client: MakeClient, alice: Issued, alice_token: str, alice_x5t: str,
    events: Callable[[], list[tuple[int, dict[str, str]]]],
) -> None:
    before = count("accepted", "ok")
    response = make_client().get("/orders", headers=bearer(alice_token), environ_overrides=cert_env(alice.cert_pem))
    assert response.status_code == 200
    ((level, event),) = events()
    assert (level, event["outcome"], event["reason"], event["sub"], event["presented"]) == (
        logging.DEBUG, "accepted", "ok", "alice", alice_x5t)
    assert count("accepted", "ok") == before + 1
    assert REGISTRY.get_sample_value("certbound_request_duration_seconds_count", {"outcome": "accepted"})


def test_a_bug_is_a_warning_event_and_its_traceback_is_logged_apart(
    issuer: TestIssuer, alice: Issued, alice_token: str, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="certbound_wsgi")

    class Broken(StaticDiscovery):
        def keys_for(self, kid: str | None) -> Any:
            raise RuntimeError("secret internal detail")

    settings = make_settings()
    client = Client(CertBoundMiddleware(CountingApp(), settings, discovery=Broken(settings, issuer)))  # type: ignore[arg-type]
    assert client.get("/", headers=bearer(alice_token), environ_overrides=cert_env(alice.cert_pem)).status_code == 500
    audit = [r for r in caplog.records if r.name == AUDIT]
    assert [(r.levelno, fields(r.getMessage())["reason"]) for r in audit] == [(logging.WARNING, "internal_error")]
    assert "secret internal detail" not in audit[0].getMessage()
    (trace,) = [r for r in caplog.records if r.exc_info]
    assert "secret internal detail" in str(trace.exc_info[1])  # type: ignore[index]


def test_nothing_is_logged_twice(make_client: MakeClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="certbound_wsgi")
    assert make_client().get("/").status_code == 401
    assert len(caplog.records) == 1  # the audit event; no second "refused" line


@pytest.mark.parametrize(("path", "status", "app_called"), [
    pytest.param("/healthz", 200, True, id="exact"),
    pytest.param("/static/app.css", 200, True, id="prefix"),
    pytest.param("/healthz/", 401, False, id="exact-only"),
    pytest.param("//healthz", 401, False, id="other-spelling"),
    pytest.param("/static/../admin", 401, False, id="dot-dot"),
    pytest.param("/admin", 401, False, id="protected"),
])
def test_public_paths_pass_without_a_token_and_without_an_event(
    make_client: MakeClient, path: str, status: int, app_called: bool,
    events: Callable[[], list[tuple[int, dict[str, str]]]],
) -> None:
    app = CountingApp()
    response = make_client(app, public_paths=["/healthz", "/static/"]).get(path)
    assert response.status_code == status
    assert bool(app.calls) is app_called
    assert len(events()) == (0 if app_called else 1)


@pytest.mark.parametrize(("down", "status", "body"), [
    pytest.param(False, 200, {"status": "ready", "checks": {"issuer": "ok", "keys": "ok", "redis": "off"}}, id="up"),
    pytest.param(True, 503, {"status": "unavailable", "checks": {"issuer": "down", "keys": "down", "redis": "off"}},
                 id="down"),
])
def test_readiness_and_liveness_paths(make_client: MakeClient, issuer: TestIssuer, down: bool, status: int,
                                      body: dict[str, Any]) -> None:
    issuer.down = down
    app = CountingApp()
    client = make_client(app, readiness_path="/readyz", liveness_path="/livez")
    ready = client.get("/readyz")
    assert (ready.status_code, ready.json) == (status, body)
    assert ("Retry-After" in ready.headers) is down
    assert (client.get("/livez").status_code, client.get("/livez").json) == (200, {"status": "ok"})
    assert client.post("/readyz").status_code == 405
    assert app.calls == []


def test_readiness_requires_redis_only_when_requests_need_it(issuer: TestIssuer) -> None:
    from tests.support.procs import free_port

    down = f"redis://127.0.0.1:{free_port()}/0"
    for extra, ready in (({}, 200), ({"auth_methods": ["bearer", "session"], **SESSION}, 503)):
        settings = make_settings(readiness_path="/readyz", redis_url=down, cache_secret="s" * 16,
                                 **{k: v for k, v in extra.items() if k != "auth_methods"},
                                 auth_methods=extra.get("auth_methods", ["bearer"]))
        middleware = CertBoundMiddleware(CountingApp(), settings, discovery=StaticDiscovery(settings, issuer))
        response = Client(middleware).get("/readyz")  # type: ignore[arg-type]
        assert response.status_code == ready
        assert response.json is not None and response.json["checks"]["redis"] == "down"


def test_key_fetches_are_counted(make_client: MakeClient, issuer: TestIssuer, alice: Issued, alice_token: str) -> None:
    ok = REGISTRY.get_sample_value("certbound_key_fetches_total", {"result": "ok"}) or 0.0
    error = REGISTRY.get_sample_value("certbound_key_fetches_total", {"result": "error"}) or 0.0
    client = make_client()
    assert client.get("/", headers=bearer(alice_token), environ_overrides=cert_env(alice.cert_pem)).status_code == 200
    assert REGISTRY.get_sample_value("certbound_key_fetches_total", {"result": "ok"}) == ok + 1
    fetched_at = REGISTRY.get_sample_value("certbound_keys_fetched_timestamp_seconds")
    assert fetched_at is not None and abs(fetched_at - time.time()) < 60  # the wall clock, for time() - it
    issuer.down = True
    middleware_of(client).discovery.refresh(force=True)
    assert REGISTRY.get_sample_value("certbound_key_fetches_total", {"result": "error"}) == error + 1


def test_login_callback_refusals_are_login_failed(issuer: TestIssuer,
                                                  events: Callable[[], list[tuple[int, dict[str, str]]]]) -> None:
    from tests.support.session_options import LOGIN

    settings = make_settings(**LOGIN)
    middleware = CertBoundMiddleware(CountingApp(), settings, discovery=StaticDiscovery(settings, issuer))
    response = Client(middleware).get("/callback", query_string={"state": "s"})  # type: ignore[arg-type]
    assert response.status_code == 400
    ((_, event),) = events()
    assert (event["reason"], event["path"]) == ("login_failed", "/callback")


def test_logout_refusals_are_audited(issuer: TestIssuer, alice: Issued, mallory: Issued, alice_token: str,
                                     events: Callable[[], list[tuple[int, dict[str, str]]]]) -> None:
    from tests.test_sessions import build, get, login

    client = build(issuer, logout_path="/logout")
    cookie = login(client, alice_token, cert=alice)
    # Mallory has the cookie but not alice's certificate: she may not end alice's session.
    response = get(client, cookie=cookie, cert=mallory, path="/logout", method="POST")
    assert response.status_code == 401
    assert [(event["outcome"], event["reason"], event["path"]) for _, event in events()][-1] == (
        "refused", "cert_mismatch", "/logout")


@pytest.mark.parametrize(("option", "lines"), [pytest.param("true", 1, id="default-on"),
                                               pytest.param("false", 0, id="off")])
def test_refusals_reach_stderr_without_any_logging_configuration(option: str, lines: int) -> None:
    code = textwrap.dedent(f"""
        from werkzeug.test import Client
        from certbound_wsgi.dev.echo import echo_app
        from certbound_wsgi.middleware import CertBoundMiddleware
        from certbound_wsgi.settings import Settings
        settings = Settings(issuer={ISSUER!r}, audience=("api",), audit_log_stderr={option == "true"},
                            proxy_secret={TEST_PROXY_SECRET!r})
        assert Client(CertBoundMiddleware(echo_app, settings)).get("/x").status_code == 401
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stderr.count("certbound outcome=refused reason=token_missing") == lines, result.stderr


def test_json_is_one_option_away(make_client: MakeClient, caplog: pytest.LogCaptureFixture) -> None:
    import json

    caplog.set_level(logging.INFO, logger="certbound_wsgi")
    assert make_client(audit_log_format="json").get("/x").status_code == 401
    (record,) = caplog.records
    assert json.loads(record.getMessage())["reason"] == "token_missing"


def test_require_scope_refusals_are_audited_and_counted(issuer: TestIssuer, alice: Issued, alice_x5t: str,
                                                       events: Callable[[], list[tuple[int, dict[str, str]]]]) -> None:
    from tests.test_flask import build_app

    app, _ = build_app(issuer)
    token = issuer.token(cnf={"x5t#S256": alice_x5t}, scope="read", jti="j-9")
    before = count("refused", "scope_insufficient")
    response = app.test_client().post("/write", headers=bearer(token), environ_overrides=cert_env(alice.cert_pem))
    assert response.status_code == 403
    assert [(event["outcome"], event["reason"]) for _, event in events()] == [
        ("accepted", "ok"), ("refused", "scope_insufficient")]
    refused = events()[-1][1]
    assert (refused["sub"], refused["jti"], refused["presented"], refused["path"]) == ("alice", "j-9", alice_x5t,
                                                                                      "/write")
    assert count("refused", "scope_insufficient") == before + 1


def test_flask_public_and_health_paths_come_from_app_config(issuer: TestIssuer) -> None:
    from flask import Flask

    from certbound_wsgi.flask import CertBound, current_claims

    app = Flask(__name__)
    app.config.update(CERTBOUND_ISSUER=ISSUER, CERTBOUND_AUDIENCE=["https://api.test"],
                      CERTBOUND_PUBLIC_PATHS=["/status"], CERTBOUND_LIVENESS_PATH="/healthz",
                      CERTBOUND_PROXY_SECRET=TEST_PROXY_SECRET)

    @app.get("/status")
    def status() -> Any:
        return {"claims": dict(current_claims)}

    CertBound(app)
    client = app.test_client()
    assert (client.get("/status").status_code, client.get("/status").json) == (200, {"claims": {}})
    assert client.get("/healthz").json == {"status": "ok"}
    assert client.get("/private").status_code == 401


def test_readiness_pings_the_replay_stores_own_redis(issuer: TestIssuer, redis_server: Any) -> None:
    from tests.support.procs import free_port

    common = {"readiness_path": "/readyz", "cache_secret": "s" * 16, "proof_of_possession_dpop": "optional",
              "public_base_url": "https://api.example.com"}
    down = f"redis://127.0.0.1:{free_port()}/0"
    for replay_url, status, state in ((redis_server.url, 200, "ok"), (down, 503, "down")):
        settings = make_settings(dpop_replay_redis_url=replay_url, **common)
        middleware = CertBoundMiddleware(CountingApp(), settings, discovery=StaticDiscovery(settings, issuer))
        response = Client(middleware).get("/readyz")  # type: ignore[arg-type]
        assert response.status_code == status
        assert response.json is not None and response.json["checks"]["redis"] == state


@pytest.mark.parametrize(("remote_addr", "forwarded", "client"), [
    pytest.param("", "198.51.100.7", "198.51.100.7", id="unix-socket"),
    pytest.param("", None, None, id="unix-socket-nothing-forwarded"),
    pytest.param("", "not-an-address", None, id="unix-socket-garbage"),
])
def test_behind_a_unix_socket_the_client_address_is_the_proxys_word(
    make_client: MakeClient, remote_addr: str, forwarded: str | None, client: str | None,
    events: Callable[[], list[tuple[int, dict[str, str]]]],
) -> None:
    environ = {"REMOTE_ADDR": remote_addr, **({"HTTP_X_FORWARDED_FOR": forwarded} if forwarded else {})}
    assert make_client().get("/x", environ_overrides=environ).status_code == 401
    ((_, event),) = events()
    assert event.get("client") == client
