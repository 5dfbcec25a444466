"""``certbound-wsgi``: the command-line entry point.

Each sub-command lives in the module that owns its subject; this file only
parses arguments and dispatches.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="certbound-wsgi", description=__doc__)
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
        help="the address gunicorn binds to (default: --bind/-b in GUNICORN_CMD_ARGS), to check that only "
        "trusted proxies can reach it",
    )
    check.add_argument("--no-discovery", action="store_true", help="do not contact the issuer")

    nginx = commands.add_parser("nginx-config", help="render the shipped nginx configuration")
    nginx.add_argument("--upstream", choices=("gunicorn", "uwsgi"), default="gunicorn")
    nginx.add_argument("--listen", default="443", help="nginx listen address, e.g. 443 or 127.0.0.1:8443")
    nginx.add_argument("--backend", default="127.0.0.1:8000", help="gunicorn host:port or uWSGI socket")
    nginx.add_argument("--server-cert", required=True, help="nginx TLS certificate (PEM)")
    nginx.add_argument("--server-key", required=True, help="nginx TLS private key (PEM)")
    nginx.add_argument(
        "--client-ca",
        default=None,
        help="verify client certificates against this CA (ssl_verify_client on); "
        "default: optional_no_ca, the binding itself is the proof (RFC 8705 section 2.2)",
    )
    nginx.add_argument("--server-name", default="_")
    nginx.add_argument("--standalone", action="store_true", help="wrap the server block in a full nginx.conf")
    nginx.add_argument("--prefix", default=None, help="with --standalone: directory for pid, logs and temp files")
    nginx.add_argument("-o", "--output", default="-", help="file to write ('-' for standard output)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(once=args.once, port=args.port)
    if args.command == "thumbprint":
        from .certificates import thumbprint_command

        return thumbprint_command(args.cert)
    if args.command == "check-config":
        from .check import check_config_command

        return check_config_command(bind=args.bind, discover=not args.no_discovery)
    from .nginx_config import nginx_config_command

    return nginx_config_command(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
