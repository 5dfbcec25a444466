"""Values written into the proxy configurations we render: placeholders, and each value checked.

:mod:`certbound_wsgi.nginx_config` (nginx) and :mod:`certbound_wsgi.proxy_config`
(HAProxy, Caddy) fill templates whose placeholders are in double braces, such
as ``{{backend}}``. Double braces occur in none of these proxies' own syntax
(nginx's variables are ``$name``, HAProxy's sample fetches ``%[...]``, Caddy's
placeholders single braces), so a placeholder cannot be mistaken for
configuration. Substitution is a single pass: a value that itself contains
``{{...}}`` is not expanded again.

Every value is validated before it is written, because the rendered file is
configuration the proxy trusts: a backend of ``127.0.0.1:8000; }`` or a path
with a newline in it would otherwise add directives of its own choosing. An
invalid value raises :class:`~certbound_wsgi.errors.ConfigurationError` naming
the argument.
"""

from __future__ import annotations

import ipaddress
import os
import re

from .errors import ConfigurationError

__all__ = ["absolute_path", "backend_address", "fill", "host_port", "port_number", "quoted"]

_PLACEHOLDER = re.compile(r"\{\{([a-z_]+)\}\}")

# A DNS name or IPv4 address: letters, digits, dots and hyphens only.
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")
# A Unix socket path, unquoted in the template: a conservative character set.
_UNIX_SOCKET = re.compile(r"unix:/[A-Za-z0-9._/@+=,-]+")

# Paths are written inside double quotes, where nginx still gives "\" a meaning
# and expands "$name"; braces and semicolons are refused too, so that a path
# reads the same to a person as to nginx.
_PATH_FORBIDDEN = re.compile(r'[\x00-\x1f\x7f"\\${};]')


def fill(template: str, values: dict[str, str], name: str) -> str:
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


def port_number(option: str, text: str, value: str) -> str:
    if not text.isascii() or not text.isdigit() or not 0 < int(text) < 65536:
        raise ConfigurationError(option, f"{value!r}: the port must be a number from 1 to 65535")
    return str(int(text))


def host_port(option: str, value: str, *, wildcard: bool) -> str:
    """``host:port``, ``[ipv6]:port`` (and ``*:port`` where ``wildcard``)."""
    host, sep, port_text = value.rpartition(":")
    if not sep:
        raise ConfigurationError(option, f"{value!r} is not host:port")
    port = port_number(option, port_text, value)
    if host.startswith("[") and host.endswith("]"):
        try:
            address = ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ConfigurationError(option, f"{value!r}: {host} is not an IPv6 address") from None
        return f"[{address.compressed}]:{port}"
    if not (wildcard and host == "*") and not _HOSTNAME.fullmatch(host):
        raise ConfigurationError(option, f"{value!r}: {host!r} is not a host name or IP address")
    return f"{host}:{port}"


def backend_address(value: str, option: str = "backend") -> str:
    """An upstream server: ``host:port``, ``[ipv6]:port`` or ``unix:/path``.

    :param option: the argument's name, for the error.
    """
    if value.startswith("unix:"):
        if not _UNIX_SOCKET.fullmatch(value):
            raise ConfigurationError(
                option, f"{value!r}: a socket path must be absolute and use only letters, digits and ._/@+=,-"
            )
        return value
    return host_port(option, value, wildcard=False)


def absolute_path(option: str, value: str | os.PathLike[str]) -> str:
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


def quoted(text: str) -> str:
    """``text`` in double quotes; only for values checked by :func:`absolute_path` or as strictly."""
    return f'"{text}"'
