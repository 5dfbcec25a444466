"""A threaded HTTPS server that hands the TLS client certificate to the WSGI app.

Development only: it backs ``certbound-wsgi demo`` and the tests. In production
the TLS terminator (nginx, uWSGI, gunicorn) puts the certificate into the environ
and this module is not involved.

The environ contract is the one nginx and Apache use: ``SSL_CLIENT_CERT`` holds
the PEM of the certificate the peer presented, and is empty when it presented
none, so an app never has to distinguish "missing key" from "no certificate".
Given a ``proxy_secret``, the server also sets ``CERTBOUND_PROXY_SECRET`` as
nginx does for uWSGI, so that the middleware believes the certificate through
the same authenticated channel as in production.
"""

from __future__ import annotations

import logging
import ssl
import threading
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from ..channel import UWSGI_SECRET_VAR
from ..types import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["ClientCertRequestHandler", "DevServer", "server_ssl_context"]

_logger = logging.getLogger(__name__)


def server_ssl_context(
    certfile: Path | str, keyfile: Path | str, *, client_ca: Path | str | None = None
) -> ssl.SSLContext:
    """A TLS server context that asks for, but does not insist on, a client certificate.

    :param certfile: the server certificate (PEM).
    :param keyfile: its private key (PEM, unencrypted).
    :param client_ca: CA bundle that client certificates must chain to. ``None``
        means the server does not ask for one at all.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(certfile), str(keyfile))
    if client_ca is not None:
        # CERT_OPTIONAL, not CERT_REQUIRED: a request without a certificate must
        # reach the app so that it can answer with a proper OAuth error
        # (RFC 8705 section 3) instead of a failed handshake.
        context.verify_mode = ssl.CERT_OPTIONAL
        context.load_verify_locations(cafile=str(client_ca))
    return context


def _peer_certificate_pem(connection: object) -> str:
    if not isinstance(connection, ssl.SSLSocket):
        return ""
    der = connection.getpeercert(binary_form=True)
    return ssl.DER_cert_to_PEM_cert(der) if der else ""


class ClientCertRequestHandler(WSGIRequestHandler):
    """Sets ``SSL_CLIENT_CERT`` (PEM, or ``""``) and logs through :mod:`logging`."""

    # Declared here so that werkzeug does not set it on the class for us.
    protocol_version = "HTTP/1.1"

    def make_environ(self) -> WSGIEnvironment:
        environ = super().make_environ()
        # Always set, overriding whatever a client may have smuggled in: the
        # handshake is the only source of this value.
        environ["SSL_CLIENT_CERT"] = _peer_certificate_pem(self.connection)
        secret = getattr(self.server, "certbound_proxy_secret", None)
        if secret:
            environ[UWSGI_SECRET_VAR] = secret
        return environ

    def log(self, type: str, message: str, *args: Any) -> None:
        # werkzeug's access log would interleave with the demo's report.
        level = logging.WARNING if type == "error" else logging.DEBUG
        # An IPv6 scoped address contains "%", which would break the format.
        address = self.address_string().replace("%", "%%")
        _logger.log(level, f"{address} - {message.rstrip()}", *args)


def _not_started(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
    start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
    return [b"not started\n"]


class DevServer:
    """A bound, not yet serving, threaded HTTPS server on a loopback port.

    Binding happens in the constructor so that :attr:`url` is known before the
    app is built (an issuer needs its own URL); :meth:`start` then serves ``app``
    from a daemon thread.

    :param ssl_context: see :func:`server_ssl_context`.
    :param host: address to bind; loopback by default.
    :param port: port to bind; ``0`` picks a free one.
    :param proxy_secret: the app's ``proxy_secret``, added to every request as nginx would.
    :raises OSError: when the address cannot be bound.
    """

    def __init__(self, ssl_context: ssl.SSLContext, *, host: str = "127.0.0.1", port: int = 0,
                 proxy_secret: str | None = None) -> None:
        try:
            self._server: BaseWSGIServer = make_server(
                host,
                port,
                _not_started,
                threaded=True,
                request_handler=ClientCertRequestHandler,
                ssl_context=ssl_context,
            )
        except SystemExit as exc:
            # werkzeug prints the reason (e.g. "Address already in use") and
            # exits; a library caller wants an exception it can handle.
            raise OSError(f"cannot listen on {host}:{port}") from exc
        self._server.certbound_proxy_secret = proxy_secret  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return self._server.host

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def url(self) -> str:
        """``https://host:port``, without a trailing slash."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    def start(self, app: WSGIApplication) -> Self:
        """Serve ``app`` from a daemon thread; returns ``self``."""
        if self._thread is not None:
            raise RuntimeError("DevServer.start() called twice")
        self._server.app = app
        # A short poll interval keeps shutdown() quick.
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"devserver-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def shutdown(self) -> None:
        """Stop serving and close the listening socket. Idempotent."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.shutdown()
