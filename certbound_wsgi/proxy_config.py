"""Render the shipped HAProxy and Caddy configurations.

The templates live in ``proxies/`` at the top of the repository, beside
``nginx/``, and install as the package ``certbound_wsgi.proxy_templates``; the
end-to-end tests run HAProxy and Caddy with exactly what
:func:`render_haproxy` and :func:`render_caddy` return, and
``certbound-wsgi proxy-config`` prints the same. Placeholders and validation
are those of :mod:`certbound_wsgi.templating`: every value is checked before
it is written, because the rendered file is configuration the proxy trusts.

Each proxy writes the certificate in its own shape; :data:`HEADERS` names the
header and the :mod:`certbound_wsgi.cert_headers` format the application must
be configured with.
"""

from __future__ import annotations

import os
from importlib.resources import files
from typing import Final, Literal

from .cert_headers import CertificateFormat
from .channel import check_secret
from .errors import ConfigurationError
from .templating import absolute_path, backend_address, fill, host_port, port_number, quoted

__all__ = ["HEADERS", "PROXIES", "Proxy", "render_caddy", "render_haproxy", "template"]

Proxy = Literal["haproxy", "caddy"]

#: The template of each proxy, in ``proxies/``.
PROXIES: Final[dict[Proxy, str]] = {"haproxy": "haproxy.cfg", "caddy": "Caddyfile"}

#: The header each template writes the certificate into, and its format.
HEADERS: Final[dict[Proxy, tuple[str, CertificateFormat]]] = {
    "haproxy": ("X-Client-Cert", "base64_der"),
    "caddy": ("Client-Cert", "rfc9440"),
}

# proxies/ in the checkout, installed as this package (setup.py's package_dir).
_TEMPLATES = "certbound_wsgi.proxy_templates"


def template(proxy: Proxy) -> str:
    """The unrendered template of ``proxy``."""
    if proxy not in PROXIES:
        raise ConfigurationError("proxy", f"{proxy!r}: choose one of {', '.join(PROXIES)}")
    return files(_TEMPLATES).joinpath(PROXIES[proxy]).read_text(encoding="utf-8")


def render_haproxy(
    *,
    listen: str,
    backend: str,
    server_pem: str | os.PathLike[str],
    client_ca: str | os.PathLike[str],
    proxy_secret: str,
) -> str:
    """HAProxy in front of the application, forwarding the certificate as ``X-Client-Cert`` (``base64_der``).

    :param listen: ``address:port`` or ``[ipv6]:port`` to accept TLS on.
    :param backend: the application server, ``host:port`` (HTTP).
    :param server_pem: HAProxy's certificate followed by its private key, in one PEM file.
    :param client_ca: the CA bundle HAProxy names when it asks for a client certificate;
        certificates from other CAs are let through (the binding is the proof).
    :param proxy_secret: the application's ``proxy_secret``, sent as ``X-Certbound-Proxy-Secret``.
    :raises ConfigurationError: naming the argument whose value is invalid.
    """
    if backend.startswith("unix:"):
        raise ConfigurationError("backend", "this template takes host:port")
    values = {
        "listen": host_port("listen", listen, wildcard=False),
        "backend": backend_address(backend),
        "server_pem": quoted(absolute_path("server_pem", server_pem)),
        "client_ca": quoted(absolute_path("client_ca", client_ca)),
        "proxy_secret": _secret(proxy_secret),
    }
    return fill(template("haproxy"), values, PROXIES["haproxy"])


def render_caddy(
    *,
    host: str,
    port: int | str,
    backend: str,
    server_cert: str | os.PathLike[str],
    server_key: str | os.PathLike[str],
    proxy_secret: str,
    bind: str = "127.0.0.1",
) -> str:
    """Caddy in front of the application, forwarding the certificate as ``Client-Cert`` (``rfc9440``).

    :param host: the site's name; with client authentication Caddy requires the TLS server name
        to equal it, so clients must use this name (``localhost``, not ``127.0.0.1``).
    :param port: the HTTPS port.
    :param backend: the application server, ``host:port`` (HTTP).
    :param server_cert: Caddy's TLS certificate (PEM).
    :param server_key: its private key (PEM).
    :param proxy_secret: the application's ``proxy_secret``, sent as ``X-Certbound-Proxy-Secret``.
    :param bind: the address to listen on (Caddy's default is every interface).
    :raises ConfigurationError: naming the argument whose value is invalid.
    """
    if backend.startswith("unix:"):
        raise ConfigurationError("backend", "this template takes host:port")
    site = host_port("host", f"{host}:{port}", wildcard=False)
    bind_address = host_port("bind", f"{bind}:1", wildcard=False).rpartition(":")[0]
    values = {
        "host": site.rpartition(":")[0],
        "port": port_number("port", str(port), str(port)),
        "bind": bind_address,
        "backend": backend_address(backend),
        "server_cert": quoted(absolute_path("server_cert", server_cert)),
        "server_key": quoted(absolute_path("server_key", server_key)),
        "proxy_secret": _secret(proxy_secret),
    }
    return fill(template("caddy"), values, PROXIES["caddy"])


def _secret(proxy_secret: str) -> str:
    """The secret, checked: its alphabet needs no quoting in HAProxy (no ``%``) or Caddy (no braces)."""
    try:
        check_secret(proxy_secret)
    except ValueError as exc:
        raise ConfigurationError("proxy_secret", f"the proxy secret must be {exc}") from None
    return proxy_secret
