"""Development only: the demo, a development issuer and PKI, a TLS dev server and the echo app.

Nothing on the request path imports this package (``tests/test_packaging.py``
checks it): only the command line (``certbound-wsgi demo``), the
``certbound_wsgi.wsgi`` entry point when no ``CERTBOUND_APP`` is named (it then
serves :func:`certbound_wsgi.dev.echo.echo_app`), and the tests use it.
"""
