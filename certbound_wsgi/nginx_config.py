"""Render the shipped nginx configurations (for ``certbound-wsgi nginx-config``).

The templates live in ``nginx/`` at the top of the repository and install as
the package ``certbound_wsgi.nginx``; the tests start nginx with exactly what
:func:`render` returns, so what ships is what is tested.

Placeholders and the validation of every value are those of
:mod:`certbound_wsgi.templating`. Invalid input raises
:class:`~certbound_wsgi.errors.ConfigurationError` naming the argument;
``certbound-wsgi nginx-config`` (in :mod:`certbound_wsgi.cli`) turns it into
exit status 2 and a message.

A combination that cannot work is refused as well (docs/security.md, "Trust
boundaries"): a TCP backend needs the proxy secret, since an address proves
nothing to uWSGI (the sender of a uwsgi packet writes ``REMOTE_ADDR``) and
little to gunicorn (every process that can use the address is trusted); for
gunicorn, address-only trust stays possible as an explicit opt-in. A Unix
socket backend works without a secret when the application trusts the socket
(``trusted_proxies=unix``).
"""

from __future__ import annotations

import os
import re
import textwrap
from importlib.resources import files
from typing import Final, Literal

from .channel import DEFAULT_SECRET_HEADER, UWSGI_SECRET_VAR, check_secret, environ_key
from .errors import ConfigurationError
from .templating import absolute_path as _path
from .templating import backend_address as _backend
from .templating import fill as _fill
from .templating import host_port as _host_port
from .templating import port_number as _port
from .templating import quoted as _quoted

__all__ = ["MODES", "UPSTREAMS", "Mode", "Upstream", "render"]

Upstream = Literal["gunicorn", "uwsgi"]

#: The application servers there is a template for, and its file in ``certbound_wsgi.nginx``.
UPSTREAMS: Final[dict[str, str]] = {"gunicorn": "gunicorn.conf", "uwsgi": "uwsgi.conf"}

Mode = Literal["middleware", "auth_request"]

#: ``middleware``: the application behind nginx runs the middleware (the template of its
#: upstream). ``auth_request``: nginx protects any upstream, asking the auth app
#: (:mod:`certbound_wsgi.auth_request`) about each request first.
MODES: Final[tuple[Mode, ...]] = ("middleware", "auth_request")
AUTH_REQUEST_TEMPLATE: Final = "auth_request.conf"

# One server_name entry: exact names, "*.example.com", ".example.com" and "www.example.*".
# Regular expressions ("~...") are not accepted, nor the catch-all "_": the rendered
# default server refuses every name not listed, so a name must be listed.
_SERVER_NAME = re.compile(r"\.?(?:\*\.)?[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?:\.\*)?")

# A complete nginx.conf around a rendered server block, for running nginx as
# an ordinary user: ``nginx -p PREFIX -c FILE -g 'daemon off;'``. Every file
# nginx writes (pid, logs, request and response buffers) is under the prefix,
# so nothing needs root or the distribution's directories.
_STANDALONE = """\
# certbound-wsgi: a complete nginx.conf, rendered with --standalone.
# Run it as any user: nginx -p PREFIX -c THIS_FILE -g 'daemon off;'
# Every file nginx writes is under {{where}}.

worker_processes auto;
pid {{pid}};
error_log {{error_log}} notice;

events {
    worker_connections 1024;
}

http {
    access_log {{access_log}};
    client_body_temp_path {{client_body_temp}};
    proxy_temp_path {{proxy_temp}};
    fastcgi_temp_path {{fastcgi_temp}};
    uwsgi_temp_path {{uwsgi_temp}};
    scgi_temp_path {{scgi_temp}};

{{server}}
}
"""


def _listen(value: str) -> str:
    """nginx ``listen``: a port, ``address:port`` or ``[ipv6]:port``; no extra parameters."""
    if value.isascii() and value.isdigit():
        return _port("listen", value, value)
    return _host_port("listen", value, wildcard=True)


def _server_name(value: str) -> str:
    names = value.split(" ")
    for name in names:
        if not _SERVER_NAME.fullmatch(name):
            raise ConfigurationError(
                "server_name",
                f"{value!r}: {name!r} is not a host name or a wildcard name (names are separated by one space; "
                "every other name is refused, so _ cannot stand for any)",
            )
    return value


def _secret_header(value: str) -> str:
    if not value or not all(c.isascii() and (c.isalnum() or c == "-") for c in value):
        raise ConfigurationError("proxy_secret_header", f"{value!r}: a header name of letters, digits and '-' only")
    return value


def _trust(upstream: str, backend: str, proxy_secret: str | None, address_only_trust: bool) -> str:
    """The quoted secret to render; refuses a combination in which no certificate could be believed."""
    if proxy_secret is not None:
        try:
            check_secret(proxy_secret)
        except ValueError as exc:
            # Never quote the value: it is a secret.
            raise ConfigurationError("proxy_secret_file", f"the proxy secret must be {exc}") from None
        return f'"{proxy_secret}"'
    if backend.startswith("unix:"):
        return '""'
    if upstream == "uwsgi":
        raise ConfigurationError(
            "proxy_secret_file",
            f"a uWSGI backend on TCP ({backend}) needs the proxy secret: whoever reaches the socket writes every "
            "uwsgi variable, REMOTE_ADDR included (or use a unix:/path backend with trusted_proxies=unix)",
        )
    if not address_only_trust:
        raise ConfigurationError(
            "proxy_secret_file",
            f"a TCP backend ({backend}) needs the proxy secret (--proxy-secret-file or CERTBOUND_PROXY_SECRET), a "
            "unix:/path backend, or --address-only-trust to rely on the application's trusted_proxies",
        )
    return '""'


def _template(upstream: str) -> str:
    if upstream not in UPSTREAMS:
        raise ConfigurationError("upstream", f"{upstream!r}: choose one of {', '.join(UPSTREAMS)}")
    return files("certbound_wsgi.nginx").joinpath(UPSTREAMS[upstream]).read_text(encoding="utf-8")


def _mode(mode: str, upstream: str, auth_backend: str | None) -> tuple[str, str, dict[str, str]]:
    """The template, its name and the values only that mode has."""
    if mode == "middleware":
        if auth_backend is not None:
            raise ConfigurationError("auth_backend", "applies only with mode auth_request")
        return _template(upstream), UPSTREAMS.get(upstream, upstream), {}
    if mode != "auth_request":
        raise ConfigurationError("mode", f"{mode!r}: choose one of {', '.join(MODES)}")
    if upstream != "gunicorn":
        raise ConfigurationError("upstream", "the auth app of mode auth_request is served over HTTP (gunicorn)")
    if auth_backend is None:
        raise ConfigurationError("auth_backend", "required with mode auth_request: where the auth app listens")
    text = files("certbound_wsgi.nginx").joinpath(AUTH_REQUEST_TEMPLATE).read_text(encoding="utf-8")
    return text, AUTH_REQUEST_TEMPLATE, {"auth_backend": _backend(auth_backend, "auth_backend")}


def render(
    upstream: Upstream,
    *,
    listen: str,
    backend: str,
    server_cert: str | os.PathLike[str],
    server_key: str | os.PathLike[str],
    server_name: str,
    client_ca: str | os.PathLike[str] | None = None,
    proxy_secret: str | None = None,
    proxy_secret_header: str = DEFAULT_SECRET_HEADER,
    address_only_trust: bool = False,
    standalone: bool = False,
    prefix: str | os.PathLike[str] | None = None,
    mode: Mode = "middleware",
    auth_backend: str | None = None,
) -> str:
    """Render the nginx configuration for ``upstream``.

    :param upstream: ``"gunicorn"`` (HTTP, ``proxy_pass``) or ``"uwsgi"`` (the uwsgi protocol, ``uwsgi_pass``).
    :param listen: what nginx listens on: ``443``, ``127.0.0.1:8443`` or ``[::1]:8443``.
    :param backend: the application server: ``host:port``, ``[ipv6]:port`` or ``unix:/path``.
    :param server_cert: nginx's TLS certificate (PEM); relative paths are made absolute here.
    :param server_key: its private key (PEM).
    :param client_ca: verify client certificates against this CA bundle (``ssl_verify_client on``).
        ``None`` renders ``optional_no_ca``: any certificate is accepted, and the token binding
        itself is the proof (RFC 8705 section 2.2).
    :param server_name: nginx ``server_name``: names separated by single spaces. Every other name is
        refused by a rendered default server (``ssl_reject_handshake on``), so clients must use one of them.
    :param proxy_secret: the application's ``proxy_secret``, added to every forwarded request
        (a header for gunicorn, the ``CERTBOUND_PROXY_SECRET`` uwsgi variable for uWSGI).
    :param proxy_secret_header: the application's ``proxy_secret_header`` (gunicorn).
    :param address_only_trust: allow a gunicorn TCP backend without the secret; the application then
        trusts ``trusted_proxies`` addresses alone.
    :param standalone: wrap the server block in a complete ``nginx.conf`` for
        ``nginx -p PREFIX -c FILE -g 'daemon off;'``, run as any user.
    :param prefix: with ``standalone``, the directory for the pid file, logs and temporary files.
        ``None`` writes relative paths, which nginx resolves against its ``-p`` prefix.
    :param mode: ``middleware`` (``backend`` runs the middleware) or ``auth_request`` (``backend``
        is any HTTP server, protected by asking the auth app at ``auth_backend`` about each request).
    :param auth_backend: with ``auth_request``, where the auth app listens (``host:port`` or
        ``unix:/path``).
    :returns: the configuration text.
    :raises ConfigurationError: naming the argument whose value is invalid, or ``proxy_secret_file`` for a
        combination in which no certificate could be believed.
    """
    template, template_name, values = _mode(mode, upstream, auth_backend)
    backend = _backend(backend)
    header = _secret_header(proxy_secret_header)
    # The secret goes where the certificate goes: the application, or in auth_request mode the auth app
    # (never the protected upstream).
    secret_backend = values.get("auth_backend", backend)
    values |= {
        "listen": _listen(listen),
        "backend": backend,
        "proxy_secret": _trust(upstream, secret_backend, proxy_secret, address_only_trust),
        "proxy_secret_header": header,
        "proxy_secret_param": environ_key(header),
        "proxy_secret_var": UWSGI_SECRET_VAR,
        "server_name": _server_name(server_name),
        "server_cert": _quoted(_path("server_cert", server_cert)),
        "server_key": _quoted(_path("server_key", server_key)),
    }
    if client_ca is None:
        values["verify_client"] = "optional_no_ca"
        values["client_certificate"] = "# no ssl_client_certificate: the binding is the proof (RFC 8705 section 2.2)"
    else:
        values["verify_client"] = "on"
        values["client_certificate"] = f"ssl_client_certificate {_quoted(_path('client_ca', client_ca))};"
    server = _fill(template, values, template_name)
    if not standalone:
        if prefix is not None:
            raise ConfigurationError("prefix", "applies only to a standalone configuration")
        return server

    if prefix is None:
        where, base = "the -p prefix", ""
    else:
        base = _path("prefix", prefix).rstrip("/") + "/"
        where = base
    files_under_prefix = {
        "pid": "nginx.pid",
        "error_log": "error.log",
        "access_log": "access.log",
        "client_body_temp": "client_body_temp",
        "proxy_temp": "proxy_temp",
        "fastcgi_temp": "fastcgi_temp",
        "uwsgi_temp": "uwsgi_temp",
        "scgi_temp": "scgi_temp",
    }
    standalone_values = {key: _quoted(base + name) for key, name in files_under_prefix.items()}
    standalone_values["where"] = where
    standalone_values["server"] = textwrap.indent(server, "    ", lambda line: bool(line.strip())).rstrip("\n")
    return _fill(_STANDALONE, standalone_values, "standalone nginx.conf")

