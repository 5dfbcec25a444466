"""TEST-ONLY bridge, until ``certificates.py`` reads ``client_cert_format`` itself (issue 16).

``gunicorn tests.support.cert_header_shim:application`` runs the protected
application of :mod:`certbound_wsgi.wsgi` behind one step: the certificate
header a proxy wrote (``SHIM_CERT_HEADER``, e.g. ``X-Client-Cert``) in its
format (``SHIM_CERT_FORMAT``, e.g. ``base64_der``) is parsed with
:func:`certbound_wsgi.cert_headers.leaf` and handed on as the URL-escaped PEM
in ``X-SSL-Client-Cert``, the one header the middleware reads today.

What reaches the middleware is decided here exactly as the integrated option
will decide it: a client's own ``X-SSL-Client-Cert`` is always dropped; an
absent proxy header means no certificate; a value that is not of the
configured format becomes an unparseable certificate (so the middleware
answers 401, as ``InvalidToken`` will once integrated). The lead replaces
this module with ``CERTBOUND_CLIENT_CERT_FORMAT`` after the merge.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterable
from typing import cast
from urllib.parse import quote

from certbound_wsgi.cert_headers import CertificateFormat, leaf
from certbound_wsgi.types import StartResponse, WSGIEnvironment
from certbound_wsgi.wsgi import application as protected

_FORMAT = cast(CertificateFormat, os.environ["SHIM_CERT_FORMAT"])
_SOURCE = "HTTP_" + os.environ["SHIM_CERT_HEADER"].upper().replace("-", "_")
_TARGET = "HTTP_X_SSL_CLIENT_CERT"
# Not a certificate: the middleware refuses it as "could not be parsed".
_UNPARSEABLE = "unparseable"


def _escaped_pem(der: bytes) -> str:
    body = base64.encodebytes(der).decode("ascii")
    return quote(f"-----BEGIN CERTIFICATE-----\n{body}-----END CERTIFICATE-----\n", safe="")


def application(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    environ.pop(_TARGET, None)
    raw = environ.pop(_SOURCE, None)
    if raw:
        try:
            found = leaf(_FORMAT, str(raw))
        except ValueError:
            environ[_TARGET] = _UNPARSEABLE
        else:
            # A Hash-only XFCC element has no DER to hand on; these proxies always send the DER.
            environ[_TARGET] = _escaped_pem(found.der) if found.der is not None else _UNPARSEABLE
    return protected(environ, start_response)
