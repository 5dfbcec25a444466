"""The shipped nginx configurations, as ``render`` and ``certbound-wsgi nginx-config`` produce them."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from certbound_wsgi.cli import main
from certbound_wsgi.dev.pki import DevCA
from certbound_wsgi.errors import ConfigurationError
from certbound_wsgi.nginx_config import Upstream, render
from tests.support.procs import require_binary

UPSTREAMS = [pytest.param("gunicorn", id="gunicorn"), pytest.param("uwsgi", id="uwsgi")]
CERTS: dict[str, Any] = {"server_cert": "/etc/certbound/server.pem", "server_key": "/etc/certbound/server.key"}
CERT_LINE = {
    "gunicorn": "proxy_set_header X-SSL-Client-Cert $ssl_client_escaped_cert;",
    "uwsgi": "uwsgi_param SSL_CLIENT_CERT $ssl_client_escaped_cert;",
}


SECRET = "nginx-config-test-secret-0123456789abcdef"
DEFAULTS: dict[str, Any] = {"listen": "443", "backend": "127.0.0.1:8000", "server_name": "api.example.com",
                            "proxy_secret": SECRET}


def _render(upstream: Any = "gunicorn", **kwargs: Any) -> str:
    return render(upstream, **{**DEFAULTS, **CERTS, **kwargs})


def _directives(text: str) -> list[str]:
    """The configuration without comments and blank lines, one stripped line each."""
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line]


@pytest.mark.parametrize(
    ("upstream", "kwargs", "present", "absent"),
    [
        pytest.param(
            "gunicorn", {}, [CERT_LINE["gunicorn"], "ssl_verify_client optional_no_ca;",
                             "proxy_set_header X-SSL-Client-Verify $ssl_client_verify;"],
            ["ssl_client_certificate"], id="gunicorn-default-optional-no-ca",
        ),
        pytest.param(
            "uwsgi", {}, [CERT_LINE["uwsgi"], "ssl_verify_client optional_no_ca;",
                          "uwsgi_param SSL_CLIENT_VERIFY $ssl_client_verify;"],
            ["ssl_client_certificate"], id="uwsgi-default-optional-no-ca",
        ),
        pytest.param(
            "gunicorn", {"client_ca": "/etc/certbound/ca.pem"},
            [CERT_LINE["gunicorn"], "ssl_verify_client on;", 'ssl_client_certificate "/etc/certbound/ca.pem";'],
            ["ssl_verify_client optional_no_ca;"], id="gunicorn-client-ca-on",
        ),
        pytest.param(
            "uwsgi", {"client_ca": "/etc/certbound/ca.pem"},
            [CERT_LINE["uwsgi"], "ssl_verify_client on;", 'ssl_client_certificate "/etc/certbound/ca.pem";'],
            ["ssl_verify_client optional_no_ca;"], id="uwsgi-client-ca-on",
        ),
        pytest.param(
            "gunicorn", {"listen": "127.0.0.1:8443", "backend": "unix:/run/gunicorn.sock"},
            ["listen 127.0.0.1:8443 ssl;", "server unix:/run/gunicorn.sock;",
             "proxy_pass http://certbound_gunicorn;", "keepalive 16;", "proxy_http_version 1.1;",
             'proxy_set_header Connection "";'],
            [], id="gunicorn-unix-socket-keepalive",
        ),
        pytest.param(
            "uwsgi", {"listen": "[::1]:8443", "backend": "[::1]:3031"},
            ["listen [::1]:8443 ssl;", "uwsgi_pass [::1]:3031;"], [], id="uwsgi-ipv6",
        ),
        pytest.param(
            "gunicorn", {"server_name": "api.example.com *.api.example.com"},
            ["server_name api.example.com *.api.example.com;"], [], id="server-names",
        ),
        # Issue 11: the proxy secret, and nothing a client can send in its place.
        pytest.param(
            "gunicorn", {},
            [f'proxy_set_header X-Certbound-Proxy-Secret "{SECRET}";'], [], id="gunicorn-secret-header",
        ),
        pytest.param(
            "gunicorn", {"proxy_secret_header": "X-Internal-Auth"},
            [f'proxy_set_header X-Internal-Auth "{SECRET}";'], ["proxy_set_header X-Certbound-Proxy-Secret"],
            id="gunicorn-custom-secret-header",
        ),
        pytest.param(
            "uwsgi", {},
            [f'uwsgi_param CERTBOUND_PROXY_SECRET "{SECRET}";', 'uwsgi_param HTTP_X_CERTBOUND_PROXY_SECRET "";'],
            [], id="uwsgi-secret-variable",
        ),
        pytest.param(
            "gunicorn", {"backend": "unix:/run/certbound/app.sock", "proxy_secret": None},
            ['proxy_set_header X-Certbound-Proxy-Secret "";', "server unix:/run/certbound/app.sock;"], [],
            id="gunicorn-unix-without-secret-removes-client-copy",
        ),
        pytest.param(
            "uwsgi", {"backend": "unix:/run/certbound/app.sock", "proxy_secret": None},
            ['uwsgi_param CERTBOUND_PROXY_SECRET "";', "uwsgi_pass unix:/run/certbound/app.sock;"], [],
            id="uwsgi-unix-without-secret",
        ),
        pytest.param(
            "gunicorn", {"proxy_secret": None, "address_only_trust": True},
            ['proxy_set_header X-Certbound-Proxy-Secret "";'], [], id="gunicorn-address-only-trust",
        ),
        # Issue 11 item 4: every other name is refused.
        pytest.param(
            "uwsgi", {"listen": "127.0.0.1:8443"},
            ["listen 127.0.0.1:8443 ssl default_server;", 'server_name "";', "ssl_reject_handshake on;",
             "return 421;", "listen 127.0.0.1:8443 ssl;", "server_name api.example.com;"],
            [], id="default-server",
        ),
        # Issue 11 item 7: what nginx accepts fits the worker.
        pytest.param(
            "uwsgi", {}, ["client_header_buffer_size 1k;", "large_client_header_buffers 2 8k;",
                          'if ($certbound_uwsgi_cert_too_large) {', "return 400;"], [], id="uwsgi-size-limits",
        ),
        pytest.param(
            "gunicorn", {}, ["client_header_buffer_size 1k;", "large_client_header_buffers 4 8k;",
                             'if ($certbound_gunicorn_cert_too_large) {'], [], id="gunicorn-size-limits",
        ),
        pytest.param(
            "gunicorn", {},
            ["proxy_set_header X-Forwarded-Proto $scheme;", "proxy_set_header X-Forwarded-Host $host;",
             "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;", "proxy_set_header Host $http_host;"],
            [], id="gunicorn-forwarded-headers",
        ),
        pytest.param(
            "uwsgi", {},
            ["uwsgi_param HTTP_X_FORWARDED_PROTO $scheme;", "uwsgi_param HTTP_X_FORWARDED_HOST $host;",
             'uwsgi_param HTTP_X_SSL_CLIENT_CERT "";', "uwsgi_param HTTPS $https if_not_empty;"],
            ["include uwsgi_params;"], id="uwsgi-params-inline",
        ),
    ],
)
def test_render(upstream: str, kwargs: dict[str, Any], present: list[str], absent: list[str]) -> None:
    directives = _directives(_render(upstream, **kwargs))
    for line in present:
        assert line in directives
    for prefix in absent:
        assert not [line for line in directives if line.startswith(prefix)]


@pytest.mark.parametrize("upstream", UPSTREAMS)
@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({}, id="optional-no-ca"),
        pytest.param({"client_ca": "/etc/certbound/ca.pem"}, id="client-ca"),
        pytest.param({"standalone": True, "prefix": "/srv/nginx"}, id="standalone"),
    ],
)
def test_security_invariants(upstream: str, kwargs: dict[str, Any]) -> None:
    text = _render(upstream, **kwargs)
    directives = _directives(text)
    # The certificate variable is set on every rendering, whatever else changes.
    assert CERT_LINE[upstream] in directives
    assert "underscores_in_headers off;" in directives
    assert "ignore_invalid_headers on;" in directives
    assert "server_tokens off;" in directives
    assert "ssl_protocols TLSv1.2 TLSv1.3;" in directives
    assert any(line.startswith("client_max_body_size ") for line in directives)
    assert not [line for line in directives if "/etc/nginx" in line or line.startswith("include")]
    assert not re.search(r"\{\{[a-z_]+\}\}", text), "a placeholder was left unrendered"
    # Exactly one default server, which completes no handshake.
    assert len([line for line in directives if line.endswith("default_server;")]) == 1
    assert "ssl_reject_handshake on;" in directives


def test_standalone_paths_under_prefix() -> None:
    directives = _directives(_render("uwsgi", standalone=True, prefix="/srv/nginx/"))
    for line in [
        'pid "/srv/nginx/nginx.pid";',
        'error_log "/srv/nginx/error.log" notice;',
        'access_log "/srv/nginx/access.log";',
        'client_body_temp_path "/srv/nginx/client_body_temp";',
        'proxy_temp_path "/srv/nginx/proxy_temp";',
        'fastcgi_temp_path "/srv/nginx/fastcgi_temp";',
        'uwsgi_temp_path "/srv/nginx/uwsgi_temp";',
        'scgi_temp_path "/srv/nginx/scgi_temp";',
        "events {",
        "http {",
    ]:
        assert line in directives
    # -g 'daemon off;' is given on the command line; nginx refuses it twice.
    assert not [line for line in directives if line.startswith(("daemon", "user"))]


def test_standalone_without_prefix_uses_relative_paths() -> None:
    directives = _directives(_render(standalone=True))
    assert 'pid "nginx.pid";' in directives
    assert 'client_body_temp_path "client_body_temp";' in directives


def test_relative_paths_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    directives = _directives(
        render("gunicorn", listen="443", backend="unix:/run/certbound/app.sock", server_cert="tls/server.pem",
               server_key=Path("tls/server.key"), client_ca="ca.pem", server_name="api.example.com")
    )
    assert f'ssl_certificate "{tmp_path}/tls/server.pem";' in directives
    assert f'ssl_certificate_key "{tmp_path}/tls/server.key";' in directives
    assert f'ssl_client_certificate "{tmp_path}/ca.pem";' in directives


@pytest.mark.parametrize(
    ("option", "value"),
    [
        pytest.param("upstream", "apache", id="upstream-unknown"),
        pytest.param("backend", "127.0.0.1:8000; }", id="backend-semicolon-brace"),
        pytest.param("backend", "127.0.0.1:8000 backup", id="backend-space-parameter"),
        pytest.param("backend", "127.0.0.1:8000;\nserver evil:80", id="backend-newline-directive"),
        pytest.param("backend", "127.0.0.1", id="backend-no-port"),
        pytest.param("backend", "127.0.0.1:0", id="backend-port-zero"),
        pytest.param("backend", "127.0.0.1:65536", id="backend-port-too-big"),
        pytest.param("backend", "127.0.0.1:\uff18\uff10", id="backend-non-ascii-digits"),
        pytest.param("backend", "$host:80", id="backend-variable"),
        pytest.param("backend", "{{listen}}:80", id="backend-placeholder"),
        pytest.param("backend", "unix:/run/a b.sock", id="backend-unix-space"),
        pytest.param("backend", "unix:run/gunicorn.sock", id="backend-unix-relative"),
        pytest.param("backend", "http://127.0.0.1:8000", id="backend-url"),
        pytest.param("backend", "[::1;]:80", id="backend-bad-ipv6"),
        pytest.param("listen", "443 default_server", id="listen-extra-parameter"),
        pytest.param("listen", "443;", id="listen-semicolon"),
        pytest.param("listen", "8443\n", id="listen-trailing-newline"),
        pytest.param("listen", "0", id="listen-port-zero"),
        pytest.param("listen", "", id="listen-empty"),
        pytest.param("server_name", "a;b", id="server-name-semicolon"),
        pytest.param("server_name", "~^(?<sub>.+)$", id="server-name-regex"),
        pytest.param("server_name", "a\nb", id="server-name-newline"),
        pytest.param("server_name", "a  b", id="server-name-double-space"),
        pytest.param("server_name", "", id="server-name-empty"),
        pytest.param("server_name", "_", id="server-name-catch-all"),
        pytest.param("server_name", "api.example.com _", id="server-name-with-catch-all"),
        pytest.param("proxy_secret_header", "X_Secret", id="secret-header-underscore"),
        pytest.param("proxy_secret_header", "", id="secret-header-empty"),
        pytest.param("server_cert", "/tmp/a.pem\nssl_verify_client off;", id="path-newline-directive"),
        pytest.param("server_cert", '/tmp/a".pem', id="path-quote"),
        pytest.param("server_key", "/tmp/$ssl_server_name.key", id="path-variable"),
        pytest.param("server_key", "/tmp/a\\b", id="path-backslash"),
        pytest.param("server_key", "/tmp/a;b", id="path-semicolon"),
        pytest.param("server_key", "/tmp/a\x00b", id="path-nul"),
        pytest.param("server_cert", "", id="path-empty"),
        pytest.param("client_ca", "/tmp/ca.pem}\nserver {", id="client-ca-brace"),
        pytest.param("prefix", "/srv/{{pid}}", id="prefix-placeholder"),
    ],
)
def test_invalid_input_is_refused(option: str, value: str) -> None:
    kwargs: dict[str, Any] = {"standalone": True} if option == "prefix" else {}
    upstream = value if option == "upstream" else "gunicorn"
    if option != "upstream":
        kwargs[option] = value
    with pytest.raises(ConfigurationError) as caught:
        _render(upstream, **kwargs)
    assert caught.value.option == option
    assert repr(value) in str(caught.value), "the message quotes the offending value"


def test_prefix_needs_standalone() -> None:
    with pytest.raises(ConfigurationError, match="prefix"):
        _render(prefix="/srv/nginx")


@pytest.mark.parametrize("upstream", UPSTREAMS)
@pytest.mark.parametrize(
    "with_ca", [pytest.param(False, id="optional-no-ca"), pytest.param(True, id="client-ca")]
)
def test_nginx_accepts_standalone_config(upstream: Upstream, with_ca: bool, tmp_path: Path) -> None:
    nginx = require_binary("nginx", "/usr/sbin/nginx")
    ca = DevCA(tmp_path / "pki")
    server = ca.server()
    prefix = tmp_path / "prefix"
    prefix.mkdir()
    conf = prefix / "nginx.conf"
    conf.write_text(
        render(upstream, listen="127.0.0.1:8443", backend="unix:/run/certbound/app.sock",
               server_cert=server.cert_path, server_key=server.key_path, client_ca=ca.cert_path if with_ca else None,
               server_name="localhost", proxy_secret=SECRET, standalone=True, prefix=prefix)
    )
    result = subprocess.run([nginx, "-t", "-p", str(prefix), "-c", str(conf)],
                            check=False, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


# --- certbound-wsgi nginx-config ---------------------------------------------

CLI_CERTS = ["--server-cert", "/etc/certbound/server.pem", "--server-key", "/etc/certbound/server.key",
             "--server-name", "api.example.com",
             "--no-check-files"]  # rendered for another host: the files are not here


@pytest.fixture()
def secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CERTBOUND_PROXY_SECRET", SECRET)


@pytest.mark.parametrize(
    ("argv", "kwargs"),
    [
        pytest.param([], {"listen": "443", "backend": "unix:/run/certbound/app.sock"}, id="defaults"),
        pytest.param(
            ["--upstream", "uwsgi", "--listen", "127.0.0.1:8443", "--backend", "127.0.0.1:3031",
             "--client-ca", "/etc/certbound/ca.pem", "--server-name", "api.example.com"],
            {"listen": "127.0.0.1:8443", "backend": "127.0.0.1:3031", "client_ca": "/etc/certbound/ca.pem",
             "upstream": "uwsgi"},
            id="uwsgi-client-ca",
        ),
        pytest.param(
            ["--standalone", "--prefix", "/srv/nginx"],
            {"listen": "443", "backend": "unix:/run/certbound/app.sock", "standalone": True, "prefix": "/srv/nginx"},
            id="standalone",
        ),
    ],
)
def test_cli_writes_file(argv: list[str], kwargs: dict[str, Any], tmp_path: Path,
                         capsys: pytest.CaptureFixture[str], secret_env: None) -> None:
    out = tmp_path / "certbound.conf"
    assert main(["nginx-config", *CLI_CERTS, *argv, "-o", str(out)]) == 0
    upstream = kwargs.pop("upstream", "gunicorn")
    assert out.read_text() == render(upstream, **CERTS, server_name="api.example.com", proxy_secret=SECRET, **kwargs)
    # It holds the secret: readable by its owner (root, for nginx's master) only.
    assert out.stat().st_mode & 0o777 == 0o600
    captured = capsys.readouterr()
    assert captured.out == "" and SECRET not in captured.err
    assert [p.name for p in tmp_path.iterdir()] == ["certbound.conf"], "no partial file is left behind"


def test_cli_writes_stdout(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CERTBOUND_PROXY_SECRET", raising=False)
    assert main(["nginx-config", *CLI_CERTS]) == 0
    captured = capsys.readouterr()
    assert captured.out == render("gunicorn", listen="443", backend="unix:/run/certbound/app.sock",
                                  server_name="api.example.com", **CERTS)
    # Issue 11 item 3: the operator is told what the application needs to believe this nginx.
    assert captured.err == ("certbound-wsgi nginx-config: note: no proxy secret; the application needs "
                            "CERTBOUND_TRUSTED_PROXIES=unix\n")


@pytest.mark.parametrize("content", [pytest.param(SECRET, id="one-line"), pytest.param(SECRET + "\n", id="newline"),
                                     pytest.param(SECRET + "\r\n", id="crlf")])
def test_cli_reads_the_secret_file(content: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CERTBOUND_PROXY_SECRET", "the-file-wins-over-the-environment-000000")
    secret_file = tmp_path / "secret"
    secret_file.write_text(content)
    assert main(["nginx-config", *CLI_CERTS, "--upstream", "uwsgi", "--backend", "10.0.0.5:3031",
                 "--proxy-secret-file", str(secret_file)]) == 0
    assert f'uwsgi_param CERTBOUND_PROXY_SECRET "{SECRET}";' in _directives(capsys.readouterr().out)


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        pytest.param(["--backend", "127.0.0.1:8000"], None, "a TCP backend (127.0.0.1:8000) needs the proxy secret",
                     id="gunicorn-tcp-without-secret"),
        pytest.param(["--upstream", "uwsgi", "--backend", "127.0.0.1:3031", "--address-only-trust"], None,
                     "a uWSGI backend on TCP (127.0.0.1:3031) needs the proxy secret", id="uwsgi-tcp-without-secret"),
        pytest.param(["--proxy-secret-file", "/nonexistent/secret"], None, "cannot read '/nonexistent/secret'",
                     id="missing-secret-file"),
        pytest.param([], "too-short-secret", "the proxy secret must be 32 to 512 characters", id="short-secret"),
        pytest.param([], "x" * 31 + '";', "the proxy secret must be 32 to 512 characters", id="injection-secret"),
    ],
)
def test_cli_refuses_what_cannot_work(argv: list[str], env: str | None, message: str, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    if env is None:
        monkeypatch.delenv("CERTBOUND_PROXY_SECRET", raising=False)
    else:
        monkeypatch.setenv("CERTBOUND_PROXY_SECRET", env)
    out = tmp_path / "certbound.conf"
    assert main(["nginx-config", *CLI_CERTS, *argv, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("certbound-wsgi nginx-config: error: --proxy-secret-file: ")
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    if env:
        assert env not in err, "a secret is never echoed"
    assert not out.exists()


def test_cli_address_only_trust_is_explicit(capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CERTBOUND_PROXY_SECRET", raising=False)
    assert main(["nginx-config", *CLI_CERTS, "--backend", "127.0.0.1:8000", "--address-only-trust"]) == 0
    captured = capsys.readouterr()
    assert 'proxy_set_header X-Certbound-Proxy-Secret "";' in _directives(captured.out)
    assert "CERTBOUND_TRUSTED_PROXIES=<nginx's address>/32 (address-only trust)" in captured.err


def test_cli_server_name_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["nginx-config", *CLI_CERTS[:4]])
    assert exited.value.code == 2
    assert "--server-name" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        pytest.param(["--backend", "127.0.0.1:8000; }"], "--backend", id="backend-injection"),
        pytest.param(["--listen", "443 default_server"], "--listen", id="listen-parameter"),
        pytest.param(["--server-name", "a;b"], "--server-name", id="server-name"),
        pytest.param(["--server-name", "_"], "--server-name", id="server-name-catch-all"),
        pytest.param(["--client-ca", "/tmp/ca.pem\nssl_verify_client off;"], "--client-ca", id="client-ca-newline"),
        pytest.param(["--prefix", "/srv/nginx"], "--prefix", id="prefix-without-standalone"),
        pytest.param(["--proxy-secret-header", "X_Secret"], "--proxy-secret-header", id="secret-header"),
    ],
)
def test_cli_bad_input(argv: list[str], option: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                       secret_env: None) -> None:
    out = tmp_path / "certbound.conf"
    assert main(["nginx-config", *CLI_CERTS, *argv, "-o", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"certbound-wsgi nginx-config: error: {option}: ")
    assert captured.err.count("\n") == 1, "one line, the value quoted"
    assert "Traceback" not in captured.err
    assert captured.out == ""
    assert not out.exists()


def test_cli_unwritable_output(tmp_path: Path, capsys: pytest.CaptureFixture[str], secret_env: None) -> None:
    target = tmp_path / "missing" / "certbound.conf"
    assert main(["nginx-config", *CLI_CERTS, "-o", str(target)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("certbound-wsgi nginx-config: error: cannot write ")
    assert "Traceback" not in err
    assert not os.path.exists(target)
