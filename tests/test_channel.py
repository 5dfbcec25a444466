"""certbound_wsgi.channel: whether a request came through the authenticated channel from nginx."""

from __future__ import annotations

import hmac
import logging
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from werkzeug.test import Client

from certbound_wsgi.certificates import CertificateReader
from certbound_wsgi.channel import (
    ENVIRON_KEY,
    NO_CHANNEL,
    UNTRUSTED_PEER,
    UWSGI_SECRET_VAR,
    WRONG_SECRET,
    ProxyChannel,
    UwsgiListeners,
    Verdict,
    check_secret,
    uwsgi_listeners,
)
from certbound_wsgi.dev.pki import Issued
from certbound_wsgi.errors import ConfigurationError
from certbound_wsgi.middleware import CertBoundMiddleware
from tests.conftest import CountingApp, bearer, make_settings
from tests.support.tokens import StaticDiscovery, TestIssuer

SECRET = "channel-test-secret-0123456789abcdefABCDEF"
HEADER = "HTTP_X_CERTBOUND_PROXY_SECRET"
CERT_HEADER = "HTTP_X_SSL_CLIENT_CERT"
UNIX_ONLY = UwsgiListeners(unix_only=True, paths=("/run/certbound/app.sock",))
WITH_TCP = UwsgiListeners(unix_only=False, paths=("/run/certbound/app.sock",))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def channel(**kwargs: Any) -> ProxyChannel:
    return ProxyChannel(**{"secret": "", **kwargs})


# -- the secret ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "reason"),
    [
        pytest.param({HEADER: SECRET}, None, id="header"),
        pytest.param({UWSGI_SECRET_VAR: SECRET}, None, id="uwsgi-variable"),
        pytest.param({}, WRONG_SECRET, id="missing"),
        pytest.param({HEADER: ""}, WRONG_SECRET, id="empty"),
        pytest.param({HEADER: SECRET[:-1]}, WRONG_SECRET, id="prefix"),
        pytest.param({HEADER: SECRET + "x"}, WRONG_SECRET, id="longer"),
        pytest.param({HEADER: SECRET[:-1] + "X"}, WRONG_SECRET, id="last-character-wrong"),
        pytest.param({HEADER: SECRET.upper()}, WRONG_SECRET, id="case-changed"),
        pytest.param({HEADER: f" {SECRET}"}, WRONG_SECRET, id="leading-space"),
        # gunicorn joins a repeated header with a comma: a forged copy beside nginx's never matches.
        pytest.param({HEADER: f"forged,{SECRET}"}, WRONG_SECRET, id="two-copies-joined"),
        # The uwsgi variable, when present, is the one compared (nginx always sends it to uWSGI).
        pytest.param({UWSGI_SECRET_VAR: "forged", HEADER: SECRET}, WRONG_SECRET, id="uwsgi-variable-wins"),
        pytest.param({UWSGI_SECRET_VAR: SECRET.encode()}, None, id="bytes-value"),
        pytest.param({HEADER: 12345}, WRONG_SECRET, id="not-a-string"),
    ],
)
def test_the_secret_decides(environ: dict[str, Any], reason: str | None) -> None:
    proxy = channel(secret=SECRET)
    assert proxy.check(environ, proxy.take_secret(environ)) == reason


def test_the_secret_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    original = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return original(a, b)

    monkeypatch.setattr("certbound_wsgi.channel.hmac.compare_digest", spy)
    proxy = channel(secret=SECRET)
    assert proxy.check({}, b"guess-" + SECRET.encode()) == WRONG_SECRET
    assert proxy.check({}, SECRET.encode()) is None
    assert calls == [(b"guess-" + SECRET.encode(), SECRET.encode()), (SECRET.encode(), SECRET.encode())]


def test_the_secret_never_reaches_the_app(issuer: TestIssuer, alice: Issued, alice_x5t: str) -> None:
    settings = make_settings(proxy_secret=SECRET)
    app = CountingApp()
    client = Client(CertBoundMiddleware(app, settings, discovery=StaticDiscovery(settings, issuer)))
    token = issuer.token(cnf={"x5t#S256": alice_x5t})
    response = client.get("/", headers={**bearer(token), "X-Certbound-Proxy-Secret": SECRET},
                          environ_overrides={"SSL_CLIENT_CERT": alice.cert_pem, UWSGI_SECRET_VAR: SECRET})
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.json is not None and response.json["thumbprint"] == alice_x5t
    seen = app.calls[-1]
    assert HEADER not in seen and UWSGI_SECRET_VAR not in seen
    assert SECRET not in response.get_data(as_text=True)
    assert seen[ENVIRON_KEY] == Verdict(None)
    # Also on a request the middleware refuses before any certificate is read.
    client.get("/", headers={"X-Certbound-Proxy-Secret": SECRET})
    assert len(app.calls) == 1


@pytest.mark.parametrize(
    "secret",
    [
        pytest.param("short", id="short"),
        pytest.param("a" * 31, id="31-characters"),
        pytest.param("a" * 513, id="too-long"),
        pytest.param("a" * 31 + '"', id="quote"),
        pytest.param("a" * 31 + "$", id="nginx-variable"),
        pytest.param("a" * 31 + ";", id="semicolon"),
        pytest.param("a" * 31 + ",", id="comma-joins-headers"),
        pytest.param("a" * 31 + " ", id="space"),
        pytest.param("a" * 31 + "\u00e9", id="non-ascii"),
    ],
)
def test_a_weak_or_unrenderable_secret_is_refused(secret: str) -> None:
    with pytest.raises(ValueError):
        check_secret(secret)
    with pytest.raises(ConfigurationError) as raised:
        make_settings(proxy_secret=secret)
    assert raised.value.option == "proxy_secret"
    assert secret not in str(raised.value), "a secret is never quoted back"


def test_the_secret_is_masked() -> None:
    assert make_settings(proxy_secret=SECRET).masked()["proxy_secret"] == "********"


@settings(max_examples=300, deadline=None)
@given(value=st.one_of(st.text(), st.binary(), st.binary().map(lambda b: b.decode("latin-1")), st.none(),
                       st.integers()), where=st.sampled_from([HEADER, UWSGI_SECRET_VAR]))
def test_hostile_secret_values_are_never_trusted_and_never_raise(value: object, where: str) -> None:
    proxy = channel(secret=SECRET)
    environ: dict[str, Any] = {where: value, CERT_HEADER: "x"}
    verdict = proxy.verdict(environ)
    assert verdict.reason == WRONG_SECRET
    assert where not in environ


def test_a_forged_verdict_is_ignored() -> None:
    # A uwsgi packet can carry a variable of any name, but only as a string.
    proxy = channel(secret=SECRET)
    environ: dict[str, Any] = {ENVIRON_KEY: "trusted", "REMOTE_ADDR": "127.0.0.1", UWSGI_SECRET_VAR: "guess"}
    assert proxy.verdict(environ).reason == WRONG_SECRET
    assert isinstance(environ[ENVIRON_KEY], Verdict)
    # Decided once: the secret is gone, the verdict stays.
    assert UWSGI_SECRET_VAR not in environ and proxy.verdict(environ).reason == WRONG_SECRET


def test_without_a_secret_to_take_nothing_is_written() -> None:
    proxy = channel(trusted_proxies=("unix",))
    environ: dict[str, Any] = {"REMOTE_ADDR": ""}
    assert proxy.verdict(environ).trusted
    assert environ == {"REMOTE_ADDR": ""}


# -- trusted_proxies: unix and addresses --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "environ", "reason"),
    [
        pytest.param({"trusted_proxies": ("unix",)}, {"REMOTE_ADDR": ""}, None, id="gunicorn-unix-peer"),
        pytest.param({"trusted_proxies": ("unix",)}, {"REMOTE_ADDR": "127.0.0.1"}, UNTRUSTED_PEER,
                     id="gunicorn-tcp-peer-with-unix-keyword"),
        pytest.param({"trusted_proxies": ("127.0.0.1/32",)}, {"REMOTE_ADDR": ""}, UNTRUSTED_PEER,
                     id="empty-address-is-not-a-network-member"),
        pytest.param({"trusted_proxies": ("unix",), "secret": SECRET}, {"REMOTE_ADDR": "", HEADER: SECRET}, None,
                     id="both-hold"),
        pytest.param({"trusted_proxies": ("unix",), "secret": SECRET}, {"REMOTE_ADDR": ""}, WRONG_SECRET,
                     id="unix-peer-without-the-secret"),
        pytest.param({"trusted_proxies": ("10.0.0.0/8",), "secret": SECRET},
                     {"REMOTE_ADDR": "127.0.0.1", HEADER: SECRET}, UNTRUSTED_PEER, id="secret-from-the-wrong-address"),
        # uWSGI: the packet's REMOTE_ADDR means nothing; the listeners, checked at start-up, do.
        pytest.param({"trusted_proxies": ("unix",), "uwsgi": UNIX_ONLY}, {"REMOTE_ADDR": "203.0.113.9"}, None,
                     id="uwsgi-on-unix-sockets-only"),
        pytest.param({"trusted_proxies": ("unix",), "uwsgi": WITH_TCP}, {"REMOTE_ADDR": ""}, NO_CHANNEL,
                     id="uwsgi-with-a-tcp-socket"),
        pytest.param({"trusted_proxies": ("127.0.0.1/32",), "uwsgi": UNIX_ONLY}, {"REMOTE_ADDR": "127.0.0.1"},
                     NO_CHANNEL, id="uwsgi-ignores-addresses"),
        pytest.param({"trusted_proxies": ("127.0.0.1/32",), "uwsgi": WITH_TCP, "secret": SECRET},
                     {"REMOTE_ADDR": "203.0.113.9", UWSGI_SECRET_VAR: SECRET}, None, id="uwsgi-secret-alone"),
        pytest.param({"uwsgi": WITH_TCP, "secret": SECRET}, {UWSGI_SECRET_VAR: "guess"}, WRONG_SECRET,
                     id="uwsgi-wrong-secret"),
        pytest.param({}, {"REMOTE_ADDR": "127.0.0.1"}, NO_CHANNEL, id="nothing-configured"),
    ],
)
def test_trust(kwargs: dict[str, Any], environ: dict[str, Any], reason: str | None) -> None:
    proxy = channel(**kwargs)
    assert proxy.verdict(environ).reason == reason


def test_uwsgi_listeners_outside_uwsgi() -> None:
    assert uwsgi_listeners() is None


# -- what is logged -------------------------------------------------------------------------------------------


def _reader(channel: ProxyChannel) -> CertificateReader:
    return CertificateReader(client_cert_header="X-SSL-Client-Cert", client_cert_verify_header="", channel=channel,
                             cache_size=8)


def _offer(reader: CertificateReader, pem: str, **environ: str) -> str | None:
    return reader.thumbprint({CERT_HEADER: pem, "REMOTE_ADDR": "127.0.0.2", **environ})


def test_an_ignored_certificate_is_logged_once_a_minute_per_reason(
    caplog: pytest.LogCaptureFixture, alice: Issued
) -> None:
    clock = Clock()
    reader = _reader(ProxyChannel(secret="", trusted_proxies=("127.0.0.1/32",), clock=clock))
    caplog.set_level(logging.WARNING, logger="certbound_wsgi")
    for _ in range(50):
        assert _offer(reader, alice.cert_pem) is None
    lines = [r for r in caplog.records if "untrusted channel" in r.getMessage()]
    assert len(lines) == 1
    message = lines[0].getMessage()
    assert "the peer is not in trusted_proxies" in message and "'127.0.0.2'" in message
    assert "BEGIN" not in message and "MII" not in message, "never the certificate"
    clock.now += 59
    _offer(reader, alice.cert_pem)
    assert len([r for r in caplog.records if "untrusted channel" in r.getMessage()]) == 1
    clock.now += 2
    _offer(reader, alice.cert_pem)
    assert len([r for r in caplog.records if "untrusted channel" in r.getMessage()]) == 2
    # No certificate offered: nothing to say.
    reader.thumbprint({"REMOTE_ADDR": "127.0.0.2"})
    assert len([r for r in caplog.records if "untrusted channel" in r.getMessage()]) == 2


def test_each_reason_has_its_own_limit_and_the_secret_is_never_logged(
    caplog: pytest.LogCaptureFixture, alice: Issued
) -> None:
    reader = _reader(ProxyChannel(secret=SECRET, trusted_proxies=("10.0.0.0/8",), clock=Clock()))
    caplog.set_level(logging.WARNING, logger="certbound_wsgi")
    for _ in range(5):
        _offer(reader, alice.cert_pem, HTTP_X_CERTBOUND_PROXY_SECRET=SECRET[:-1] + "!")
        _offer(reader, alice.cert_pem, HTTP_X_CERTBOUND_PROXY_SECRET=SECRET)
    messages = [r.getMessage() for r in caplog.records if "untrusted channel" in r.getMessage()]
    assert len(messages) == 2
    assert any("did not carry the proxy secret" in m for m in messages)
    assert any("not in trusted_proxies" in m for m in messages)
    assert not any(SECRET[:20] in m for m in messages)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param({"trusted_proxies": ("10.0.0.0/8",)}, "trusts by address only", id="address-only"),
        pytest.param({"proof_of_possession_mtls": "optional"}, "no client certificate will be believed",
                     id="optional-without-channel"),
    ],
)
def test_start_up_warnings(overrides: dict[str, Any], message: str, issuer: TestIssuer,
                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="certbound_wsgi")
    settings = make_settings(proxy_secret="", **overrides)
    CertBoundMiddleware(CountingApp(), settings, discovery=StaticDiscovery(settings, issuer))
    assert [r.levelno for r in caplog.records if message in r.getMessage()] == [logging.WARNING]


def test_strict_mode_without_any_channel_does_not_start(issuer: TestIssuer) -> None:
    settings = make_settings(proxy_secret="")
    with pytest.raises(ConfigurationError) as raised:
        CertBoundMiddleware(CountingApp(), settings, discovery=StaticDiscovery(settings, issuer))
    assert raised.value.option == "proxy_secret"
    assert "set proxy_secret" in str(raised.value) and "trusted_proxies=unix" in str(raised.value)


def test_a_secure_channel_starts_without_warnings(issuer: TestIssuer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="certbound_wsgi")
    for overrides in ({"proxy_secret": SECRET}, {"proxy_secret": "", "trusted_proxies": ("unix",)}):
        settings = make_settings(**overrides)
        CertBoundMiddleware(CountingApp(), settings, discovery=StaticDiscovery(settings, issuer))
    assert not caplog.records


def test_uwsgi_problems() -> None:
    assert channel(trusted_proxies=("unix",), uwsgi=UNIX_ONLY).problems() == []
    [problem] = channel(trusted_proxies=("unix",), uwsgi=WITH_TCP).problems()
    assert "uWSGI must then listen on Unix sockets only" in problem
    problems = channel(trusted_proxies=("127.0.0.1/32",), secret=SECRET, uwsgi=WITH_TCP).problems()
    assert problems == ["trusted_proxies CIDRs are ignored under uWSGI: every uwsgi variable, REMOTE_ADDR included, "
                        "is written by whoever sends the packet"]
