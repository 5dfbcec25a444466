"""A real redis-server on a free loopback port, which tests can kill, restart and slow down.

Also the other topologies the cache supports: :class:`RedisSentinel` (a sentinel
monitoring a :class:`RedisServer` master) and :class:`RedisClusterNodes` (a
Redis Cluster of masters without replicas).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import redis

from .procs import Process, free_port, require_binary, tail, wait_for_port, wait_until


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

    def fill(self) -> int:
        """Write junk keys (``junk:<n>``, with a TTL, as cache entries have) until a server with a
        ``maxmemory`` refuses even a one-byte write; return how many were written."""
        admin = self.client()
        written = 0
        try:
            for size in (4096, 64, 1):
                while True:
                    try:
                        admin.set(f"junk:{written}", b"x" * size, ex=600)
                    except redis.exceptions.OutOfMemoryError:
                        break
                    written += 1
        finally:
            admin.close()
        return written


class RedisSentinel:
    """One Redis Sentinel (``redis-server CONF --sentinel``) monitoring ``master_name`` at ``master_port``.

    Debian's redis-server runs as a sentinel with ``--sentinel``; the ``redis-sentinel`` name
    is used when installed. The sentinel rewrites its configuration file, kept in ``directory``.

    :ivar port: its TCP port on 127.0.0.1.
    """

    def __init__(self, directory: Path, master_name: str, master_port: int, *, quorum: int = 1,
                 down_after_ms: int = 5000) -> None:
        self.binary = require_binary("redis-server", "/usr/bin/redis-server")
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.master_name = master_name
        self.port = free_port()
        self.config = self.directory / "sentinel.conf"
        self.config.write_text("")
        log = self.directory / "sentinel.log"
        argv = [self.binary, str(self.config), "--sentinel", "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.directory),
                "--sentinel", "monitor", master_name, "127.0.0.1", str(master_port), str(quorum),
                "--sentinel", "down-after-milliseconds", master_name, str(down_after_ms)]
        self.process: Process | None = Process(argv, log)
        wait_for_port(self.port, proc=self.process.proc, log=log)
        client = self.client()
        try:
            assert wait_until(lambda: self._knows_master(client), timeout=10), tail(log)
        finally:
            client.close()

    @property
    def node(self) -> str:
        """``host:port``, as ``redis_sentinel_nodes`` takes it."""
        return f"127.0.0.1:{self.port}"

    def _knows_master(self, client: redis.Redis) -> bool:
        try:
            return client.sentinel_get_master_addr_by_name(self.master_name) is not None
        except redis.RedisError:
            return False

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None


class RedisClusterNodes:
    """``count`` redis-server masters (no replicas) joined by ``redis-cli --cluster create``.

    Each node has its own directory and an explicit cluster bus port (a free port, not port + 10000).

    :ivar servers: the nodes; ``servers[0].url`` is a seed for ``redis_url``.
    """

    def __init__(self, directory: Path, count: int = 3) -> None:
        cli = require_binary("redis-cli", "/usr/bin/redis-cli")
        self.servers: list[RedisServer] = []
        try:
            for index in range(count):
                self.servers.append(RedisServer(
                    directory / f"node{index}", "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                    "--cluster-port", str(free_port()), "--cluster-node-timeout", "5000",
                ))
            addresses = [f"127.0.0.1:{server.port}" for server in self.servers]
            subprocess.run([cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
                           check=True, capture_output=True, timeout=30)
            assert wait_until(self._ready, timeout=15), "the cluster did not reach cluster_state:ok"
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return self.servers[0].url

    def _ready(self) -> bool:
        for server in self.servers:
            client = server.client()
            try:
                if client.cluster("INFO").get("cluster_state") != "ok":
                    return False
            except redis.RedisError:
                return False
            finally:
                client.close()
        return True

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
