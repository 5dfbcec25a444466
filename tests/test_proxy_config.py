"""certbound_wsgi.proxy_config: the HAProxy and Caddy templates, rendered with validated values.

The rendered files are run by tests/e2e/test_proxies.py; these tests cover what
must never be written into them.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from certbound_wsgi.cli import main
from certbound_wsgi.errors import ConfigurationError
from certbound_wsgi.proxy_config import HEADERS, PROXIES, render_caddy, render_haproxy, template

SECRET = "proxy-config-test-secret-0123456789abcdef"


def test_every_placeholder_is_filled(tmp_path: Path) -> None:
    haproxy = render_haproxy(listen="127.0.0.1:8443", backend="127.0.0.1:8000", server_pem=tmp_path / "s.pem",
                             client_ca=tmp_path / "ca.pem", proxy_secret=SECRET)
    caddy = render_caddy(host="api.example", port=443, backend="127.0.0.1:8000", server_cert=tmp_path / "c.pem",
                         server_key=tmp_path / "k.pem", proxy_secret=SECRET)
    for text in (haproxy, caddy):
        assert not re.search(r"\{\{[a-z_]+\}\}", text)
    assert f'crt "{tmp_path}/s.pem" verify optional ca-file "{tmp_path}/ca.pem"' in haproxy
    assert "server app 127.0.0.1:8000" in haproxy
    assert "https://api.example:443 {" in caddy and "bind 127.0.0.1" in caddy
    assert "reverse_proxy 127.0.0.1:8000" in caddy


def test_each_template_writes_the_header_it_declares() -> None:
    for proxy in PROXIES:
        header, _ = HEADERS[proxy]
        text = template(proxy)
        # The client's copy is removed before the proxy's own is set.
        removed = re.search(rf"(del-header |request_header -){re.escape(header)}\b", text)
        added = re.search(rf"(set-header|request_header @client_cert) {re.escape(header)}\b", text)
        assert removed and added and removed.start() < added.start(), proxy


@pytest.mark.parametrize(("render", "option"), [
    pytest.param(lambda p: render_haproxy(listen="127.0.0.1:8443; }", backend="127.0.0.1:1", server_pem=p,
                                          client_ca=p, proxy_secret=SECRET), "listen", id="haproxy-listen-injection"),
    pytest.param(lambda p: render_haproxy(listen="127.0.0.1:8443", backend="127.0.0.1:1\n  bind :80",
                                          server_pem=p, client_ca=p, proxy_secret=SECRET),
                 "backend", id="haproxy-backend-newline"),
    pytest.param(lambda p: render_haproxy(listen="127.0.0.1:8443", backend="unix:/run/app.sock", server_pem=p,
                                          client_ca=p, proxy_secret=SECRET),
                 "backend", id="haproxy-unix-backend"),
    pytest.param(lambda p: render_haproxy(listen="127.0.0.1:8443", backend="127.0.0.1:1",
                                          server_pem=f"{p}/${{HOME}}", client_ca=p, proxy_secret=SECRET), "server_pem",
                 id="haproxy-path-expansion"),
    pytest.param(lambda p: render_caddy(host="a.example {", port=443, backend="127.0.0.1:1", server_cert=p,
                                        server_key=p, proxy_secret=SECRET), "host", id="caddy-host-brace"),
    pytest.param(lambda p: render_caddy(host="a.example", port=70000, backend="127.0.0.1:1", server_cert=p,
                                        server_key=p, proxy_secret=SECRET), "host", id="caddy-port-range"),
    pytest.param(lambda p: render_caddy(host="a.example", port=443, backend="127.0.0.1:1",
                                        server_cert=f"{p}/{{env.X}}", server_key=p, proxy_secret=SECRET), "server_cert",
                 id="caddy-placeholder-in-path"),
    pytest.param(lambda p: render_caddy(host="a.example", port=443, backend="127.0.0.1:1", server_cert=p,
                                        server_key=p, proxy_secret=SECRET, bind="0.0.0.0 ::"),
                 "bind", id="caddy-bind-two"),
])
def test_invalid_values_are_refused(tmp_path: Path, render, option: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigurationError, match=f"^{option}:"):
        render(str(tmp_path))


def test_unknown_proxy() -> None:
    with pytest.raises(ConfigurationError, match=r"^proxy:"):
        template("traefik")  # type: ignore[arg-type]


def test_each_template_names_the_settings_the_application_needs() -> None:
    for proxy in PROXIES:
        header, fmt = HEADERS[proxy]
        text = template(proxy)
        assert f"CERTBOUND_CLIENT_CERT_HEADER={header}" in text and f"CERTBOUND_CLIENT_CERT_FORMAT={fmt}" in text
        assert f"certbound-wsgi proxy-config {proxy}" in text


def test_the_templates_are_the_installed_package_data() -> None:
    """Read with importlib.resources from certbound_wsgi.proxy_templates, which setup.py maps to proxies/."""
    root = Path(__file__).resolve().parent.parent
    for proxy, name in PROXIES.items():
        assert template(proxy) == (root / "proxies" / name).read_text(encoding="utf-8")
    setup = (root / "setup.py").read_text()
    assert '"certbound_wsgi.proxy_templates": "proxies"' in setup
    assert '"certbound_wsgi.proxy_templates": ["haproxy.cfg", "Caddyfile"]' in setup


@pytest.mark.parametrize("proxy", ["haproxy", "caddy"])
def test_the_command_prints_what_the_renderer_returns(proxy: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    if proxy == "haproxy":
        argv = ["--listen", "127.0.0.1:8443", "--server-pem", str(tmp_path / "s.pem"),
                "--client-ca", str(tmp_path / "ca.pem"), "--proxy-secret-file", str(secret_file)]
        expected = render_haproxy(listen="127.0.0.1:8443", backend="127.0.0.1:9000", server_pem=tmp_path / "s.pem",
                                  client_ca=tmp_path / "ca.pem", proxy_secret=SECRET)
    else:
        argv = ["--host", "api.example", "--port", "8443", "--server-cert", str(tmp_path / "c.pem"),
                "--server-key", str(tmp_path / "k.pem"), "--proxy-secret-file", str(secret_file)]
        expected = render_caddy(host="api.example", port=8443, backend="127.0.0.1:9000",
                                server_cert=tmp_path / "c.pem", server_key=tmp_path / "k.pem", proxy_secret=SECRET)
    assert main(["proxy-config", proxy, *argv, "--backend", "127.0.0.1:9000"]) == 0
    out, err = capsys.readouterr()
    assert out == expected
    header, fmt = HEADERS[proxy]  # type: ignore[index]
    assert f"CERTBOUND_CLIENT_CERT_HEADER={header} CERTBOUND_CLIENT_CERT_FORMAT={fmt}" in err
    output = tmp_path / "out.cfg"
    assert main(["proxy-config", proxy, *argv, "--backend", "127.0.0.1:9000", "-o", str(output)]) == 0
    assert output.read_text() == expected


def test_the_command_refuses_an_invalid_value(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CERTBOUND_PROXY_SECRET", raising=False)
    haproxy = ["proxy-config", "haproxy", "--listen", "127.0.0.1:8443", "--server-pem", str(tmp_path),
               "--client-ca", str(tmp_path)]
    assert main(haproxy) == 2
    assert capsys.readouterr().err.startswith("certbound-wsgi proxy-config: error: --proxy-secret-file: required")
    monkeypatch.setenv("CERTBOUND_PROXY_SECRET", SECRET)
    status = main([*haproxy, "--backend", "127.0.0.1:1; }"])
    out, err = capsys.readouterr()
    assert (status, out) == (2, "")
    assert err.startswith("certbound-wsgi proxy-config: error: --backend:")
    assert SECRET not in err
    assert main(["proxy-config", "caddy", "--host", "api.example", "--server-cert", str(tmp_path),
                 "--server-key", str(tmp_path), "-o", str(tmp_path / "missing" / "Caddyfile")]) == 1
