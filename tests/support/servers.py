"""Real nginx, gunicorn and uWSGI processes on free loopback ports.

nginx runs with the configuration :func:`certbound_wsgi.nginx_config.render`
produces (``standalone=True``), so the tests exercise exactly what ships.
gunicorn and uWSGI run from this interpreter's environment, so they import the
code under test, on a free loopback port or, as docs/deploying.md recommends,
on a Unix socket (``unix_socket=``) with the documented permissions. Each
``start_*`` returns an object with ``.backend`` (what nginx passes to) and
``.stop()``; stop it in a fixture's teardown.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from certbound_wsgi.dev.pki import Issued
from certbound_wsgi.nginx_config import Upstream, render

from .procs import Process, free_port, require_binary, wait_for_port, wait_until

__all__ = [
    "Nginx", "Gunicorn", "UWSGI", "start_nginx", "start_gunicorn", "start_uwsgi", "REPO_ROOT", "PROXY_SECRET",
    "SERVER_NAME",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODULE = "certbound_wsgi.wsgi:application"
# docs/deploying.md: a uwsgi packet holds at most 65535 bytes, and nginx/uwsgi.conf keeps every request
# it accepts under that; nginx passes up to about 1000 header lines, each one or two uWSGI vars.
UWSGI_BUFFER_SIZE = 65535
UWSGI_MAX_VARS = 1024
#: A proxy secret for test stacks (the application's ``proxy_secret``, rendered into nginx).
PROXY_SECRET = "test-proxy-secret-0123456789abcdef-ABCDEF"
#: The name nginx serves; the rendered default server refuses every other (and bare IP addresses).
SERVER_NAME = "localhost"


def _venv_bin(name: str) -> str:
    """``name`` beside this interpreter (the virtualenv's ``bin``), so that it runs this Python."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise RuntimeError(f"{path} not found: install the test extras (pip install -e '.[test]')")
    return str(path)


def _app_env(env: dict[str, str]) -> dict[str, str]:
    """The environment for an application server: this one without ambient ``CERTBOUND_*``
    settings, with the repository importable, plus ``env``."""
    base = {key: value for key, value in os.environ.items() if not key.startswith("CERTBOUND_")}
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), base.get("PYTHONPATH")]))
    base.update(env)
    return base


def _log_dir(log_dir: Path | None, prefix: str) -> Path:
    if log_dir is None:
        return Path(tempfile.mkdtemp(prefix=f"certbound-{prefix}-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    return log_dir


class Nginx:
    """nginx started by :func:`start_nginx`.

    :ivar port: the HTTPS port on 127.0.0.1, served to clients that ask for ``localhost`` (SNI and Host).
    :ivar prefix: nginx's ``-p`` directory: configuration, pid, logs and temporary files.
    """

    def __init__(self, binary: str, prefix: Path, render_args: dict[str, Any], port: int | None = None) -> None:
        self.binary = binary
        self.prefix = prefix
        self.conf = prefix / "nginx.conf"
        self.error_log = prefix / "error.log"
        self.access_log = prefix / "access.log"
        self.port = port if port is not None else free_port()
        self._render_args = {**render_args, "listen": f"127.0.0.1:{self.port}"}
        self._write_and_test()
        self.process = Process(self._argv(), prefix / "nginx.out")
        try:
            wait_for_port(self.port, proc=self.process.proc, log=self.error_log)
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        # A name, not 127.0.0.1: a client sends SNI only for a name, and the default server
        # refuses handshakes without one.
        return f"https://{SERVER_NAME}:{self.port}"

    def _argv(self, *extra: str) -> list[str]:
        # Running as root, nginx would start its workers as "nobody", who cannot
        # enter pytest's private temporary directory to buffer large bodies.
        directives = "daemon off;" + (" user root;" if os.geteuid() == 0 else "")
        return [self.binary, "-p", str(self.prefix), "-c", str(self.conf), "-g", directives, *extra]

    def _write_and_test(self) -> None:
        self.conf.write_text(render(standalone=True, prefix=self.prefix, **self._render_args))
        result = subprocess.run(self._argv("-t"), check=False, capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise RuntimeError(f"nginx -t rejected {self.conf}:\n{result.stdout}{result.stderr}")

    def reload(self, **changes: Any) -> None:
        """Re-render with ``changes`` (keyword arguments of ``render``, e.g. ``backend=``,
        ``client_ca=``), check it with ``nginx -t``, SIGHUP the master, and return once every
        old worker has exited: until then an old worker may still accept a connection."""
        self._render_args.update(changes)
        self._write_and_test()
        old = self._workers()
        os.kill(self.process.pid, signal.SIGHUP)  # the master only: workers ignore it anyway
        if not wait_until(lambda: bool(self._workers()) and old.isdisjoint(self._workers()), timeout=15):
            raise TimeoutError(f"nginx did not replace its workers: {self.output()}")

    def _workers(self) -> set[int]:
        """The master's children (Linux): the worker processes."""
        pid = self.process.pid
        try:
            return {int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
        except OSError:
            return set()

    def _log_text(self) -> str:
        return self.error_log.read_text(errors="replace") if self.error_log.exists() else ""

    def output(self) -> str:
        """The tail of nginx's error log, for assertion messages."""
        return "\n".join(self._log_text().splitlines()[-40:])

    def stop(self) -> None:
        self.process.stop()


def start_nginx(
    tmp_dir: Path,
    upstream: Upstream,
    backend: str,
    server_cert: Issued,
    client_ca: Path | str | None = None,
    *,
    port: int | None = None,
    **render_args: Any,
) -> Nginx:
    """Render the shipped configuration for ``upstream`` in front of ``backend``, check it with
    ``nginx -t`` and run nginx in the foreground under ``tmp_dir``.

    :param tmp_dir: a fresh directory; becomes nginx's ``-p`` prefix.
    :param upstream: ``"gunicorn"`` or ``"uwsgi"``.
    :param backend: the application server's ``.backend`` (``127.0.0.1:<port>`` or ``unix:/path``).
    :param server_cert: nginx's certificate and key.
    :param client_ca: require client certificates from this CA (``ssl_verify_client on``).
    :param port: the port to listen on (e.g. one reserved with ``free_port`` so that the app can be told
        its public URL before nginx starts); default: a free port.
    :param render_args: further keyword arguments of ``render`` (e.g. ``proxy_secret``); ``server_name``
        defaults to ``localhost``.
    """
    binary = require_binary("nginx", "/usr/sbin/nginx")
    tmp_dir.mkdir(parents=True, exist_ok=True)
    return Nginx(
        binary,
        tmp_dir,
        {
            "upstream": upstream,
            "backend": backend,
            "server_cert": server_cert.cert_path,
            "server_key": server_cert.key_path,
            "client_ca": client_ca,
            "server_name": SERVER_NAME,
            **render_args,
        },
        port,
    )


class AppServer:
    """An application server on a loopback port or a Unix socket, started by :func:`start_gunicorn` or
    :func:`start_uwsgi`.

    :ivar port: the TCP port (0 on a Unix socket).
    :ivar socket_path: the Unix socket (``None`` on TCP).
    :ivar backend: what nginx passes to: ``127.0.0.1:<port>`` or ``unix:<path>``.
    """

    def __init__(self, argv: list[str], port: int, log: Path, env: dict[str, str],
                 socket_path: Path | None = None) -> None:
        self.port = port
        self.socket_path = socket_path
        self.backend = f"unix:{socket_path}" if socket_path is not None else f"127.0.0.1:{port}"
        self.process = Process(argv, log, env=env, cwd=REPO_ROOT)
        try:
            if socket_path is None:
                wait_for_port(port, proc=self.process.proc, log=log)
            elif not wait_until(lambda: _accepts(socket_path) or not self.process.alive(), timeout=20):
                raise TimeoutError(f"nothing listening on {socket_path}: {self.output()}")
            if not self.process.alive():
                raise RuntimeError(f"{argv[0]} exited: {self.output()}")
            self._wait_ready(argv)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, argv: list[str]) -> None:
        """Listening is ready enough for gunicorn."""

    def output(self) -> str:
        return self.process.output()

    def stop(self) -> None:
        self.process.stop()


def _accepts(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.2)
            sock.connect(str(path))
        return True
    except OSError:
        return False


class Gunicorn(AppServer):
    """gunicorn started by :func:`start_gunicorn`; ``.backend`` serves HTTP."""


def start_gunicorn(
    env: dict[str, str],
    workers: int = 2,
    worker_class: str = "sync",
    threads: int = 1,
    module: str = DEFAULT_MODULE,
    *,
    log_dir: Path | None = None,
    unix_socket: Path | None = None,
) -> Gunicorn:
    """Run ``gunicorn <module>`` on a free loopback port.

    :param env: added to the environment (the app reads its ``CERTBOUND_*`` settings from it);
        ambient ``CERTBOUND_*`` variables are removed first.
    :param workers: ``--workers``.
    :param worker_class: ``--worker-class`` (``sync``, ``gthread``, ...).
    :param threads: ``--threads``.
    :param module: the WSGI application, ``module:callable``.
    :param log_dir: where ``gunicorn.log`` goes (default: a new temporary directory).
    :param unix_socket: bind this Unix socket as docs/deploying.md does (``--umask 007``: mode 0660)
        instead of a loopback port.
    """
    port = 0 if unix_socket is not None else free_port()
    log = _log_dir(log_dir, "gunicorn") / "gunicorn.log"
    bind = ["--bind", f"unix:{unix_socket}", "--umask", "007"] if unix_socket else ["--bind", f"127.0.0.1:{port}"]
    argv = [
        _venv_bin("gunicorn"), module,
        *bind,
        "--workers", str(workers),
        "--worker-class", worker_class,
        "--threads", str(threads),
        "--graceful-timeout", "5",
        "--access-logfile", "-",
    ]
    return Gunicorn(argv, port, log, _app_env(env), unix_socket)


class UWSGI(AppServer):
    """uWSGI started by :func:`start_uwsgi`; ``.backend`` speaks the uwsgi protocol."""

    def _wait_ready(self, argv: list[str]) -> None:
        # The socket is bound before the application is imported; --need-app makes
        # uWSGI exit if the import fails, which this waits long enough to see.
        if not wait_until(lambda: "WSGI app 0 (mountpoint='') ready" in self.output() or not self.process.alive()):
            raise TimeoutError(f"uWSGI did not load {argv}: {self.output()}")
        if not self.process.alive():
            raise RuntimeError(f"uWSGI exited: {self.output()}")


def start_uwsgi(
    env: dict[str, str],
    processes: int = 2,
    module: str = DEFAULT_MODULE,
    *,
    log_dir: Path | None = None,
    unix_socket: Path | None = None,
) -> UWSGI:
    """Run uWSGI (the PyPI build in this virtualenv, so this Python) with a uwsgi-protocol
    socket on a free loopback port.

    :param env: added to the environment (the app reads its ``CERTBOUND_*`` settings from it);
        ambient ``CERTBOUND_*`` variables are removed first.
    :param processes: ``--processes``, under a ``--master``.
    :param module: the WSGI application, ``module:callable``.
    :param log_dir: where ``uwsgi.log`` goes (default: a new temporary directory).
    :param unix_socket: listen on this Unix socket as docs/deploying.md does (``--chmod-socket=660``)
        instead of a loopback port.
    """
    port = 0 if unix_socket is not None else free_port()
    log = _log_dir(log_dir, "uwsgi") / "uwsgi.log"
    listen = ["--socket", str(unix_socket), "--chmod-socket=660"] if unix_socket else ["--socket", f"127.0.0.1:{port}"]
    argv = [
        _venv_bin("uwsgi"),
        "--strict",
        *listen,
        "--module", module,
        "--master",
        "--processes", str(processes),
        "--die-on-term",
        "--need-app",
        "--virtualenv", sys.prefix,
        "--chdir", str(REPO_ROOT),
        "--buffer-size", str(UWSGI_BUFFER_SIZE),
        "--max-vars", str(UWSGI_MAX_VARS),
        "--enable-threads",
    ]
    return UWSGI(argv, port, log, _app_env(env), unix_socket)
