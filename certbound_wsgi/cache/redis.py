"""The shared (L2) cache in Redis, sealed, with a circuit breaker and a short lock.

Redis trouble must never cost a request more than ``redis_timeout`` once, nor
ever change a decision: after an error the breaker stays open for a moment,
during which Redis is skipped entirely (the L1 cache and direct introspection
carry on); then it is tried again, so a restarted Redis is used without a
restart of ours. One log line per breaker opening, not one per request.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..errors import ConfigurationError
from ..settings import Settings
from ..stats import Stats
from . import Entry
from .seal import Sealer

__all__ = [
    "NO_EVICTION", "RedisCache", "RedisUnavailable", "check_replay_store", "eviction_policy", "make_client",
    "make_replay_client", "replay_store_warning",
]

log = logging.getLogger("certbound_wsgi")

#: Seconds Redis is left alone after an error.
BREAKER_SECONDS = 1.0
#: Seconds a single-flight lock lives unless released.
LOCK_SECONDS = 0.8
#: Introspection entries kept opened, by their key and sealed bytes (emptied when full).
OPENED_SIZE = 1024
_UNLOCK = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


class RedisUnavailable(Exception):
    """Redis cannot be asked now (an error, or the breaker is open)."""


#: The one ``maxmemory-policy`` under which Redis never drops a key before its TTL: every other one
#: evicts, and the ``volatile-*`` policies evict exactly our keys, which all have a TTL.
NO_EVICTION = "noeviction"


def _options(settings: Settings) -> dict[str, Any]:
    return {
        "socket_timeout": settings.redis_timeout,
        "socket_connect_timeout": settings.redis_timeout,
        # redis-py retries with back-off by default; a retry would multiply the stall.
        "retry": Retry(NoBackoff(), 0),
    }


def make_client(settings: Settings) -> Any:
    """A redis-py client for ``redis_url``, a Sentinel master, or a Cluster, with short timeouts and no retries."""
    options = _options(settings)
    if settings.redis_sentinel_master:
        from redis.sentinel import Sentinel

        nodes = []
        for node in settings.redis_sentinel_nodes:
            host, _, port = node.rpartition(":")
            nodes.append((host.strip("[]"), int(port)))
        sentinel = Sentinel(nodes, sentinel_kwargs=options, **options)  # type: ignore[no-untyped-call]
        return sentinel.master_for(settings.redis_sentinel_master, **options)  # type: ignore[no-untyped-call]
    if settings.redis_cluster:
        from redis.cluster import RedisCluster

        return RedisCluster.from_url(settings.redis_url, **options)
    return redis.Redis.from_url(settings.redis_url, **options)


def make_replay_client(settings: Settings) -> Any:
    """A client of its own for the DPoP replay store: ``dpop_replay_redis_url``, else the cache's Redis.

    Its own connection pool and circuit breaker (in its :class:`RedisCache`): trouble with
    one store (an OOM refusal, say) never switches the other off.
    """
    if settings.dpop_replay_redis_url:
        return redis.Redis.from_url(settings.dpop_replay_redis_url, **_options(settings))
    return make_client(settings)


def eviction_policy(client: Any) -> str | None:
    """The server's ``maxmemory-policy``; ``None`` when it cannot be read (``CONFIG`` disabled or
    renamed, as managed services do; an ACL without ``+config``; Redis unreachable)."""
    try:
        answer = client.config_get("maxmemory-policy")
    except (redis.RedisError, OSError):
        return None
    if isinstance(answer, dict) and answer and all(isinstance(v, dict) for v in answer.values()):
        # A Cluster answers per node: the weakest node decides.
        policies = {str(_text(v.get("maxmemory-policy"))) for v in answer.values()}
        return next(iter(policies - {NO_EVICTION}), NO_EVICTION) if policies else None
    policy = answer.get("maxmemory-policy") if isinstance(answer, dict) else None
    return _text(policy) if policy is not None else None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def check_replay_store(client: Any) -> str | None:
    """The start-up check of the DPoP replay store (RFC 9449 section 11.1): a proof's ``jti`` must be
    remembered for the proof's whole lifetime, so Redis must never evict it.

    :returns: a warning when the policy cannot be verified; ``None`` when it is ``noeviction``.
    :raises ConfigurationError: an evicting policy: a replayed proof would pass once other writes evict it.
    """
    policy = eviction_policy(client)
    if policy is None:
        return ("cannot verify the DPoP replay store's maxmemory-policy (CONFIG GET refused or Redis unreachable): "
                "it must be noeviction, or replayed proofs pass once Redis evicts their jti")
    if policy != NO_EVICTION:
        raise ConfigurationError(
            "dpop_replay_redis_url",
            f"the DPoP replay store's Redis has maxmemory-policy {policy}, which evicts remembered proofs so "
            "that a replay passes; give the replay store a Redis with maxmemory-policy noeviction",
        )
    return None


def replay_store_warning(settings: Settings) -> str | None:
    """:func:`check_replay_store` for ``settings``' replay store, for ``check-config``.

    :returns: ``None`` also when DPoP is off or no Redis is configured.
    :raises ConfigurationError: the replay store evicts.
    """
    if settings.proof_of_possession_dpop == "off" or not (settings.dpop_replay_redis_url or settings.uses_redis):
        return None
    client = make_replay_client(settings)
    try:
        return check_replay_store(client)
    finally:
        client.close()


class RedisCache:
    """Sealed :class:`Entry` values in Redis, plus a per-key lock for single flight across workers.

    :param client: a redis-py client (see :func:`make_client`).
    :param sealer: seals entries and names keys.
    :param stats: where errors are counted.
    :param lock_ttl: seconds a lock lives unless released. Short on purpose: a lock orphaned by a
        Redis stall (its release timed out, or its SET ran late) then holds others up at most this
        long, and an introspection slower than this merely costs a second call, not a wrong answer.
    """

    def __init__(self, client: Any, sealer: Sealer, stats: Stats, *, lock_ttl: float = LOCK_SECONDS,
                 clock: Callable[[], float] = time.time, meanwhile: str = "using the in-process cache") -> None:
        self._client = client
        self._meanwhile = meanwhile
        self._sealer = sealer
        self._stats = stats
        self._lock_ms = int(lock_ttl * 1000)
        self._clock = clock
        self._open_until = 0.0
        self._breaker_lock = threading.Lock()
        self._unlock = client.register_script(_UNLOCK)
        self._opened: dict[tuple[str, bytes], Entry] = {}

    @property
    def available(self) -> bool:
        """False while the breaker is open."""
        return time.monotonic() >= self._open_until

    def _failed(self, exc: Exception) -> None:
        self._stats.incr("redis_errors")
        with self._breaker_lock:
            first = self.available
            self._open_until = time.monotonic() + BREAKER_SECONDS
        if first:
            log.warning("certbound: Redis unavailable (%s); %s for %.0fs", type(exc).__name__, self._meanwhile,
                        BREAKER_SECONDS)

    def get(self, key: str) -> Entry | None:
        """The entry, or ``None`` on a miss, a foreign or altered entry, or Redis trouble."""
        try:
            blob = self._read(key)
        except RedisUnavailable:
            return None
        if blob is None:
            return None
        # The same sealed bytes at the same key open to the same entry: an entry read again unchanged
        # (another worker's answer, or one this worker's L1 let go) costs a lookup, not AES-GCM and a
        # JSON parse. Keyed by the key name too, so that bytes moved to another key still fail to open;
        # only entries that opened get in.
        entry = self._opened.get((key, blob))
        if entry is None:
            plaintext = self._open(key, blob, self._sealer)
            entry = None if plaintext is None else Entry.from_bytes(plaintext)
            if entry is not None:
                if len(self._opened) >= OPENED_SIZE:
                    self._opened.clear()
                self._opened[(key, blob)] = entry
        return entry

    def set(self, key: str, entry: Entry) -> None:
        try:
            self.store(key, self._sealer, entry.to_bytes(), entry.stale_until - self._clock())
        except RedisUnavailable:
            pass

    # -- sealed values of any kind ---------------------------------------------------

    def fetch(self, key: str, sealer: Sealer) -> bytes | None:
        """The opened value at ``key``; ``None`` on a miss or a foreign or altered value.

        :raises RedisUnavailable: Redis cannot be asked now.
        """
        blob = self._read(key)
        return None if blob is None else self._open(key, blob, sealer)

    def _read(self, key: str) -> bytes | None:
        """The sealed bytes at ``key``, or ``None``.

        :raises RedisUnavailable: Redis cannot be asked now.
        """
        if not self.available:
            raise RedisUnavailable()
        try:
            blob = self._client.get(key)
        except (redis.RedisError, OSError) as exc:
            self._failed(exc)
            raise RedisUnavailable() from None
        return blob if isinstance(blob, bytes) else None

    @staticmethod
    def _open(key: str, blob: bytes, sealer: Sealer) -> bytes | None:
        plaintext = sealer.open(key, blob)
        if plaintext is None:
            log.warning("certbound: a Redis entry failed authentication and was ignored")
        return plaintext

    def store(self, key: str, sealer: Sealer, value: bytes, ttl: float, *, only_new: bool = False) -> bool:
        """Seal ``value`` at ``key`` for ``ttl`` seconds.

        :param only_new: ``SET NX``: only if ``key`` does not exist.
        :returns: whether it was stored (False: ``only_new`` and the key existed).
        :raises RedisUnavailable: Redis cannot be asked now.
        """
        ttl_ms = int(ttl * 1000)
        if ttl_ms <= 0:
            return True  # already over: nothing to keep
        if not self.available:
            raise RedisUnavailable()
        try:
            return bool(self._client.set(key, sealer.seal(key, value), px=ttl_ms, nx=only_new))
        except (redis.RedisError, OSError) as exc:
            self._failed(exc)
            raise RedisUnavailable() from None

    def delete(self, key: str) -> None:
        """Remove ``key``.

        :raises RedisUnavailable: Redis cannot be asked now, so the key may still be there.
        """
        if not self.available:
            raise RedisUnavailable()
        try:
            self._client.delete(key)
        except (redis.RedisError, OSError) as exc:
            self._failed(exc)
            raise RedisUnavailable() from None

    def add_once(self, key: str, ttl: float) -> bool | None:
        """``SET key NX`` with a TTL: True if it was new, False if it existed, None if Redis cannot be asked
        (down, timed out, or refusing writes: ``OOM`` under ``noeviction``)."""
        if not self.available:
            return None
        try:
            return bool(self._client.set(key, b"1", nx=True, px=max(1, int(ttl * 1000))))
        except (redis.RedisError, OSError) as exc:
            self._failed(exc)
            return None

    def lock(self, key: str) -> str | bool | None:
        """Try to become the one worker that introspects ``key``.

        :returns: a token to pass to :meth:`unlock` when acquired; ``False`` when
            another worker holds the lock; ``None`` when Redis cannot be asked.
        """
        if not self.available:
            return None
        token = os.urandom(16).hex()
        try:
            acquired = self._client.set(key + ":lock", token, nx=True, px=self._lock_ms)
        except (redis.RedisError, OSError) as exc:
            self._failed(exc)
            return None
        return token if acquired else False

    def unlock(self, key: str, token: str) -> None:
        if not self.available:
            return
        try:
            self._unlock(keys=[key + ":lock"], args=[token])
        except (redis.RedisError, OSError) as exc:
            self._failed(exc)
