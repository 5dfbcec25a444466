"""Real HAProxy and Caddy processes on free loopback ports, running the shipped templates.

Each runs in the foreground with exactly what :mod:`certbound_wsgi.proxy_config`
renders; Caddy's HOME and XDG directories are a scratch folder and its admin
endpoint is off. ``stop()`` ends the process group.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from certbound_wsgi.dev.pki import Issued
from certbound_wsgi.proxy_config import render_caddy, render_haproxy

from .procs import Process, free_port, require_binary, wait_for_port
from .servers import PROXY_SECRET

__all__ = ["ProxyServer", "start_caddy", "start_haproxy"]


@dataclass
class ProxyServer:
    """A running proxy: ``url`` is what clients call."""

    name: str
    url: str
    port: int
    process: Process

    def output(self) -> str:
        return self.process.output()

    def stop(self) -> None:
        self.process.stop()


def _listening(process: Process, port: int) -> Process:
    """``process`` once it accepts connections on ``port``; stopped if it never does."""
    try:
        wait_for_port(port, proc=process.proc, log=process.log)
    except BaseException:
        process.stop()
        raise
    return process


def start_haproxy(directory: Path, backend: str, server: Issued, client_ca: Path | str) -> ProxyServer:
    """``haproxy -db`` (foreground) with the rendered ``proxies/haproxy.cfg``, checked with ``-c`` first."""
    binary = require_binary("haproxy", "/usr/sbin/haproxy")
    directory.mkdir(parents=True, exist_ok=True)
    server_pem = directory / "server.pem"
    # HAProxy's crt: certificate and key in one file.
    server_pem.write_text(server.cert_path.read_text() + server.key_path.read_text())
    server_pem.chmod(0o600)
    port = free_port()
    config = directory / "haproxy.cfg"
    config.write_text(render_haproxy(listen=f"127.0.0.1:{port}", backend=backend, server_pem=server_pem,
                                     client_ca=client_ca, proxy_secret=PROXY_SECRET))
    check = Process([binary, "-c", "-f", str(config)], directory / "check.log")
    status = check.proc.wait(30)
    check.stop()
    if status != 0:
        raise RuntimeError(f"haproxy -c rejected {config}: {check.output()}")
    process = _listening(Process([binary, "-db", "-f", str(config)], directory / "haproxy.log"), port)
    return ProxyServer("haproxy", f"https://127.0.0.1:{port}", port, process)


def start_caddy(directory: Path, backend: str, server: Issued) -> ProxyServer:
    """``caddy run`` with the rendered ``proxies/Caddyfile``; the URL uses ``localhost`` (Caddy's SNI = Host rule)."""
    binary = require_binary("caddy", "/usr/bin/caddy")
    home = directory / "home"
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = directory / "Caddyfile"
    config.write_text(render_caddy(host="localhost", port=port, backend=backend, server_cert=server.cert_path,
                                   server_key=server.key_path, proxy_secret=PROXY_SECRET))
    env = {"HOME": str(home), "XDG_DATA_HOME": str(home / "data"), "XDG_CONFIG_HOME": str(home / "config"),
           "PATH": "/usr/bin:/bin"}
    process = _listening(Process([binary, "run", "--config", str(config), "--adapter", "caddyfile"],
                                 directory / "caddy.log", env=env, cwd=directory), port)
    return ProxyServer("caddy", f"https://localhost:{port}", port, process)
