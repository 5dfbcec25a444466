"""The one in-process store: a bounded, thread-safe LRU whose entries each have a deadline.

Everything this package keeps in process and an unauthenticated client can add
to is kept here, and so is bounded: introspection answers (the L1 cache),
sessions without Redis, and DPoP proof ids without Redis.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

from . import Entry

__all__ = ["MemoryCache", "MemoryStore", "TTLCache"]

V = TypeVar("V")


class TTLCache(Generic[V]):
    """At most ``size`` values, each until its own deadline; the least recently used go first.

    :param size: the most values kept.
    :param clock: the clock the deadlines are on.
    """

    def __init__(self, size: int, clock: Callable[[], float] = time.time) -> None:
        self._size = size
        self._clock = clock
        self._data: OrderedDict[str, tuple[V, float]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> V | None:
        """The value, or ``None`` when absent or past its deadline."""
        with self._lock:
            item = self._data.get(key)
            if item is None:
                return None
            if self._clock() >= item[1]:
                del self._data[key]
                return None
            self._data.move_to_end(key)
            return item[0]

    def put(self, key: str, value: V, until: float) -> None:
        """Keep ``value`` until the clock reads ``until``."""
        with self._lock:
            self._insert(key, value, until)

    def add(self, key: str, value: V, until: float) -> bool:
        """Keep ``value`` unless ``key`` holds a live value already; whether it was added (atomic)."""
        with self._lock:
            item = self._data.get(key)
            if item is not None and self._clock() < item[1]:
                return False
            self._insert(key, value, until)
            return True

    def pop(self, key: str) -> None:
        with self._lock:
            self._data.pop(key, None)

    def _insert(self, key: str, value: V, until: float) -> None:
        self._data[key] = (value, until)
        self._data.move_to_end(key)
        while len(self._data) > self._size:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


class MemoryCache(TTLCache[Entry]):
    """The introspection L1 cache: :class:`Entry` values, each kept until it may no longer be used.

    A subclass rather than a wrapper: :meth:`get` is on every L1 hit, and a call less there shows.

    :param size: the most entries kept; the least recently used go first.
    :param max_age: with a shared L2 behind it, how long an entry may stay here
        before L2 is asked again; ``None`` keeps entries until they go stale.
    :param clock: wall-clock seconds; injectable for tests.
    """

    def __init__(self, size: int, max_age: float | None = None, clock: Callable[[], float] = time.time) -> None:
        super().__init__(size, clock)
        self._max_age = max_age

    def set(self, key: str, entry: Entry, *, alone: bool = False) -> None:
        """Keep ``entry``; ``alone``: the shared L2 is unavailable, so keep it its whole life, not ``max_age``."""
        drop_at = entry.stale_until
        if self._max_age is not None and not alone:
            drop_at = min(drop_at, self._clock() + self._max_age)
        self.put(key, entry, drop_at)


class MemoryStore:
    """A :class:`~certbound_wsgi.cache.Store` in process: the store of one worker, for one-worker deployments.

    :param size: the most values kept.
    :param clock: the clock TTLs count on.
    """

    def __init__(self, size: int, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._values: TTLCache[bytes] = TTLCache(size, clock)

    def fetch(self, key: str) -> bytes | None:
        return self._values.get(key)

    def store(self, key: str, value: bytes, ttl: float) -> None:
        self._values.put(key, value, self._clock() + ttl)

    def add(self, key: str, value: bytes, ttl: float) -> bool:
        return self._values.add(key, value, self._clock() + ttl)

    def delete(self, key: str) -> None:
        self._values.pop(key)

    def __len__(self) -> int:
        return len(self._values)
