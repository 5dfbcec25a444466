"""The in-process (L1) cache: a bounded LRU with per-entry expiry."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from . import Entry

__all__ = ["MemoryCache"]


class MemoryCache:
    """A bounded, thread-safe LRU of :class:`Entry` values.

    :param size: the most entries kept; the least recently used go first.
    :param max_age: with a shared L2 behind it, how long an entry may stay here
        before L2 is asked again; ``None`` keeps entries until they go stale.
    :param clock: wall-clock seconds; injectable for tests.
    """

    def __init__(self, size: int, max_age: float | None = None, clock: Callable[[], float] = time.time) -> None:
        self._size = size
        self._max_age = max_age
        self._clock = clock
        self._data: OrderedDict[str, tuple[Entry, float]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> Entry | None:
        """The entry, fresh or stale, or ``None`` once it may no longer be used at all."""
        with self._lock:
            item = self._data.get(key)
            if item is None:
                return None
            entry, drop_at = item
            if self._clock() >= drop_at:
                del self._data[key]
                return None
            self._data.move_to_end(key)
            return entry

    def set(self, key: str, entry: Entry, *, alone: bool = False) -> None:
        """Keep ``entry``; ``alone``: the shared L2 is unavailable, so keep it its whole life, not ``max_age``."""
        drop_at = entry.stale_until
        if self._max_age is not None and not alone:
            drop_at = min(drop_at, self._clock() + self._max_age)
        with self._lock:
            self._data[key] = (entry, drop_at)
            self._data.move_to_end(key)
            while len(self._data) > self._size:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)
