"""``certbound-wsgi``: every command, and all of their printing.

The modules these commands use (:mod:`~certbound_wsgi.certificates`,
:mod:`~certbound_wsgi.check`, :mod:`~certbound_wsgi.nginx_config`) return
values or raise; this module turns them into output and exit statuses.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import serialization

from .channel import DEFAULT_SECRET_HEADER
from .errors import ConfigurationError

if TYPE_CHECKING:  # the settings module is imported by the commands that need it
    from .settings import Settings

__all__ = ["check_config_command", "describe", "main", "nginx_config_command", "proxy_config_command",
           "thumbprint_command"]

_DESCRIPTION = """\
Operator commands for certbound-wsgi, the WSGI middleware that accepts an OAuth access
token only together with the client certificate (RFC 8705) or DPoP key (RFC 9449) it
is bound to.
"""

_EPILOG = """\
typical use:
  certbound-wsgi check-config              check the CERTBOUND_* environment and the issuer
  certbound-wsgi nginx-config --server-cert server.pem --server-key server.key -o certbound.conf
  certbound-wsgi thumbprint client.pem     the x5t#S256 a token must be bound to
  certbound-wsgi demo                      see a stolen token refused, with no network

Run 'certbound-wsgi COMMAND --help' for a command's options; the documentation is in docs/
of the source distribution.
"""


def _version() -> str:
    try:
        return importlib.metadata.version("certbound-wsgi")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown (not installed)"


def _command(commands: argparse._SubParsersAction[argparse.ArgumentParser], name: str, summary: str,
             description: str, epilog: str = "") -> argparse.ArgumentParser:
    return commands.add_parser(name, help=summary, description=description, epilog=epilog or None,
                               formatter_class=argparse.RawDescriptionHelpFormatter)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="certbound-wsgi", description=_DESCRIPTION, epilog=_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = _command(commands, "demo", "run the self-contained demonstration (no network needed)",
                    "Start a throwaway issuer, CA and protected echo app on loopback, and show a bound token\n"
                    "accepted and the same token refused with another certificate.")
    demo.add_argument("--once", action="store_true", help="exit after showing the requests instead of serving")
    demo.add_argument("--port", type=int, default=0, help="port for the protected echo app (default: a free one)")

    thumb = _command(commands, "thumbprint", "print a certificate's RFC 8705 x5t#S256 thumbprint",
                     "Print base64url(SHA-256(DER)) of a certificate: the value of cnf.x5t#S256 that a token\n"
                     "must carry to be accepted with it (RFC 8705 section 3.1). The file may be PEM, DER or\n"
                     "nginx's URL-escaped PEM; of a bundle, the first certificate (the client's own) is used\n"
                     "and standard error says which one that is.",
                     "example:\n  certbound-wsgi thumbprint client.pem")
    thumb.add_argument("cert", help="the certificate file ('-' for standard input)")

    check = _command(
        commands, "check-config", "check the CERTBOUND_* settings, the issuer and Redis",
        "Load the CERTBOUND_* environment (or an application's effective settings), print them with\n"
        "secrets masked, warn about settings that weaken the protection, fetch the issuer's metadata\n"
        "and keys, and ping Redis when one is configured. Every problem is one line that names the fix.",
        "exit status: 0 fine, 1 the issuer or Redis cannot be reached, 2 invalid settings,\n"
        "3 valid but with warnings",
    )
    check.add_argument(
        "--bind",
        default=None,
        help="the address the application server listens on: unix:PATH or HOST:PORT (default: --bind/-b in "
        "GUNICORN_CMD_ARGS), to check that the certificate is believed from it, and only from nginx",
    )
    check.add_argument(
        "--server",
        choices=("gunicorn", "uwsgi"),
        default="gunicorn",
        help="the application server (under uWSGI an address proves nothing: see docs/security.md)",
    )
    check.add_argument("--no-discovery", action="store_true", help="do not contact the issuer (Redis, when "
                       "configured, is still pinged)")
    check.add_argument("--app", default=None, metavar="MODULE:ATTR",
                       help="check the settings this Flask app or middleware runs with (app.config, then the "
                       "environment), instead of the environment alone")

    nginx = _command(
        commands, "nginx-config", "render the shipped nginx configuration",
        "Render the nginx server block (or, with --standalone, a whole nginx.conf) that terminates\n"
        "mutual TLS and forwards the client certificate to gunicorn or uWSGI. The certificate and\n"
        "key files are checked first: present, a certificate and a key, and a matching pair.",
        "example:\n  certbound-wsgi nginx-config --server-cert /etc/certbound/server.pem \\\n"
        "      --server-key /etc/certbound/server.key -o /etc/nginx/conf.d/certbound.conf",
    )
    nginx.add_argument("--upstream", choices=("gunicorn", "uwsgi"), default="gunicorn")
    nginx.add_argument(
        "--mode", choices=("middleware", "auth_request"), default="middleware",
        help="middleware: the backend runs the middleware; auth_request: the backend is any HTTP server, and "
        "nginx asks the auth app (--auth-backend) about each request first",
    )
    nginx.add_argument("--auth-backend", default=None,
                       help="with --mode auth_request: where the auth app listens, host:port or unix:/path")
    nginx.add_argument("--listen", default="443", help="nginx listen address, e.g. 443 or 127.0.0.1:8443")
    nginx.add_argument(
        "--backend",
        default="unix:/run/certbound/app.sock",
        help="the application server: unix:/path (default unix:/run/certbound/app.sock) or host:port",
    )
    nginx.add_argument("--server-cert", required=True, help="nginx TLS certificate (PEM)")
    nginx.add_argument("--server-key", required=True, help="nginx TLS private key (PEM)")
    nginx.add_argument(
        "--client-ca",
        default=None,
        help="verify client certificates against this CA (ssl_verify_client on); "
        "default: optional_no_ca, the binding itself is the proof (RFC 8705 section 2.2)",
    )
    nginx.add_argument(
        "--server-name",
        required=True,
        help="the names clients use (space separated); every other name is refused",
    )
    nginx.add_argument(
        "--proxy-secret-file",
        default=None,
        help="file holding the application's proxy_secret (default: the CERTBOUND_PROXY_SECRET environment "
        "variable); nginx adds it to every request so that the application knows the request came through nginx",
    )
    nginx.add_argument(
        "--proxy-secret-header",
        default=os.environ.get("CERTBOUND_PROXY_SECRET_HEADER") or DEFAULT_SECRET_HEADER,
        help=f"the application's proxy_secret_header (default {DEFAULT_SECRET_HEADER})",
    )
    nginx.add_argument(
        "--address-only-trust",
        action="store_true",
        help="allow a gunicorn TCP backend without the secret (the application trusts trusted_proxies "
        "addresses alone: every process that can use such an address can forge a certificate)",
    )
    nginx.add_argument("--standalone", action="store_true", help="wrap the server block in a full nginx.conf")
    nginx.add_argument("--prefix", default=None, help="with --standalone: directory for pid, logs and temp files")
    nginx.add_argument("--no-check-files", action="store_true",
                       help="do not read the certificate and key files (rendering for another host)")
    nginx.add_argument("-o", "--output", default="-", help="file to write ('-' for standard output)")
    _add_proxy_config(commands)
    return parser


def describe(error: ConfigurationError, kind: str = "configuration error") -> str:
    """The one line for a configuration error, naming the environment variable to fix.

    :param kind: what the line calls it: ``configuration error`` for ``check-config``;
        at start-up under gunicorn or uWSGI, ``ConfigurationError``, as a traceback's last line would.
    """
    from .settings import Settings, env_name

    known = error.option in Settings.__dataclass_fields__ or error.option == "app"
    variable = f" ({env_name(error.option)})" if known else ""
    return f"certbound-wsgi: {kind}: {error}{variable}"


def _add_proxy_config(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``proxy-config haproxy|caddy``: the options of :mod:`certbound_wsgi.proxy_config`'s renderers."""
    proxy = _command(commands, "proxy-config", "render the shipped HAProxy or Caddy configuration",
                     "Render proxies/haproxy.cfg or proxies/Caddyfile with checked values and the proxy secret,\n"
                     "and say which client_cert_header and client_cert_format the application needs.")
    which = proxy.add_subparsers(dest="proxy", required=True)
    haproxy = which.add_parser("haproxy", help="HAProxy 2.6+: X-Client-Cert, client_cert_format=base64_der")
    haproxy.add_argument("--listen", required=True, help="address:port to accept TLS on, e.g. 0.0.0.0:443")
    haproxy.add_argument("--server-pem", required=True, help="HAProxy's certificate followed by its key, one PEM")
    haproxy.add_argument("--client-ca", required=True,
                         help="CA bundle named when asking for a client certificate (others are let through)")
    caddy = which.add_parser("caddy", help="Caddy 2.6+: Client-Cert, client_cert_format=rfc9440")
    caddy.add_argument("--host", required=True, help="the site's name; clients must use it (Caddy's SNI rule)")
    caddy.add_argument("--port", default="443", help="the HTTPS port")
    caddy.add_argument("--bind", default="127.0.0.1", help="the address to listen on")
    caddy.add_argument("--server-cert", required=True, help="Caddy's TLS certificate (PEM)")
    caddy.add_argument("--server-key", required=True, help="its private key (PEM)")
    for sub in (haproxy, caddy):
        sub.add_argument("--backend", default="127.0.0.1:8000", help="the application server, host:port (HTTP)")
        sub.add_argument("--proxy-secret-file", default=None,
                         help="a file holding the application's proxy_secret (default: CERTBOUND_PROXY_SECRET)")
        sub.add_argument("-o", "--output", default="-", help="file to write ('-' for standard output)")


def _error(message: str) -> None:
    print(message, file=sys.stderr)


def thumbprint_command(path: str) -> int:
    """``certbound-wsgi thumbprint CERT``: 0, or 1 when the file cannot be read or holds no certificate.

    PEM, DER or URL-escaped PEM; of several certificates the first (a client's own comes first in
    its chain) is used, and standard error names it and how many others there were.
    """
    from .certificates import thumbprint_from_der
    from .pem_files import certificates_in, describe, read_certificates

    try:
        certificates = certificates_in(_stdin_bytes()) if path == "-" else read_certificates(path)
    except ValueError as exc:
        message = str(exc)
        _error(f"certbound-wsgi thumbprint: {message if path != '-' else f'{path}: {message}'}")
        return 1
    first = certificates[0]
    print(thumbprint_from_der(first.public_bytes(serialization.Encoding.DER)))
    if len(certificates) > 1:
        _error(f"certbound-wsgi thumbprint: {path} holds {len(certificates)} certificates; this is the first: "
               f"{describe(first)}")
    return 0


def _stdin_bytes() -> bytes:
    stream = getattr(sys.stdin, "buffer", None)
    return stream.read() if stream is not None else sys.stdin.read().encode("utf-8", "surrogateescape")


def check_config_command(bind: str | None = None, discover: bool = True, server: str = "gunicorn",
                         app: str | None = None) -> int:
    """``certbound-wsgi check-config``: validate, warn, discover, ping Redis.

    :param app: ``module:attr`` of an application whose effective settings to check.
    :returns: 0 (fine), 1 (the issuer or Redis cannot be reached), 2 (invalid, or no certificate could ever
        be believed: one ``error:`` line each, naming the fix), 3 (valid with warnings).
    """
    from .check import check_config, redis_problems

    try:
        settings, errors, warnings = check_config(bind=bind, server=server, app=app)
    except ConfigurationError as exc:
        _error(describe(exc))
        return 2
    print(json.dumps(settings.masked(), indent=2))
    for error in errors:
        _error(f"error: {error}")
    if errors:
        return 2
    for warning in warnings:
        _error(f"warning: {warning}")
    failed = _report_issuers(settings) if discover and settings.issuer else False
    problems = redis_problems(settings)
    for problem in problems:
        _error(f"redis failed: {problem}")
    if settings.uses_redis and not problems:
        print("redis: answers PING")
    if failed or problems:
        return 1
    return 3 if warnings else 0


def _report_issuers(settings: Settings) -> bool:
    """Print each issuer's metadata and keys with their ages; whether any could not be discovered."""
    from .check import discovery_fix, issuer_keys

    failed = False
    for report in issuer_keys(settings):
        if "error" in report:
            fix = discovery_fix(str(report["error"]), settings, report["issuer"])
            _error(f"discovery failed: {report['issuer']}: {report['error']}" + (f"; {fix}" if fix else ""))
            failed = True
            continue
        print(f"issuer metadata: {report['issuer']} (jwks_uri {report['jwks_uri']})")
        ages = report["key_ages"]
        print(f"signing keys: {', '.join(f'{kid} (age {_age(ages[kid])})' for kid in report['kids']) or 'none'}")
    return failed


def _age(seconds: float) -> str:
    """``3d4h``, ``2h5m``, ``40s``: how long ago a key was first fetched."""
    seconds = int(seconds)
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}{(seconds % size) // sub_size}{sub}"
    return f"{seconds}s"


def nginx_config_command(args: argparse.Namespace) -> int:
    """``certbound-wsgi nginx-config``: render a template to standard output or ``--output``.

    :param args: the parsed ``nginx-config`` arguments.
    :returns: 0 on success, 2 for an invalid argument, 1 when the output cannot be written.
    """
    from .nginx_config import render

    problem = None if args.no_check_files else _nginx_input_problem(args)
    if problem is not None:
        _error(f"certbound-wsgi nginx-config: error: {problem}")
        return 2
    try:
        secret = _read_secret(args.proxy_secret_file)
        text = render(
            args.upstream,
            listen=args.listen,
            backend=args.backend,
            server_cert=args.server_cert,
            server_key=args.server_key,
            client_ca=args.client_ca,
            server_name=args.server_name,
            proxy_secret=secret,
            proxy_secret_header=args.proxy_secret_header,
            address_only_trust=args.address_only_trust,
            standalone=args.standalone,
            prefix=args.prefix,
            mode=args.mode,
            auth_backend=args.auth_backend,
        )
    except ConfigurationError as exc:
        message = str(exc).removeprefix(f"{exc.option}: ")
        _error(f"certbound-wsgi nginx-config: error: --{exc.option.replace('_', '-')}: {message}")
        return 2
    try:
        _write(text, args.output)
    except OSError as exc:
        _error(f"certbound-wsgi nginx-config: error: cannot write {args.output}: {exc.strerror or exc}")
        return 1
    if secret is None:
        # What the application must be told, or it believes no certificate from this nginx (issue 11 item 3).
        trusted = "unix" if args.backend.startswith("unix:") else "<nginx's address>/32 (address-only trust)"
        _error(f"certbound-wsgi nginx-config: note: no proxy secret; the application needs "
               f"CERTBOUND_TRUSTED_PROXIES={trusted}")
    return 0


def _read_secret(path: str | None) -> str | None:
    """``--proxy-secret-file`` (one line; the line ending is dropped), else ``CERTBOUND_PROXY_SECRET``.

    :raises ConfigurationError: the file cannot be read.
    """
    if path:
        try:
            with open(path, encoding="ascii") as fh:
                return fh.read().rstrip("\r\n")
        except (OSError, UnicodeError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise ConfigurationError("proxy_secret_file", f"cannot read {path!r}: {reason}") from None
    return os.environ.get("CERTBOUND_PROXY_SECRET") or None


def _nginx_input_problem(args: argparse.Namespace) -> str | None:
    """The first thing wrong with the certificate and key files nginx will load, as one line."""
    from .pem_files import check_key_pair, read_certificates, read_private_key

    swap = " (are --server-cert and --server-key swapped?)"
    try:
        certificates = read_certificates(args.server_cert)
    except ValueError as exc:
        return f"--server-cert: {exc}{swap if 'private key' in str(exc) else ''}"
    try:
        key = read_private_key(args.server_key)
        check_key_pair(certificates[0], key, args.server_cert, args.server_key)
    except ValueError as exc:
        return f"--server-key: {exc}{swap if 'holds a certificate' in str(exc) else ''}"
    try:
        if args.client_ca:
            read_certificates(args.client_ca)
    except ValueError as exc:
        return f"--client-ca: {exc}"
    return None


def proxy_config_command(args: argparse.Namespace) -> int:
    """``certbound-wsgi proxy-config haproxy|caddy``: render a template; say which header and format it writes.

    :returns: 0 on success, 2 for an invalid argument, 1 when the output cannot be written.
    """
    from .proxy_config import HEADERS, render_caddy, render_haproxy

    try:
        secret = _read_secret(args.proxy_secret_file)
        if secret is None:
            raise ConfigurationError("proxy_secret_file", "required (or CERTBOUND_PROXY_SECRET): the proxy adds "
                                     "the application's proxy_secret to every request")
        if args.proxy == "haproxy":
            text = render_haproxy(listen=args.listen, backend=args.backend, server_pem=args.server_pem,
                                  client_ca=args.client_ca, proxy_secret=secret)
        else:
            text = render_caddy(host=args.host, port=args.port, backend=args.backend, server_cert=args.server_cert,
                                server_key=args.server_key, proxy_secret=secret, bind=args.bind)
        _write(text, args.output)
    except ConfigurationError as exc:
        message = str(exc).removeprefix(f"{exc.option}: ")
        _error(f"certbound-wsgi proxy-config: error: --{exc.option.replace('_', '-')}: {message}")
        return 2
    except OSError as exc:
        _error(f"certbound-wsgi proxy-config: error: cannot write {args.output}: {exc.strerror or exc}")
        return 1
    header, cert_format = HEADERS[args.proxy]
    _error(f"the application needs: CERTBOUND_CLIENT_CERT_HEADER={header} CERTBOUND_CLIENT_CERT_FORMAT={cert_format}")
    return 0


def _write(text: str, output: str) -> None:
    """Write ``text`` to ``output`` (``-``: standard output), replacing a file in one step,
    so that an nginx reloading meanwhile never reads half a configuration. The file is
    created 0600: it may hold the proxy secret (nginx's master reads it as root)."""
    if output == "-":
        sys.stdout.write(text)
        return
    path = Path(output)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: :data:`sys.argv`), run the command and return its exit status."""
    args = _parser().parse_args(argv)
    if args.command == "demo":
        # The development package is loaded only for the demo.
        from .dev.demo import run_demo

        return run_demo(once=args.once, port=args.port)
    if args.command == "thumbprint":
        return thumbprint_command(args.cert)
    if args.command == "check-config":
        return check_config_command(bind=args.bind, discover=not args.no_discovery, server=args.server,
                                    app=args.app)
    if args.command == "proxy-config":
        return proxy_config_command(args)
    return nginx_config_command(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
