"""docs/kubernetes.md: the settings of each example are valid, and read the header shape its proxy writes.

The shapes themselves are tested with hostile variants in tests/test_cert_headers.py; this checks that
the page shows the settings those tests use, so that the page cannot drift from them.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from certbound_wsgi.authenticator import build
from certbound_wsgi.dev.pki import Issued
from certbound_wsgi.settings import Settings

PAGE = (Path(__file__).resolve().parent.parent / "docs" / "kubernetes.md").read_text(encoding="utf-8")
BASE = {"CERTBOUND_ISSUER": "https://issuer.test", "CERTBOUND_AUDIENCE": "https://api.test"}
SECRET = "kubernetes-docs-proxy-secret-0123456789"


def env_blocks() -> list[dict[str, str]]:
    """The ``CERTBOUND_*`` variables with a literal value, per YAML block of the page."""
    blocks = re.findall(r"```yaml\n(.*?)```", PAGE, re.S)
    found = [dict(re.findall(r'- name: (CERTBOUND_[A-Z_]+)\n\s+value: "([^"]*)"', block)) for block in blocks]
    return [env for env in found if env]


def test_the_page_has_the_three_examples() -> None:
    headers = [env.get("CERTBOUND_CLIENT_CERT_HEADER") for env in env_blocks()]
    assert headers == ["ssl-client-cert", "X-SSL-Client-Cert", "X-Forwarded-Client-Cert"]


@pytest.mark.parametrize("annotation", [
    'nginx.ingress.kubernetes.io/auth-tls-pass-certificate-to-upstream: "true"',
    'nginx.ingress.kubernetes.io/auth-tls-verify-client: "optional_no_ca"',
    "nginx.ingress.kubernetes.io/auth-tls-secret:",
    "nginx.ingress.kubernetes.io/configuration-snippet: |\n      proxy_set_header X-Certbound-Proxy-Secret",
])
def test_ingress_annotations(annotation: str) -> None:
    assert annotation in PAGE


def _escaped(cert: Issued) -> str:
    return quote(cert.cert_pem, safe="-_.~")  # nginx's $ssl_client_escaped_cert


def sha256_hex(cert: Issued) -> str:
    der = x509.load_pem_x509_certificate(cert.cert_pem.encode()).public_bytes(Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def test_each_example_s_settings_read_its_proxy_s_header(alice: Issued, mallory: Issued, alice_x5t: str) -> None:
    ingress, sidecar, mesh = env_blocks()
    # The ingress example's secret comes from a Kubernetes Secret (valueFrom): given here.
    reader = build(Settings.from_env({**BASE, **ingress, "CERTBOUND_PROXY_SECRET": SECRET})).certificates
    via_controller = {"HTTP_SSL_CLIENT_CERT": _escaped(alice), "HTTP_X_CERTBOUND_PROXY_SECRET": SECRET}
    assert reader.thumbprint({**via_controller, "REMOTE_ADDR": "10.42.3.4"}) == alice_x5t
    assert reader.thumbprint({**via_controller, "REMOTE_ADDR": "10.43.0.1"}) is None
    assert reader.thumbprint({"HTTP_SSL_CLIENT_CERT": _escaped(alice), "REMOTE_ADDR": "10.42.3.4"}) is None

    # The sidecar: gunicorn on a Unix socket, whose peer has an empty REMOTE_ADDR.
    reader = build(Settings.from_env({**BASE, **sidecar})).certificates
    assert reader.thumbprint({"HTTP_X_SSL_CLIENT_CERT": _escaped(alice), "REMOTE_ADDR": ""}) == alice_x5t
    assert reader.thumbprint({"HTTP_X_SSL_CLIENT_CERT": _escaped(alice), "REMOTE_ADDR": "127.0.0.1"}) is None

    reader = build(Settings.from_env({**BASE, **mesh})).certificates
    value = f"Hash={sha256_hex(alice)},By=spiffe://cluster.local/ns/api/sa/app;Hash={sha256_hex(mallory)}"
    assert reader.thumbprint({"HTTP_X_FORWARDED_CLIENT_CERT": value, "REMOTE_ADDR": "127.0.0.1"}) == alice_x5t
