"""Entry point for gunicorn and uWSGI, configured only from the environment.

``gunicorn certbound_wsgi.wsgi:application`` wraps the app named by
``CERTBOUND_APP=package.module:attribute`` (the development echo app,
:func:`certbound_wsgi.dev.echo.echo_app`, when unset) in
:class:`~certbound_wsgi.CertBoundMiddleware` configured from
``CERTBOUND_*`` variables. A bad setting stops the server at start-up with one
line on stderr that names the variable (and, for a typo, the one meant), not a
traceback per worker.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping
from typing import NoReturn

from .cli import describe
from .errors import ConfigurationError
from .loader import load_app
from .middleware import CertBoundMiddleware
from .settings import Settings

__all__ = ["application", "create_application", "load_app"]

#: The exit status of a worker that cannot load its application: gunicorn's ``APP_LOAD_ERROR``,
#: on which its arbiter stops ("App failed to load") instead of booting workers forever.
EXIT_CONFIGURATION = 4
#: Seconds the reporting gunicorn worker keeps its claim, while its siblings fail too.
HOLD_SECONDS = 2.0


def create_application(environ: Mapping[str, str] | None = None) -> CertBoundMiddleware:
    """The protected application described by ``environ`` (default: :data:`os.environ`)."""
    environ = os.environ if environ is None else environ
    settings = Settings.from_env(environ)
    target = environ.get("CERTBOUND_APP", "").strip()
    if target:
        return CertBoundMiddleware(load_app(target), settings)
    # Imported only when no app is named, so that a real deployment never loads the dev package.
    from .dev.echo import echo_app

    return CertBoundMiddleware(echo_app, settings)


def _under_a_server() -> bool:
    """Whether gunicorn or uWSGI is loading this module (uWSGI's embedded ``uwsgi`` module is built in)."""
    return "gunicorn" in sys.modules or "uwsgi" in sys.modules or "uwsgi" in sys.builtin_module_names


def _first_to_report() -> socket.socket | bool:
    """Whether this worker is the first of its server to report, and the claim that says so.

    Every gunicorn worker imports this module and fails the same way at the same moment. The
    first binds an abstract Unix socket named after their common parent (Linux; the kernel
    drops the name when the process exits) and keeps it while its siblings find it taken.
    Where abstract sockets do not exist, every worker reports.
    """
    claim = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        claim.bind(f"\0certbound-wsgi-config-error-{os.getuid()}-{os.getppid()}")
    except OSError as exc:
        claim.close()
        return exc.errno != errno.EADDRINUSE
    return claim


def _stop(error: ConfigurationError) -> NoReturn:
    """One line on stderr from one worker, then exit: no traceback per worker (issue 15).

    Under gunicorn the reporting worker exits with :data:`EXIT_CONFIGURATION` after holding its
    claim for :data:`HOLD_SECONDS`, and its arbiter then stops the siblings with SIGTERM, which
    they wait for without a word: two exits with gunicorn's ``APP_LOAD_ERROR`` would make its
    arbiter raise while it stops (``HaltServer`` inside ``halt``), a traceback of its own.
    """
    claim = _first_to_report()
    gunicorn = "gunicorn" in sys.modules
    if claim:
        print(describe(error, "ConfigurationError"), file=sys.stderr, flush=True)
        if isinstance(claim, socket.socket):
            if gunicorn:
                time.sleep(HOLD_SECONDS)  # the siblings, forked milliseconds apart, fail meanwhile
            claim.close()  # held long enough; closed, not left to the interpreter's exit
    elif gunicorn:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # gunicorn's own handler would let it linger
        time.sleep(HOLD_SECONDS + 10)
    raise SystemExit(EXIT_CONFIGURATION)


def _application() -> CertBoundMiddleware:
    try:
        return create_application()
    except ConfigurationError as error:
        if not _under_a_server():
            raise
        _stop(error)


application = _application()
