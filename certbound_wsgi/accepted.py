"""Accepted decisions, remembered: the warm path of a bearer JWT in one look-up.

When a JWT access token is read from the ``Authorization`` header only, validated
as a JWT only (no introspection), with no session and no DPoP proof, the decision on a
request depends on nothing but three things: the header's exact value, the thumbprint
of the certificate believed for the request (RFC 8705 section 3; ``None`` when there is
none, or when it did not come through the authenticated channel), and time. Time
enters through the token's ``exp`` (RFC 7519 section 4.1.4, with the leeway) and the
generation of the issuer's keys (a withdrawn or too stale key ends what it verified).

So an accepted decision is remembered under the header and the thumbprint, until the
token's memo entry would expire, and for as long as the keys' generation holds. A later
request with the same header and the same certificate is then answered by one
dictionary look-up, one clock read and the keys' due-refresh check, instead of
parsing the header, finding the token's memo entry and checking both bindings again.
It is remembered from the token's second acceptance on (the token is then in the memo
of verified tokens already): a token used once costs this memo neither time nor memory.

Only acceptances are remembered. A stolen token presented with another certificate,
or with none, has another key: it misses and takes the full path, which refuses it,
on every request. The channel is still decided on every request (the thumbprint is
``None`` unless the proxy's secret or socket vouched for the certificate), and so is
everything after the decision (the audit event, the metrics, the claims' copy).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

__all__ = ["AcceptedMemo", "KeyGeneration"]

T = TypeVar("T")


class KeyGeneration(Protocol):
    """The issuer's keys as the memo sees them: :class:`~certbound_wsgi.discovery.Discovery`."""

    def refresh_if_due(self) -> int: ...


class AcceptedMemo(Generic[T]):
    """Accepted decisions by (``Authorization`` header, thumbprint), each until it may no longer stand.

    :param size: how many are remembered (``token_cache_size``); the oldest tenth goes when full.
    :param clock: wall-clock seconds, the validator's own, so that both expire a token at once.
    """

    def __init__(self, size: int, clock: Callable[[], float] = time.time) -> None:
        self._size = size
        self._clock = clock
        self._entries: dict[tuple[str, str | None], tuple[T, float, KeyGeneration, int]] = {}
        self._lock = threading.Lock()

    def recall(self, authorization: str | None, thumbprint: str | None) -> T | None:
        """The decision remembered for this header and certificate, if it still stands; else ``None``."""
        if not authorization:
            return None
        key = (authorization, thumbprint)
        hit = self._entries.get(key)
        if hit is None:
            return None
        decision, expires, keys, generation = hit
        # The keys' check also starts a due refresh, as the validator's path would.
        if self._clock() < expires and keys.refresh_if_due() == generation:
            return decision
        with self._lock:
            self._entries.pop(key, None)
        return None

    def remember(self, authorization: str, thumbprint: str | None, decision: T, expires: float,
                 keys: KeyGeneration, generation: int) -> None:
        """Remember an accepted ``decision`` until ``expires`` (wall-clock seconds), while ``keys`` are
        at ``generation``."""
        entries = self._entries
        if len(entries) >= self._size:
            with self._lock:
                # Oldest first (dicts keep insertion order), a tenth at a time, as the JWT memo does.
                for old in list(itertools.islice(entries, max(1, self._size // 10))):
                    entries.pop(old, None)
        # One dict store: atomic, so no lock is needed for the insert itself.
        entries[(authorization, thumbprint)] = (decision, expires, keys, generation)

    def __len__(self) -> int:
        return len(self._entries)
