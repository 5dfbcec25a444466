"""The last-known-good copy of an issuer's metadata and JWKS, shared by every worker through Redis.

A worker that starts (or restarts, ``kill -HUP``) while the issuer is down
reads this copy and keeps serving the keys it holds, up to
``discovery_max_staleness``. The copy is sealed (:mod:`certbound_wsgi.cache.seal`):
whoever can write to Redis cannot slip a key of their own into it, nor move
one issuer's copy to another issuer's name. The same key carries a short lock,
so that when a refresh is due only one worker asks the issuer while the others
wait for its answer in Redis.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .cache.redis import RedisCache, RedisUnavailable
from .cache.seal import Sealer

__all__ = ["SharedKeys", "Snapshot"]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One successful fetch of an issuer's documents.

    :param metadata: the discovery document.
    :param jwks: the JWKS as the issuer served it.
    :param fetched_at: wall-clock seconds when the fetch started: the issuer was asked then or later.
    :param max_age: the JWKS response's freshness lifetime (``Cache-Control``), if it gave one; each
        worker makes its refresh period of it and its own ``rediscovery_lifetime``.
    :param first_seen: when each ``kid`` was first fetched (carried from copy to copy): the keys' ages.
    """

    metadata: dict[str, Any]
    jwks: dict[str, Any]
    fetched_at: float
    max_age: float | None
    first_seen: dict[str, float] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return json.dumps(
            {"m": self.metadata, "j": self.jwks, "t": self.fetched_at, "a": self.max_age, "s": self.first_seen},
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Snapshot | None:
        """Parse what :meth:`to_bytes` wrote; ``None`` for anything else."""
        try:
            raw = json.loads(data)
            max_age = None if raw["a"] is None else float(raw["a"])
            first_seen = {str(kid): float(seen) for kid, seen in dict(raw.get("s", {})).items()}
            snapshot = cls(dict(raw["m"]), dict(raw["j"]), float(raw["t"]), max_age, first_seen)
        except (ValueError, KeyError, TypeError, RecursionError):
            return None
        return snapshot


class SharedKeys:
    """One issuer's :class:`Snapshot` in Redis, and the lock of its refresh.

    :param redis: the shared cache (its lock TTL bounds how long a crashed fetcher holds others up).
    :param sealer: seals the copy; its purpose keeps these keys apart from every other kind.
    :param issuer: the issuer whose copy this is (part of the sealed key's name).
    :param ttl: seconds the copy lives in Redis: ``discovery_max_staleness``, after which it is useless.
    """

    def __init__(self, redis: RedisCache, sealer: Sealer, issuer: str, ttl: float) -> None:
        self._redis = redis
        self._sealer = sealer
        self._key = sealer.key_name("issuer-keys", issuer)
        self._ttl = ttl

    def load(self) -> Snapshot | None:
        """The shared copy; ``None`` when there is none, it was altered, or Redis cannot be asked."""
        try:
            data = self._redis.fetch(self._key, self._sealer)
        except RedisUnavailable:
            return None
        return None if data is None else Snapshot.from_bytes(data)

    def save(self, snapshot: Snapshot, now: float) -> None:
        """Share ``snapshot``, unless Redis cannot be asked (then each worker keeps its own)."""
        try:
            self._redis.store(self._key, self._sealer, snapshot.to_bytes(), snapshot.fetched_at + self._ttl - now)
        except RedisUnavailable:
            pass

    def lock(self) -> str | bool | None:
        """See :meth:`RedisCache.lock`: a token when this worker may fetch, ``False`` when another one is."""
        return self._redis.lock(self._key)

    def unlock(self, token: str) -> None:
        self._redis.unlock(self._key, token)
