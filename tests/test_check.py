"""``certbound-wsgi check-config``: exit codes and the warnings about unsafe deployments."""

from __future__ import annotations

from typing import Any

import pytest

from certbound_wsgi.check import bind_host, channel_errors, check_config, gunicorn_binds, unsafe_settings
from certbound_wsgi.cli import check_config_command, main
from certbound_wsgi.errors import ConfigurationError
from certbound_wsgi.settings import Settings
from tests.support.redis_server import RedisServer
from tests.support.tokens import AUDIENCE, ISSUER

SECRET = "check-config-test-secret-0123456789abcdef"
# The channel stated: the proxy secret (rows about other channels set proxy_secret="").
BASE = {"issuer": ISSUER, "audience": (AUDIENCE,), "proxy_secret": SECRET}


def settings(**overrides: Any) -> Settings:
    return Settings(**{**BASE, **overrides})


@pytest.mark.parametrize(("bind", "host"), [
    pytest.param("127.0.0.1:8000", "127.0.0.1", id="ipv4"),
    pytest.param("[::1]:8000", "::1", id="ipv6"),
    pytest.param("0.0.0.0:8000", "0.0.0.0", id="any"),
    pytest.param(":8000", "0.0.0.0", id="port-only"),
    pytest.param("api.internal:8000", "api.internal", id="name"),
    pytest.param("unix:/run/gunicorn.sock", None, id="unix"),
    pytest.param("/run/certbound/app.sock", None, id="uwsgi-unix-path"),
    pytest.param("fd://3", None, id="fd"),
])
def test_bind_host(bind: str, host: str | None) -> None:
    assert bind_host(bind) == host


@pytest.mark.parametrize(("args", "binds"), [
    pytest.param("", [], id="none"),
    pytest.param("-w 4 -b 0.0.0.0:8000", ["0.0.0.0:8000"], id="short"),
    pytest.param("--bind 127.0.0.1:8000 --bind [::1]:8000", ["127.0.0.1:8000", "[::1]:8000"], id="twice"),
    pytest.param("--bind=10.1.2.3:80", ["10.1.2.3:80"], id="equals"),
])
def test_gunicorn_bind_from_environment(args: str, binds: list[str]) -> None:
    assert gunicorn_binds({"GUNICORN_CMD_ARGS": args}) == binds


@pytest.mark.parametrize(("overrides", "binds", "expected"), [
    pytest.param({}, ["127.0.0.1:8000"], [], id="safe-defaults"),
    pytest.param({}, ["0.0.0.0:8000"], ["forged X-SSL-Client-Cert"], id="bind-any"),
    pytest.param({}, ["10.0.0.5:8000"], ["forged X-SSL-Client-Cert"], id="bind-private-untrusted"),
    pytest.param({"trusted_proxies": ("10.0.0.0/8",)}, ["10.0.0.5:8000"], [], id="bind-private-trusted"),
    pytest.param({"trusted_proxies": ("0.0.0.0/0",)}, ["0.0.0.0:8000"], ["forged"], id="bind-any-even-if-trusted"),
    pytest.param({}, ["unix:/run/g.sock"], [], id="unix-socket"),
    pytest.param({"proxy_secret": "", "trusted_proxies": ("unix",)}, ["unix:/run/g.sock"], [], id="unix-keyword"),
    pytest.param({"proxy_secret": "", "trusted_proxies": ("127.0.0.1/32",)}, ["127.0.0.1:8000"],
                 ["trusts by address only"], id="address-only-opt-in"),
    pytest.param({"proxy_secret": "", "proof_of_possession_mtls": "optional"}, [],
                 ["no client certificate will be believed"], id="optional-without-channel"),
    pytest.param({"proof_of_possession_mtls": "off"}, [], ["proof_of_possession_mtls=off", "every token is a bearer"],
                 id="mtls-off"),
    pytest.param({"proof_of_possession_mtls": "off", "proof_of_possession_dpop": "optional",
                  "public_base_url": "https://api.example.com"}, [],
                 ["proof_of_possession_mtls=off", "replay protection is per process"], id="dpop-without-redis"),
    pytest.param({"ssl_verify": False}, [], ["ssl_verify=false"], id="tls-unverified"),
    pytest.param({"issuer": "http://127.0.0.1:9000"}, [], ["plain http"], id="http-issuer"),
    pytest.param({"auth_methods": ("bearer", "session"), "session_secret": "s" * 32, "session_cookie_secure": False},
                 [], ["session_cookie_secure=false"], id="insecure-cookie"),
    pytest.param({"auth_methods": ("bearer", "introspection"), "client_id": "rs", "client_secret": "x",
                  "cache_ttl_max": 0}, [], ["cache_ttl_max=0"], id="no-revocation-bound"),
])
def test_unsafe_settings(overrides: dict[str, Any], binds: list[str], expected: list[str]) -> None:
    warnings = unsafe_settings(settings(**overrides), binds)
    assert len(warnings) == len(expected), warnings
    for fragment, warning in zip(expected, warnings, strict=True):
        assert fragment in warning


@pytest.mark.parametrize(("environ", "bind", "warned"), [
    pytest.param({}, None, False, id="no-bind"),
    pytest.param({"GUNICORN_CMD_ARGS": "-b 0.0.0.0:8000"}, None, True, id="bind-from-gunicorn-args"),
    pytest.param({"GUNICORN_CMD_ARGS": "-b 0.0.0.0:8000"}, "127.0.0.1:8000", False, id="bind-argument-wins"),
    pytest.param({}, "10.0.0.5:8000", True, id="bind-argument"),
])
def test_check_config_returns_the_settings_and_warnings(
    environ: dict[str, str], bind: str | None, warned: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """The check itself prints nothing: the command line reports what it returns."""
    settings, errors, warnings = check_config({"CERTBOUND_ISSUER": ISSUER, "CERTBOUND_AUDIENCE": AUDIENCE,
                                               "CERTBOUND_PROXY_SECRET": SECRET, **environ}, bind)
    assert errors == []
    assert settings.issuer == ISSUER
    assert any("forged X-SSL-Client-Cert" in warning for warning in warnings) is warned
    assert capsys.readouterr() == ("", "")


def test_check_config_raises_for_an_invalid_setting() -> None:
    with pytest.raises(ConfigurationError) as info:
        check_config({"CERTBOUND_ISSUER": ISSUER, "CERTBOUND_AUDIENCE": AUDIENCE, "CERTBOUND_LEEWAY": "301",
                      "CERTBOUND_PROXY_SECRET": SECRET})
    assert info.value.option == "leeway"


@pytest.mark.parametrize(("overrides", "binds", "server", "expected"), [
    pytest.param({}, [], "gunicorn", [], id="secret"),
    pytest.param({"proxy_secret": ""}, [], "gunicorn", ["no client certificate will be believed: set "
                                                       "CERTBOUND_PROXY_SECRET"], id="nothing"),
    pytest.param({"proxy_secret": "", "trusted_proxies": ("unix",)}, ["127.0.0.1:8000"], "gunicorn",
                 ["binds to 127.0.0.1:8000 (TCP)"], id="unix-keyword-but-tcp"),
    # Issue 11 item 3: a Unix socket with only addresses trusted.
    pytest.param({"proxy_secret": "", "trusted_proxies": ("127.0.0.1/32",)}, ["unix:/run/g.sock"], "gunicorn",
                 ["add unix to CERTBOUND_TRUSTED_PROXIES"], id="unix-bind-without-unix-keyword"),
    pytest.param({"proxy_secret": "", "trusted_proxies": ("unix",)}, ["unix:/run/g.sock"], "gunicorn", [],
                 id="unix-bind-with-unix-keyword"),
    pytest.param({"proxy_secret": "", "trusted_proxies": ("127.0.0.1/32",)}, ["127.0.0.1:3031"], "uwsgi",
                 ["no client certificate will be believed"], id="uwsgi-addresses-prove-nothing"),
    pytest.param({"proxy_secret": "", "trusted_proxies": ("unix",)}, ["127.0.0.1:3031"], "uwsgi",
                 ["uWSGI must then listen on Unix sockets only"], id="uwsgi-unix-keyword-on-tcp"),
    pytest.param({"proxy_secret": "", "trusted_proxies": ("unix",)}, ["/run/certbound/app.sock"], "uwsgi", [],
                 id="uwsgi-unix-socket"),
    pytest.param({"trusted_proxies": ("unix",)}, ["127.0.0.1:3031"], "uwsgi",
                 ["uWSGI must then listen on Unix sockets only"], id="uwsgi-secret-and-unix-on-tcp"),
    pytest.param({"proxy_secret": "", "proof_of_possession_mtls": "optional"}, [], "gunicorn", [],
                 id="optional-mode-only-warns"),
])
def test_channel_errors(overrides: dict[str, Any], binds: list[str], server: str, expected: list[str]) -> None:
    errors = channel_errors(settings(**overrides), binds, server)
    assert len(errors) == len(expected), errors
    for fragment, error in zip(expected, errors, strict=True):
        assert fragment in error
        assert "\n" not in error


def test_missing_session_secret_is_an_error_not_a_warning(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    for name, value in {"ISSUER": ISSUER, "AUDIENCE": AUDIENCE, "AUTH_METHODS": "bearer,session"}.items():
        monkeypatch.setenv(f"CERTBOUND_{name}", value)
    assert check_config_command(discover=False) == 2
    assert "session_secret" in capsys.readouterr().err


@pytest.mark.parametrize(("env", "argv", "code", "stderr"), [
    pytest.param({}, ["--no-discovery"], 0, "", id="clean"),
    pytest.param({"CERTBOUND_PROOF_OF_POSSESSION_MTLS": "off"}, ["--no-discovery"], 3, "warning:", id="warns"),
    pytest.param({}, ["--no-discovery", "--bind", "0.0.0.0:8000"], 3, "forged", id="bind-flag"),
    pytest.param({"GUNICORN_CMD_ARGS": "-b 0.0.0.0:8000"}, ["--no-discovery"], 3, "forged", id="bind-env"),
    pytest.param({"CERTBOUND_LEEWAY": "x"}, ["--no-discovery"], 2, "leeway", id="invalid"),
    pytest.param({"CERTBOUND_ISSUER": "https://127.0.0.1:9"}, [], 1, "discovery failed", id="issuer-down"),
    pytest.param({"CERTBOUND_PROXY_SECRET": ""}, ["--no-discovery"], 2,
                 "error: no client certificate will be believed: set CERTBOUND_PROXY_SECRET", id="no-channel"),
    pytest.param({"CERTBOUND_PROXY_SECRET": "", "CERTBOUND_TRUSTED_PROXIES": "unix"},
                 ["--no-discovery", "--bind", "unix:/run/certbound/app.sock"], 0, "", id="unix-socket"),
    pytest.param({"CERTBOUND_PROXY_SECRET": "", "CERTBOUND_TRUSTED_PROXIES": "127.0.0.1/32"},
                 ["--no-discovery", "--bind", "unix:/run/certbound/app.sock"], 2, "add unix to", id="unix-not-trusted"),
    pytest.param({"CERTBOUND_PROXY_SECRET": "", "CERTBOUND_TRUSTED_PROXIES": "unix"},
                 ["--no-discovery", "--bind", "127.0.0.1:3031", "--server", "uwsgi"], 2,
                 "uWSGI must then listen on Unix sockets only", id="uwsgi-tcp-unix-keyword"),
])
def test_command_exit_codes(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                            env: dict[str, str], argv: list[str], code: int, stderr: str) -> None:
    monkeypatch.delenv("GUNICORN_CMD_ARGS", raising=False)
    monkeypatch.setenv("CERTBOUND_ISSUER", ISSUER)
    monkeypatch.setenv("CERTBOUND_AUDIENCE", AUDIENCE)
    monkeypatch.setenv("CERTBOUND_HTTP_TIMEOUT", "1")
    monkeypatch.setenv("CERTBOUND_PROXY_SECRET", SECRET)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["check-config", *argv]) == code
    out = capsys.readouterr()
    assert stderr in out.err
    assert SECRET not in out.out + out.err
    if code != 2:
        assert '"issuer"' in out.out  # the effective settings are printed
        assert "Traceback" not in out.err


def test_secrets_are_masked(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for name, value in {"ISSUER": ISSUER, "AUDIENCE": AUDIENCE, "AUTH_METHODS": "bearer,session",
                        "SESSION_SECRET": "a-very-secret-session-secret-0123456789", "PROXY_SECRET": SECRET}.items():
        monkeypatch.setenv(f"CERTBOUND_{name}", value)
    assert check_config_command(discover=False) in (0, 3)
    out = capsys.readouterr().out
    assert "a-very-secret" not in out
    assert '"session_secret": "********"' in out
    assert SECRET not in out
    assert '"proxy_secret": "********"' in out


@pytest.mark.parametrize(
    ("policy", "error"),
    [
        pytest.param("noeviction", None, id="noeviction-is-fine"),
        pytest.param("allkeys-lru", "maxmemory-policy", id="allkeys-lru-is-an-error"),
        pytest.param("volatile-ttl", "maxmemory-policy", id="volatile-ttl-is-an-error"),
    ],
)
def test_check_config_reports_an_evicting_dpop_replay_store(
    redis_server: RedisServer, policy: str, error: str | None
) -> None:
    """RFC 9449 section 11.1: a replay store that evicts forgets a proof early, so check-config refuses it."""
    redis_server.client().config_set("maxmemory-policy", policy)
    try:
        _, errors, _ = check_config({
            "CERTBOUND_ISSUER": ISSUER, "CERTBOUND_AUDIENCE": AUDIENCE, "CERTBOUND_PROXY_SECRET": SECRET,
            "CERTBOUND_PROOF_OF_POSSESSION_DPOP": "optional", "CERTBOUND_PUBLIC_BASE_URL": "https://api.example.com",
            "CERTBOUND_REDIS_URL": redis_server.url, "CERTBOUND_CACHE_SECRET": "s" * 32,
        }, "unix:/run/certbound/app.sock")
    finally:
        redis_server.client().config_set("maxmemory-policy", "noeviction")
    replay_errors = [line for line in errors if "maxmemory-policy" in line]
    if error is None:
        assert replay_errors == []
    else:
        assert len(replay_errors) == 1
        assert policy in replay_errors[0]
