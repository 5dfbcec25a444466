"""A local HTTP endpoint that answers every request with a body chosen by the test."""

from __future__ import annotations

import threading
from typing import Any

from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response


class RawServer:
    """werkzeug's threaded server on a free loopback port; set ``body``, ``status`` and ``gzip`` per test.

    :ivar requests: what each request carried (its form and ``Authorization``), oldest first.
    """

    def __init__(self, path: str = "/introspect") -> None:
        self.body: bytes = b"{}"
        self.status = 200
        self.gzip = False
        self.requests: list[dict[str, Any]] = []

        @Request.application
        def app(request: Request) -> Response:
            self.requests.append({"form": dict(request.form), "auth": request.headers.get("Authorization")})
            response = Response(self.body, status=self.status, content_type="application/json")
            if self.gzip:
                response.headers["Content-Encoding"] = "gzip"
            return response

        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}{path}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
