"""Caches: the :class:`Store` protocol, and the :class:`Entry` of introspection answers.

Introspection answers live in an in-process L1 (:mod:`.memory`) and a shared, sealed Redis L2 (:mod:`.redis`).

Both hold :class:`Entry` values. An entry is *fresh* until ``fresh_until``
and may be *resurrected* (used stale while the issuer is unreachable) until
``stale_until``; both are absolute wall-clock times and neither ever passes the
token's own ``exp``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..types import Claims

__all__ = ["Entry", "Store"]


class Store(Protocol):
    """Bytes by key, each for a while: :class:`~.memory.MemoryStore`, or Redis sealed (as sessions keep them)."""

    def fetch(self, key: str) -> bytes | None:
        """The value, or ``None`` when absent or expired."""

    def store(self, key: str, value: bytes, ttl: float) -> None:
        """Keep ``value`` for ``ttl`` seconds."""

    def add(self, key: str, value: bytes, ttl: float) -> bool:
        """Keep ``value`` for ``ttl`` seconds unless ``key`` holds a value already (atomic: ``SET NX``);
        whether it was kept."""

    def delete(self, key: str) -> None:
        """Forget ``key``."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One introspection answer.

    :param active: the response's ``active`` member.
    :param claims: the whole response (empty for an inactive token).
    :param fresh_until: usable without asking the issuer until then.
    :param stale_until: usable while the issuer is down until then.
    """

    active: bool
    fresh_until: float
    stale_until: float
    claims: Claims = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return json.dumps(
            {"a": self.active, "f": self.fresh_until, "s": self.stale_until, "c": self.claims},
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Entry | None:
        """Parse what :meth:`to_bytes` wrote; ``None`` for anything else."""
        try:
            raw: Any = json.loads(data)
            entry = cls(bool(raw["a"]), float(raw["f"]), float(raw["s"]), dict(raw["c"]))
        except (ValueError, KeyError, TypeError, RecursionError):
            return None
        return entry
