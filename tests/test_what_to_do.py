"""Issue 15: each misconfiguration is one line that names the fix, and the CLI says what it does.

Real servers where the failure is a server's answer: a TLS server with a private CA for the
certificate error, a closed port for the connection error, redis-server for the probe.
"""

from __future__ import annotations

import http.server
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from flask import Flask

from certbound_wsgi.certificates import thumbprint_from_pem
from certbound_wsgi.cli import main
from certbound_wsgi.dev.pki import DevCA, Issued
from certbound_wsgi.errors import ConfigurationError
from certbound_wsgi.flask import CertBound
from certbound_wsgi.settings import Settings
from tests.support.procs import free_port
from tests.support.redis_server import RedisServer
from tests.support.threaded_server import serving
from tests.support.tokens import AUDIENCE, ISSUER

SECRET = "what-to-do-proxy-secret-0123456789abcdef"
BASE = {"CERTBOUND_ISSUER": ISSUER, "CERTBOUND_AUDIENCE": AUDIENCE, "CERTBOUND_PROXY_SECRET": SECRET}


@pytest.fixture()
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    import os

    for name in [name for name in os.environ if name.startswith("CERTBOUND_")] + ["GUNICORN_CMD_ARGS"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CERTBOUND_PROXY_SECRET", SECRET)  # the channel from nginx (issue 11)
    return monkeypatch


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        status = main(list(argv))
    except SystemExit as exit_:  # argparse's --help and --version
        status = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return status, out, err


# -- settings --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "suggestion"), [
    pytest.param("CERTBOUND_ISUER", "did you mean CERTBOUND_ISSUER?", id="missing-letter"),
    pytest.param("CERTBOUND_TRUSTED_PROXY", "did you mean CERTBOUND_TRUSTED_PROXIES?", id="singular"),
    pytest.param("CERTBOUND_AUDIENCE_REQUIRD", "did you mean CERTBOUND_AUDIENCE_REQUIRED?", id="kong-name-typo"),
    pytest.param("CERTBOUND_XYZZY", "is not a known option", id="nothing-close"),
])
def test_an_unknown_variable_names_the_one_meant(name: str, suggestion: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env({**BASE, name: "x"})
    assert str(caught.value).endswith(suggestion)
    if "did you mean" not in suggestion:
        assert "did you mean" not in str(caught.value)


def test_audience_required_is_kongs_name_for_audience() -> None:
    assert Settings.from_env({"CERTBOUND_ISSUER": ISSUER, "CERTBOUND_AUDIENCE_REQUIRED": "a,b"}).audience == ("a", "b")
    with pytest.raises(ConfigurationError, match="disagree"):
        Settings.from_env({**BASE, "CERTBOUND_AUDIENCE_REQUIRED": "other"})


def der_of(pem: str, path: Path) -> Path:
    path.write_bytes(x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER))
    return path


def test_a_ca_file_must_hold_certificates(pki: DevCA, tmp_path: Path) -> None:
    assert Settings(**{"issuer": ISSUER, "audience": (AUDIENCE,), "ca_file": str(pki.cert_path)}).ca_file
    der = der_of(pki.cert_path.read_text(), tmp_path / "ca.der")
    assert Settings(issuer=ISSUER, audience=(AUDIENCE,), ca_file=str(der)).ca_file == str(der)
    key = next(pki.directory.glob("*.key"))
    with pytest.raises(ConfigurationError) as caught:
        Settings(issuer=ISSUER, audience=(AUDIENCE,), ca_file=str(key))
    assert caught.value.option == "ca_file"
    assert "holds a private key, not a certificate" in str(caught.value)
    assert "CA certificate(s) that signed the issuer's TLS certificate" in str(caught.value)
    (tmp_path / "notes.txt").write_text("not a certificate\n")
    with pytest.raises(ConfigurationError, match="neither a PEM nor a DER certificate"):
        Settings(issuer=ISSUER, audience=(AUDIENCE,), ca_file=str(tmp_path / "notes.txt"))


# -- check-config ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_issuer(pki: DevCA) -> Iterator[str]:
    """An HTTPS server with a certificate from the private CA (it answers nothing useful: the TLS
    handshake is what fails)."""
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*pki.server().pair)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    with serving(server, "https") as url:
        yield url


def test_an_untrusted_issuer_certificate_says_set_ca_file(clean_env: pytest.MonkeyPatch, tls_issuer: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    clean_env.setenv("CERTBOUND_ISSUER", tls_issuer)
    clean_env.setenv("CERTBOUND_AUDIENCE", AUDIENCE)
    status, _, err = run(capsys, "check-config")
    assert status == 1
    (line,) = err.splitlines()
    assert line.startswith("discovery failed: ")
    assert "SSLError: certificate verify failed:" in line
    assert line.endswith("; set CERTBOUND_CA_FILE to the CA certificate that signed the issuer's TLS certificate")


def test_the_wrong_ca_file_is_named(clean_env: pytest.MonkeyPatch, tls_issuer: str, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    other = DevCA(tmp_path / "other")
    clean_env.setenv("CERTBOUND_ISSUER", tls_issuer)
    clean_env.setenv("CERTBOUND_AUDIENCE", AUDIENCE)
    clean_env.setenv("CERTBOUND_CA_FILE", str(other.cert_path))
    status, _, err = run(capsys, "check-config")
    assert status == 1
    assert f"CERTBOUND_CA_FILE ({other.cert_path}) does not hold the CA that signed the issuer's TLS certificate" in err


def test_a_refused_connection_says_so(clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    issuer = f"https://127.0.0.1:{free_port()}"
    clean_env.setenv("CERTBOUND_ISSUER", issuer)
    clean_env.setenv("CERTBOUND_AUDIENCE", AUDIENCE)
    status, _, err = run(capsys, "check-config")
    assert status == 1
    (line,) = err.splitlines()
    assert "ConnectionError: Connection refused" in line
    assert line.endswith(f"check that the issuer is running and that CERTBOUND_ISSUER ({issuer}) is its URL")


def test_redis_is_pinged(clean_env: pytest.MonkeyPatch, redis_server: RedisServer,
                         capsys: pytest.CaptureFixture[str]) -> None:
    for name, value in {**BASE, "CERTBOUND_CACHE_SECRET": "s" * 16}.items():
        clean_env.setenv(name, value)
    clean_env.setenv("CERTBOUND_REDIS_URL", redis_server.url)
    status, out, err = run(capsys, "check-config", "--no-discovery")
    assert (status, err) == (0, "")
    assert "redis: answers PING" in out
    down = f"redis://:hunter2-password@127.0.0.1:{free_port()}/0"
    clean_env.setenv("CERTBOUND_REDIS_URL", down)
    status, _, err = run(capsys, "check-config", "--no-discovery")
    assert status == 1
    (line,) = err.splitlines()
    assert line.startswith("redis failed: Redis at redis://:****@127.0.0.1:")
    assert "Connection refused" in line and line.endswith("start it, or fix CERTBOUND_REDIS_URL")
    assert "hunter2" not in line


def test_check_config_reads_an_apps_effective_settings(clean_env: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import json

    clean_env.setenv("CERTBOUND_ISSUER", ISSUER)
    clean_env.setenv("CERTBOUND_LEEWAY", "3")  # app.config's 7 wins
    status, out, err = run(capsys, "check-config", "--no-discovery", "--app", "tests.support.flask_config_app:app")
    assert status == 0, err
    effective = json.loads(out)
    assert (effective["issuer"], effective["audience"], effective["leeway"]) == (
        ISSUER, ["https://from-config.test"], 7)
    status, _, err = run(capsys, "check-config", "--no-discovery", "--app", "tests.support.sample_app:app")
    assert status == 2
    assert "is neither a Flask app nor a CertBoundMiddleware" in err


def test_check_config_errors_name_the_variable(clean_env: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    for name, value in {**BASE, "CERTBOUND_ISUER": "x"}.items():
        clean_env.setenv(name, value)
    status, out, err = run(capsys, "check-config", "--no-discovery")
    assert (status, out) == (2, "")
    assert err == ("certbound-wsgi: configuration error: isuer: CERTBOUND_ISUER is not a known option; "
                   "did you mean CERTBOUND_ISSUER?\n")


# -- Flask --------------------------------------------------------------------------------------------------------


def test_certbound_falls_back_to_the_environment(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("CERTBOUND_ISSUER", ISSUER)
    clean_env.setenv("CERTBOUND_AUDIENCE", "https://from-env.test")
    clean_env.setenv("CERTBOUND_REALM", "from-env")
    app = Flask(__name__)
    app.config["CERTBOUND_REALM"] = "from-config"  # CERTBOUND_PROXY_SECRET comes from the environment too
    extension = CertBound(app)
    assert extension.middleware is not None
    settings = extension.middleware.settings
    assert (settings.issuer, settings.audience, settings.realm) == (ISSUER, ("https://from-env.test",), "from-config")


def test_certbound_reports_an_unknown_variable_from_either_source(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("CERTBOUND_ISUER", ISSUER)
    app = Flask(__name__)
    app.config.update(CERTBOUND_ISSUER=ISSUER, CERTBOUND_AUDIENCE=[AUDIENCE])
    with pytest.raises(ConfigurationError, match="did you mean CERTBOUND_ISSUER"):
        CertBound(app)


# -- the CLI ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("command", "says"), [
    pytest.param("thumbprint", "PEM, DER or", id="thumbprint"),
    pytest.param("check-config", "exit status: 0 fine", id="check-config"),
    pytest.param("nginx-config", "The certificate and", id="nginx-config"),
    pytest.param("demo", "Start a throwaway issuer", id="demo"),
])
def test_every_command_has_its_own_help(capsys: pytest.CaptureFixture[str], command: str, says: str) -> None:
    status, out, _ = run(capsys, command, "--help")
    assert status == 0
    assert out.startswith(f"usage: certbound-wsgi {command}")
    assert says in out


def test_the_top_level_help_is_for_operators(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "--help")
    assert status == 0
    assert "typical use:" in out and "certbound-wsgi check-config" in out
    for developer in ("``", ":param", ":returns:", "{demo,thumbprint"):
        assert developer not in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.metadata

    status, out, _ = run(capsys, "--version")
    assert (status, out) == (0, f"certbound-wsgi {importlib.metadata.version('certbound-wsgi')}\n")


def test_thumbprint_reads_der(alice: Issued, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "thumbprint", str(der_of(alice.cert_pem, tmp_path / "alice.der")))
    assert (status, out, err) == (0, thumbprint_from_pem(alice.cert_pem) + "\n", "")


def test_thumbprint_of_a_bundle_says_which_certificate(alice: Issued, mallory: Issued, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    bundle = tmp_path / "chain.pem"
    bundle.write_text(alice.cert_pem + mallory.cert_pem)
    status, out, err = run(capsys, "thumbprint", str(bundle))
    assert (status, out) == (0, thumbprint_from_pem(alice.cert_pem) + "\n")
    assert err == f"certbound-wsgi thumbprint: {bundle} holds 2 certificates; this is the first: subject CN=alice, " \
                  "issued by CN=certbound-wsgi development CA\n"


def test_thumbprint_of_a_key_says_it_is_a_key(alice: Issued, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "thumbprint", str(alice.key_path))
    assert (status, out) == (1, "")
    assert err == f"certbound-wsgi thumbprint: {alice.key_path}: holds a private key, not a certificate\n"


def nginx(capsys: pytest.CaptureFixture[str], cert: str, key: str, *extra: str) -> tuple[int, str, str]:
    return run(capsys, "nginx-config", "--server-cert", cert, "--server-key", key, "--server-name", "api.example.com",
               *extra)


def test_nginx_config_accepts_a_matching_pair(pki: DevCA, clean_env: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    server = pki.server()
    status, out, err = nginx(capsys, str(server.cert_path), str(server.key_path), "--client-ca", str(pki.cert_path))
    assert (status, err) == (0, "")
    assert f'ssl_certificate "{server.cert_path}";' in out


@pytest.mark.parametrize(("case", "message"), [
    pytest.param("missing", "--server-cert: {missing}: No such file or directory", id="missing-cert"),
    pytest.param("swapped", "--server-cert: {key}: holds a private key, not a certificate "
                            "(are --server-cert and --server-key swapped?)", id="swapped"),
    pytest.param("other-key", "--server-key: {other} is not the private key of the certificate in {cert}",
                 id="key-does-not-match"),
    pytest.param("key-is-a-cert", "--server-key: {cert}: holds a certificate, not a private key "
                                  "(are --server-cert and --server-key swapped?)", id="cert-twice"),
    pytest.param("client-ca-key", "--client-ca: {key}: holds a private key, not a certificate", id="client-ca"),
])
def test_nginx_config_refuses_bad_inputs_in_one_line(pki: DevCA, alice: Issued, tmp_path: Path, case: str,
                                                     clean_env: pytest.MonkeyPatch,
                                                     message: str, capsys: pytest.CaptureFixture[str]) -> None:
    server = pki.server()
    cert, key, other, missing = str(server.cert_path), str(server.key_path), str(alice.key_path), str(tmp_path / "x")
    argv = {"missing": (missing, key), "swapped": (key, cert), "other-key": (cert, other),
            "key-is-a-cert": (cert, cert), "client-ca-key": (cert, key, "--client-ca", key)}[case]
    output = tmp_path / "certbound.conf"
    status, out, err = nginx(capsys, *argv, "-o", str(output))
    assert (status, out) == (2, "")
    assert err == "certbound-wsgi nginx-config: error: " + message.format(
        cert=cert, key=key, other=other, missing=missing) + "\n"
    assert not output.exists()


def test_the_replay_stores_own_redis_is_pinged_too(clean_env: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    for name, value in {**BASE, "CERTBOUND_CACHE_SECRET": "s" * 16, "CERTBOUND_PROOF_OF_POSSESSION_DPOP": "optional",
                        "CERTBOUND_PUBLIC_BASE_URL": "https://api.example.com",
                        "CERTBOUND_DPOP_REPLAY_REDIS_URL": f"redis://127.0.0.1:{port}/0"}.items():
        clean_env.setenv(name, value)
    status, _, err = run(capsys, "check-config", "--no-discovery")
    assert status == 1
    (line,) = [line for line in err.splitlines() if not line.startswith("warning:")]
    assert line.startswith(f"redis failed: Redis at redis://127.0.0.1:{port}/0 does not answer")
    assert line.endswith("start it, or fix CERTBOUND_DPOP_REPLAY_REDIS_URL")
