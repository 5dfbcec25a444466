"""A small closed-loop HTTPS load generator that presents a client certificate.

wrk cannot present a client certificate, so this is the load generator: one
thread per connection, each sending the same pre-built HTTP/1.1 request over a
kept-alive TLS connection made with alice's certificate, and reading each
response (status line, headers, Content-Length body) before the next. It runs
for a fixed time (after a warm-up) and never sends more than ``max_requests``.
It is Python, so it spends real CPU: on a 2-core machine it competes with nginx
and gunicorn, and the same generator with the same concurrency is used for
every stack compared.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from dataclasses import dataclass, field

__all__ = ["LoadResult", "client_context", "request_bytes", "run_load", "send_once"]


def client_context(ca_file: str, cert_file: str, key_file: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca_file)
    context.load_cert_chain(cert_file, key_file)
    return context


def request_bytes(path: str, host: str, token: str | None) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "User-Agent: certbound-bench", "Accept: */*"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class _Connection:
    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        self._port = port
        self._context = context
        self._sock: ssl.SSLSocket | None = None
        self._buffer = b""

    def connect(self) -> None:
        raw = socket.create_connection(("127.0.0.1", self._port), timeout=30)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # A name, for SNI: nginx's default server refuses handshakes without one (issue 11).
        self._sock = self._context.wrap_socket(raw, server_hostname="localhost")
        self._buffer = b""

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _recv(self) -> bytes:
        assert self._sock is not None
        data = self._sock.recv(65536)
        if not data:
            raise ConnectionError("closed by the server")
        return data

    def exchange(self, request: bytes) -> tuple[int, bytes]:
        """Send ``request``; return the status and body. Reconnects when the server closed."""
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        self._sock.sendall(request)
        buffer = self._buffer
        while b"\r\n\r\n" not in buffer:
            buffer += self._recv()
        head, _, rest = buffer.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = 0
        close = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        while len(rest) < length:
            rest += self._recv()
        body, self._buffer = rest[:length], rest[length:]
        if close:
            self.close()
        return status, body


def send_once(port: int, context: ssl.SSLContext, request: bytes) -> tuple[int, bytes]:
    connection = _Connection(port, context)
    try:
        return connection.exchange(request)
    finally:
        connection.close()


@dataclass
class LoadResult:
    requests: int
    errors: int
    seconds: float
    statuses: dict[int, int]
    latencies_ms: list[float] = field(repr=False)
    generator_cpu_s: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_load(port: int, context: ssl.SSLContext, request: bytes, *, connections: int, duration: float,
             warmup: float, max_requests: int = 1_000_000) -> LoadResult:
    """Keep ``connections`` requests in flight for ``warmup + duration`` seconds; count the last ``duration``."""
    start = time.monotonic()
    measure_from = start + warmup
    stop_at = measure_from + duration
    lock = threading.Lock()
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0
    budget = [max_requests]

    def worker() -> None:
        nonlocal errors
        connection = _Connection(port, context)
        mine: list[float] = []
        seen: dict[int, int] = {}
        failed = 0
        try:
            while True:
                begin = time.monotonic()
                if begin >= stop_at:
                    break
                with lock:
                    if budget[0] <= 0:
                        break
                    budget[0] -= 1
                try:
                    status, _ = connection.exchange(request)
                except (OSError, ValueError, IndexError):
                    connection.close()
                    failed += 1
                    continue
                end = time.monotonic()
                if begin >= measure_from and end <= stop_at:
                    mine.append((end - begin) * 1000)
                    seen[status] = seen.get(status, 0) + 1
        finally:
            connection.close()
            with lock:
                latencies.extend(mine)
                for status, count in seen.items():
                    statuses[status] = statuses.get(status, 0) + count
                errors += failed

    cpu_before = time.process_time()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    cpu = time.process_time() - cpu_before
    return LoadResult(len(latencies), errors, duration, statuses, latencies, cpu)
