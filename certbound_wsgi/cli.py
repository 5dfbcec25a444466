"""``certbound-wsgi``: every command, and all of their printing.

The modules these commands use (:mod:`~certbound_wsgi.certificates`,
:mod:`~certbound_wsgi.check`, :mod:`~certbound_wsgi.nginx_config`) return
values or raise; this module turns them into output and exit statuses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .channel import DEFAULT_SECRET_HEADER
from .errors import ConfigurationError

__all__ = ["check_config_command", "main", "nginx_config_command", "thumbprint_command"]

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="certbound-wsgi", description="Certificate-bound OAuth access tokens for WSGI apps: operator commands."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run the self-contained demonstration (no network needed)")
    demo.add_argument("--once", action="store_true", help="exit after showing the requests instead of serving")
    demo.add_argument("--port", type=int, default=0, help="port for the protected echo app (default: a free one)")

    thumb = commands.add_parser("thumbprint", help="print the RFC 8705 x5t#S256 thumbprint of a PEM certificate")
    thumb.add_argument("cert", help="path to a PEM certificate ('-' for standard input)")

    check = commands.add_parser(
        "check-config",
        help="load the CERTBOUND_* environment, run discovery, print the effective settings (secrets masked) "
        "and warn about unsafe ones",
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
    check.add_argument("--no-discovery", action="store_true", help="do not contact the issuer")

    nginx = commands.add_parser("nginx-config", help="render the shipped nginx configuration")
    nginx.add_argument("--upstream", choices=("gunicorn", "uwsgi"), default="gunicorn")
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
    nginx.add_argument("-o", "--output", default="-", help="file to write ('-' for standard output)")
    return parser


def _error(message: str) -> None:
    print(message, file=sys.stderr)


def thumbprint_command(path: str) -> int:
    """``certbound-wsgi thumbprint CERT.pem``: 0, or 1 when the file cannot be read or holds no certificate."""
    from .certificates import thumbprint_from_pem

    try:
        if path == "-":
            pem = sys.stdin.read()
        else:
            with open(path, encoding="utf-8", errors="strict") as fh:
                pem = fh.read()
        print(thumbprint_from_pem(pem))
    except (OSError, ValueError, UnicodeError) as exc:
        _error(f"certbound-wsgi thumbprint: {path}: {exc}")
        return 1
    return 0


def check_config_command(bind: str | None = None, discover: bool = True, server: str = "gunicorn") -> int:
    """``certbound-wsgi check-config``: validate, warn, discover.

    :returns: 0 (fine), 1 (discovery failed), 2 (invalid, or no certificate could ever be believed:
        one ``error:`` line each, naming the fix), 3 (valid with warnings).
    """
    from .check import check_config, issuer_keys

    try:
        settings, errors, warnings = check_config(bind=bind, server=server)
    except ConfigurationError as exc:
        _error(f"configuration error: {exc}")
        return 2
    print(json.dumps(settings.masked(), indent=2))
    for error in errors:
        _error(f"error: {error}")
    if errors:
        return 2
    for warning in warnings:
        _error(f"warning: {warning}")
    if discover and settings.issuer:
        failed = False
        for report in issuer_keys(settings):
            if "error" in report:
                _error(f"discovery failed: {report['issuer']}: {report['error']}")
                failed = True
                continue
            print(f"issuer metadata: {report['issuer']} (jwks_uri {report['jwks_uri']})")
            ages = report["key_ages"]
            print(f"signing keys: {', '.join(f'{kid} (age {_age(ages[kid])})' for kid in report['kids']) or 'none'}")
        if failed:
            return 1
    return 3 if warnings else 0


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
        return check_config_command(bind=args.bind, discover=not args.no_discovery, server=args.server)
    return nginx_config_command(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
