"""A stdlib HTTP server on a daemon thread, for the tests that need a peer that answers oddly."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def serving(server: http.server.HTTPServer, scheme: str = "http") -> Iterator[str]:
    """Run ``server`` until the block ends; yields its base URL (``scheme://127.0.0.1:port``)."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"{scheme}://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
