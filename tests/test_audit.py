"""The audit trail: reason codes, the fields of an event, sanitizing, and the stderr fallback."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from certbound_wsgi.audit import REASONS, Auditor, event_line, reason_for, sanitize
from certbound_wsgi.binding import THUMBPRINT_MISMATCH, check_mtls
from certbound_wsgi.dpop import DPoPError, NonceRequired
from certbound_wsgi.errors import (
    AuthError,
    InsufficientScope,
    InvalidRequest,
    InvalidToken,
    MissingToken,
    TemporarilyUnavailable,
)
from certbound_wsgi.jose import TimeClaimError, check_time_claims

TOKEN = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"


class WithReason(InvalidToken):
    reason = "dpop_replay"


NOW = 1_000_000


def raised(check: Callable[..., object], *args: object) -> AuthError:
    """The error ``check(*args)`` raises."""
    with pytest.raises(AuthError) as caught:
        check(*args)
    return caught.value


def time_error(claims: dict[str, Any]) -> AuthError:
    """The error the JWT validator raises for these time claims (jwt_tokens.py)."""
    with pytest.raises(TimeClaimError) as caught:
        check_time_claims(claims, NOW, 0)
    return InvalidToken(caught.value.describe("the token"), reason=caught.value.reason)


@pytest.mark.parametrize(("error", "reason"), [
    pytest.param(MissingToken("an access token is required"), "token_missing", id="missing"),
    pytest.param(InsufficientScope("the token lacks a required scope"), "scope_insufficient", id="scope"),
    # Raised by the real checks: the reason is given where the error is raised, never read from its text.
    pytest.param(raised(check_mtls, "strict", "BOUND", "OTHER"), "cert_mismatch", id="mismatch"),
    pytest.param(raised(check_mtls, "strict", "BOUND", None), "cert_missing", id="cert-missing"),
    pytest.param(raised(check_mtls, "strict", None, "OTHER"), "claim_missing", id="claim-missing"),
    pytest.param(time_error({"exp": 1}), "token_expired", id="expired"),
    pytest.param(time_error({"exp": 2 * NOW, "nbf": 2 * NOW}), "token_not_yet_valid", id="nbf"),
    pytest.param(time_error({"exp": 2 * NOW, "iat": 2 * NOW}), "token_not_yet_valid", id="iat"),
    pytest.param(time_error({"exp": "soon"}), "token_invalid", id="exp-not-a-number"),
    pytest.param(InvalidToken("the token is not active", reason="token_inactive"), "token_inactive", id="inactive"),
    pytest.param(InvalidToken("the token was issued by another issuer", reason="issuer_mismatch"), "issuer_mismatch",
                 id="iss"),
    pytest.param(InvalidToken("the token is not meant for this audience", reason="audience_mismatch"),
                 "audience_mismatch", id="aud"),
    pytest.param(InvalidToken("the token is signed with an unknown key", reason="key_unknown"), "key_unknown",
                 id="kid"),
    pytest.param(InvalidToken("the token's signature is invalid"), "token_invalid", id="signature"),
    pytest.param(InvalidToken("the token has expired"), "token_invalid", id="text-is-never-read"),
    pytest.param(InvalidToken("the session has expired", reason="session_invalid"), "session_invalid", id="session"),
    pytest.param(DPoPError("the DPoP proof has already been used", reason="dpop_replay"), "dpop_replay",
                 id="replay"),
    pytest.param(InvalidToken("x", reason="no_such_code"), "internal_error", id="unknown-code"),
    pytest.param(DPoPError("the DPoP proof's htu does not match the request URI"), "dpop_invalid", id="htu"),
    pytest.param(NonceRequired("n0nce"), "dpop_nonce", id="nonce"),
    pytest.param(InvalidRequest("more than one access token in the request"), "request_invalid", id="two-tokens"),
    pytest.param(TemporarilyUnavailable("the session store is unavailable", reason="store_unavailable"),
                 "store_unavailable", id="redis"),
    pytest.param(TemporarilyUnavailable("the issuer's signing keys cannot be fetched"), "issuer_unavailable",
                 id="jwks"),
    pytest.param(TemporarilyUnavailable("the token cannot be introspected now"), "issuer_unavailable",
                 id="introspection"),
    pytest.param(TemporarilyUnavailable("the issuer cannot be reached to log in"), "issuer_unavailable",
                 id="login-503"),
    pytest.param(AuthError("internal error", error="server_error", status=500), "internal_error", id="500"),
    pytest.param(RuntimeError("boom"), "internal_error", id="bug"),
    pytest.param(WithReason("anything"), "dpop_replay", id="explicit-reason-wins"),
])
def test_reason_codes(error: BaseException, reason: str) -> None:
    assert reason in REASONS
    assert reason_for(error) == reason


def environ(**extra: Any) -> dict[str, Any]:
    base = {"REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": "/hello", "REMOTE_ADDR": "10.0.0.5",
            "QUERY_STRING": f"access_token={TOKEN}", "HTTP_AUTHORIZATION": f"Bearer {TOKEN}"}
    base.update(extra)
    return base


def trusted(address: str) -> bool:
    return address.startswith("10.")


class Identity:
    def __init__(self, claims: dict[str, Any], thumbprint: str | None) -> None:
        self.claims = claims
        self.thumbprint = thumbprint


CLAIMS = {"sub": "alice", "client_id": "app", "jti": "j-1", "cnf": {"x5t#S256": "BOUND"}, "scope": "read"}


def fields(line: str) -> dict[str, str]:
    return {key: value.strip('"') for key, value in re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line)}


@pytest.fixture()
def records(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="certbound_wsgi")
    return caplog


def test_refusal_is_info_with_every_field_and_no_token(records: pytest.LogCaptureFixture) -> None:
    reason = Auditor(is_trusted_peer=trusted).refused(
        environ(HTTP_X_FORWARDED_FOR="198.51.100.7"), raised(check_mtls, "strict", "BOUND", "PRESENTED"),
        claims=CLAIMS, presented="PRESENTED")
    assert reason == "cert_mismatch"
    (record,) = records.records
    assert record.levelno == logging.INFO and record.name == "certbound_wsgi.audit"
    line = record.getMessage()
    assert fields(line) == {
        "outcome": "refused", "reason": "cert_mismatch", "status": "401", "method": "GET", "path": "/hello",
        "sub": "alice", "client_id": "app", "jti": "j-1", "bound": "BOUND", "presented": "PRESENTED",
        "client": "198.51.100.7", "request_id": fields(line)["request_id"], "detail": THUMBPRINT_MISMATCH,
    }
    assert TOKEN not in line and "access_token" not in line
    assert record.certbound_audit["reason"] == "cert_mismatch"  # type: ignore[attr-defined]


def test_accepted_is_debug_and_fault_is_warning(records: pytest.LogCaptureFixture) -> None:
    auditor = Auditor()
    auditor.accepted(environ(), Identity({**CLAIMS, "cnf": {"jkt": "DPOPKEY"}}, None))
    auditor.refused(environ(), TemporarilyUnavailable("the session store is unavailable", reason="store_unavailable"))
    auditor.refused(environ(), RuntimeError("secret internals"))
    assert [(r.levelno, fields(r.getMessage())["outcome"], fields(r.getMessage())["reason"])
            for r in records.records] == [
        (logging.DEBUG, "accepted", "ok"),
        (logging.WARNING, "fault", "store_unavailable"),
        (logging.WARNING, "fault", "internal_error"),
    ]
    assert fields(records.records[0].getMessage())["bound"] == "DPOPKEY"
    assert "secret internals" not in records.text


def test_accepted_costs_nothing_when_debug_is_off(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="certbound_wsgi")
    env = environ()
    Auditor().accepted(env, Identity(CLAIMS, None))
    assert caplog.records == [] and "certbound.request_id" not in env


def test_json_format(records: pytest.LogCaptureFixture) -> None:
    Auditor(fmt="json").refused(environ(PATH_INFO="/a b\n"), MissingToken("an access token is required"))
    event = json.loads(records.records[0].getMessage())
    assert event["outcome"] == "refused" and event["status"] == 401 and event["reason"] == "token_missing"
    assert event["path"] == "/a b\\x0a" and "sub" not in event


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="text"):
        Auditor(fmt="xml")  # type: ignore[arg-type]


@pytest.mark.parametrize(("peer", "forwarded", "hops", "client"), [
    pytest.param("10.0.0.5", "198.51.100.7", 1, "198.51.100.7", id="trusted-proxy"),
    pytest.param("203.0.113.1", "198.51.100.7", 1, "203.0.113.1", id="untrusted-peer-ignored"),
    pytest.param("10.0.0.5", "6.6.6.6, 198.51.100.7", 1, "198.51.100.7", id="client-prefix-ignored"),
    pytest.param("10.0.0.5", "198.51.100.7, 10.0.0.9", 2, "198.51.100.7", id="two-proxies"),
    pytest.param("10.0.0.5", "198.51.100.7", 2, "10.0.0.5", id="fewer-hops-than-proxies"),
    pytest.param("10.0.0.5", "not-an-ip\r\nforged=1", 1, "10.0.0.5", id="malformed"),
    pytest.param("10.0.0.5", None, 1, "10.0.0.5", id="no-header"),
])
def test_client_address(peer: str, forwarded: str | None, hops: int, client: str) -> None:
    env = environ(REMOTE_ADDR=peer)
    if forwarded is not None:
        env["HTTP_X_FORWARDED_FOR"] = forwarded
    assert Auditor(is_trusted_peer=trusted, forwarded_hops=hops).client_address(env) == client


@pytest.mark.parametrize(("peer", "offered", "trust", "kept"), [
    pytest.param("10.0.0.5", "abc-123", True, True, id="trusted-and-enabled"),
    pytest.param("10.0.0.5", "abc-123", False, False, id="not-enabled"),
    pytest.param("203.0.113.1", "abc-123", True, False, id="untrusted-peer"),
    pytest.param("10.0.0.5", "a b\nc", True, False, id="malformed"),
    pytest.param("10.0.0.5", "x" * 65, True, False, id="too-long"),
])
def test_request_id(peer: str, offered: str, trust: bool, kept: bool) -> None:
    env = environ(REMOTE_ADDR=peer, HTTP_X_REQUEST_ID=offered)
    auditor = Auditor(is_trusted_peer=trusted, trust_request_id=trust)
    request_id = auditor.request_id(env)
    assert (request_id == offered) is kept
    if not kept:
        assert re.fullmatch(r"[0-9a-f]{16}", request_id)
    assert auditor.request_id(env) == request_id == env["certbound.request_id"]


@given(st.text(max_size=400))
def test_sanitize_yields_short_printable_ascii(value: str) -> None:
    clean = sanitize(value)
    assert clean is not None and len(clean) <= 200
    assert all(" " <= ch <= "~" for ch in clean)


@given(st.dictionaries(st.sampled_from(["sub", "client_id", "jti"]), st.text(max_size=80)),
       st.text(max_size=80), st.text(max_size=40))
def test_no_value_can_forge_a_line_or_a_field(claims: dict[str, str], path: str, method: str) -> None:
    event = Auditor()._event(environ(PATH_INFO=path, REQUEST_METHOD=method), "refused", "token_invalid", 401,
                             claims, None, None)
    line = event_line(event)
    assert "\n" not in line and "\r" not in line
    parsed = {key: re.sub(r'\\(["\\])', r"\1", value[1:-1]) if value.startswith('"') else value
              for key, value in re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line)}
    assert parsed == {key: str(value) for key, value in event.items() if value is not None}
    assert json.loads(event_line(event, "json"))["outcome"] == "refused"


def _run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=60, check=True)
    return result.stderr


SETUP = """
    import logging
    from certbound_wsgi.audit import Auditor, install_stderr_fallback
    from certbound_wsgi.errors import MissingToken
    env = {"REQUEST_METHOD": "GET", "PATH_INFO": "/x", "REMOTE_ADDR": "127.0.0.1"}
    refuse = lambda: Auditor().refused(env, MissingToken("an access token is required"))
"""


@pytest.mark.parametrize(("code", "lines"), [
    pytest.param("install_stderr_fallback(); install_stderr_fallback(); refuse()", 1, id="unconfigured"),
    pytest.param("refuse()", 0, id="without-the-fallback-INFO-is-dropped"),
    pytest.param("install_stderr_fallback(); logging.basicConfig(format='ROOT %(message)s'); refuse()", 1,
                 id="configured-later-no-duplicate"),
    pytest.param("install_stderr_fallback(); logging.getLogger('certbound_wsgi').setLevel(logging.WARNING); "
                 "refuse()", 0, id="opt-out-by-level"),
])
def test_stderr_fallback(code: str, lines: int) -> None:
    stderr = _run(SETUP + "    " + code)
    assert stderr.count("reason=token_missing") == lines, stderr


def test_the_operations_page_lists_every_reason_code() -> None:
    page = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    section = page.split("### Reason codes", 1)[1].split("###", 1)[0]
    documented = dict(re.findall(r"^\| `(\w+)` \| (.+) \|$", section, re.M))
    assert list(documented) == list(REASONS)
