"""A real redis-server on a free loopback port, which tests can kill, restart and slow down."""

from __future__ import annotations

from pathlib import Path

import redis

from .procs import Process, free_port, require_binary, wait_for_port, wait_until


class RedisServer:
    """``redis-server`` without persistence, in ``directory``.

    :ivar port: its TCP port on 127.0.0.1 (kept across :meth:`restart`).
    """

    def __init__(self, directory: Path, *extra_args: str) -> None:
        self.binary = require_binary("redis-server", "/usr/bin/redis-server")
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.extra_args = list(extra_args)
        self.process: Process | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.directory), *self.extra_args]
        self.process = Process(argv, self.directory / "redis.log")
        wait_for_port(self.port, proc=self.process.proc, log=self.directory / "redis.log")
        client = self.client()
        assert wait_until(lambda: bool(client.ping()), timeout=10)
        client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def kill(self) -> None:
        """SIGKILL, as a crash."""
        if self.process is not None:
            self.process.signal(9)
            self.process.proc.wait(10)
            self.process.stop()
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)
