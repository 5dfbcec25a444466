"""Render the shipped nginx configurations (for ``certbound-wsgi nginx-config``).

The templates live in ``nginx/`` at the top of the repository and install as
the package ``certbound_wsgi.nginx``; the tests start nginx with exactly what
:func:`render` returns, so what ships is what is tested.

A template marks each value with a placeholder in double braces, such as
``{{backend}}``. Double braces never occur in nginx's own syntax (its
variables are ``$name`` and its blocks single braces), so a placeholder cannot
be mistaken for configuration, nor configuration for a placeholder.
Substitution is a single pass: a value that itself contains ``{{...}}`` is
not expanded again.

Every value is validated before it is written, because the rendered file is
configuration that nginx trusts: a backend of ``127.0.0.1:8000; }`` or a
path with a newline in it would otherwise add directives of its own choosing.
Invalid input raises :class:`~certbound_wsgi.errors.ConfigurationError`
naming the argument; ``certbound-wsgi nginx-config`` (in :mod:`certbound_wsgi.cli`)
turns it into exit status 2 and a message.

A combination that cannot work is refused as well (docs/security.md, "Trust
boundaries"): a TCP backend needs the proxy secret, since an address proves
nothing to uWSGI (the sender of a uwsgi packet writes ``REMOTE_ADDR``) and
little to gunicorn (every process that can use the address is trusted); for
gunicorn, address-only trust stays possible as an explicit opt-in. A Unix
socket backend works without a secret when the application trusts the socket
(``trusted_proxies=unix``).
"""

from __future__ import annotations

import ipaddress
import os
import re
import textwrap
from importlib.resources import files
from typing import Final, Literal

from .channel import DEFAULT_SECRET_HEADER, UWSGI_SECRET_VAR, check_secret, environ_key
from .errors import ConfigurationError

__all__ = ["UPSTREAMS", "Upstream", "render"]

Upstream = Literal["gunicorn", "uwsgi"]

#: The application servers there is a template for, and its file in ``certbound_wsgi.nginx``.
UPSTREAMS: Final[dict[str, str]] = {"gunicorn": "gunicorn.conf", "uwsgi": "uwsgi.conf"}

_PLACEHOLDER = re.compile(r"\{\{([a-z_]+)\}\}")

# A DNS name or IPv4 address: letters, digits, dots and hyphens only.
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")
# A Unix socket path, unquoted in the template: a conservative character set.
_UNIX_SOCKET = re.compile(r"unix:/[A-Za-z0-9._/@+=,-]+")
# One server_name entry: exact names, "*.example.com", ".example.com" and "www.example.*".
# Regular expressions ("~...") are not accepted, nor the catch-all "_": the rendered
# default server refuses every name not listed, so a name must be listed.
_SERVER_NAME = re.compile(r"\.?(?:\*\.)?[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?:\.\*)?")
# Paths are written inside double quotes, where nginx still gives "\" a meaning
# and expands "$name"; braces and semicolons are refused too, so that a path
# reads the same to a person as to nginx.
_PATH_FORBIDDEN = re.compile(r'[\x00-\x1f\x7f"\\${};]')

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


def _fill(template: str, values: dict[str, str], name: str) -> str:
    """Replace every placeholder in one pass.

    :param template: text with ``{{name}}`` placeholders.
    :param values: the already validated value of each placeholder.
    :param name: the template's name, for the error about an unknown placeholder.
    """

    def value(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            raise RuntimeError(f"template {name} uses the unknown placeholder {{{{{key}}}}}")
        return values[key]

    return _PLACEHOLDER.sub(value, template)


def _port(option: str, text: str, value: str) -> str:
    if not text.isascii() or not text.isdigit() or not 0 < int(text) < 65536:
        raise ConfigurationError(option, f"{value!r}: the port must be a number from 1 to 65535")
    return str(int(text))


def _host_port(option: str, value: str, *, wildcard: bool) -> str:
    """``host:port``, ``[ipv6]:port`` (and ``*:port`` where ``wildcard``)."""
    host, sep, port = value.rpartition(":")
    if not sep:
        raise ConfigurationError(option, f"{value!r} is not host:port")
    port = _port(option, port, value)
    if host.startswith("[") and host.endswith("]"):
        try:
            address = ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ConfigurationError(option, f"{value!r}: {host} is not an IPv6 address") from None
        return f"[{address.compressed}]:{port}"
    if not (wildcard and host == "*") and not _HOSTNAME.fullmatch(host):
        raise ConfigurationError(option, f"{value!r}: {host!r} is not a host name or IP address")
    return f"{host}:{port}"


def _listen(value: str) -> str:
    """nginx ``listen``: a port, ``address:port`` or ``[ipv6]:port``; no extra parameters."""
    if value.isascii() and value.isdigit():
        return _port("listen", value, value)
    return _host_port("listen", value, wildcard=True)


def _backend(value: str) -> str:
    """The application server: ``host:port``, ``[ipv6]:port`` or ``unix:/path``."""
    if value.startswith("unix:"):
        if not _UNIX_SOCKET.fullmatch(value):
            raise ConfigurationError(
                "backend", f"{value!r}: a socket path must be absolute and use only letters, digits and ._/@+=,-"
            )
        return value
    return _host_port("backend", value, wildcard=False)


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


def _path(option: str, value: str | os.PathLike[str]) -> str:
    """An absolute path that is safe inside double quotes. Relative paths are taken from the
    current directory, where the user gave them, not from nginx's configuration directory."""
    text = os.fspath(value)
    if not isinstance(text, str) or not text:
        raise ConfigurationError(option, f"{value!r} is not a path")
    bad = _PATH_FORBIDDEN.search(text)
    if bad:
        raise ConfigurationError(
            option,
            f"{text!r}: a path may not contain {bad.group()!r} (control characters, quotes, \\ $ {{ }} ; are refused)",
        )
    return os.path.abspath(text)


def _quoted(path: str) -> str:
    return f'"{path}"'


def _template(upstream: str) -> str:
    if upstream not in UPSTREAMS:
        raise ConfigurationError("upstream", f"{upstream!r}: choose one of {', '.join(UPSTREAMS)}")
    return files("certbound_wsgi.nginx").joinpath(UPSTREAMS[upstream]).read_text(encoding="utf-8")


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
    :returns: the configuration text.
    :raises ConfigurationError: naming the argument whose value is invalid, or ``proxy_secret_file`` for a
        combination in which no certificate could be believed.
    """
    template = _template(upstream)
    backend = _backend(backend)
    header = _secret_header(proxy_secret_header)
    values = {
        "listen": _listen(listen),
        "backend": backend,
        "proxy_secret": _trust(upstream, backend, proxy_secret, address_only_trust),
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
    server = _fill(template, values, UPSTREAMS[upstream])
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

