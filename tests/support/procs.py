"""Starting and stopping the real servers the tests use.

Every server listens on a free loopback port. A missing binary skips the test
on a developer's machine but fails loudly when ``CI=true``: CI must never go
green by skipping the end-to-end suite.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def require_binary(name: str, *candidates: str) -> str:
    """Return the path of ``name`` (or the first of ``candidates`` found); skip, or fail in CI."""
    for candidate in (name, *candidates):
        executable = os.path.isabs(candidate) and os.access(candidate, os.X_OK)
        found = shutil.which(candidate) or (candidate if executable else None)
        if found:
            return found
    message = f"{name} is not installed; run tests/install-deps.sh"
    if IN_CI:
        pytest.fail(message + " (CI=true: end-to-end tests may not skip)", pytrace=False)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 20.0,
                  proc: subprocess.Popen[bytes] | None = None, log: Path | None = None) -> None:
    """Wait until something accepts connections on ``host:port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}: {tail(log)}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s: {tail(log)}")


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def tail(log: Path | None, lines: int = 40) -> str:
    if log is None or not log.exists():
        return ""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


class Process:
    """A child process whose output goes to a log file, stopped with its whole process group."""

    def __init__(self, argv: Sequence[str], log: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.argv = list(argv)
        self.log = log
        self._fh = open(log, "ab")
        self.proc: subprocess.Popen[bytes] = subprocess.Popen(
            self.argv, stdout=self._fh, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive():
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(5)
        self._fh.close()

    def output(self) -> str:
        return tail(self.log, 200)
