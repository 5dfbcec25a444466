"""Server-side sessions that remember how they were made.

The cookie carries only a random id and its MAC (keyed by ``session_secret``);
the record lives server-side, sealed in Redis or in process. A record keeps the
method that created it and the binding of the token it came from
(``x5t#S256``, ``jkt``), so that a session made by a bound token demands the
same proof on every use: a stolen cookie is as useless as a stolen token.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from .cache import Store
from .cache.memory import MemoryStore
from .cache.redis import RedisCache, RedisUnavailable
from .cache.seal import Sealer
from .credentials import read_cookie
from .errors import InvalidToken, TemporarilyUnavailable
from .jose import equal_ascii
from .settings import Settings
from .types import Claims, WSGIEnvironment

__all__ = ["Session", "SessionRecord", "Sessions"]


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """What a session remembers.

    :param method: the auth method that created it.
    :param claims: the validated claims it was made from.
    :param x5t: the certificate thumbprint its token was bound to (RFC 8705), if any.
    :param jkt: the DPoP key thumbprint its token was bound to (RFC 9449), if any.
    :param pop: whether every use must repeat the proof (false for incompatible methods).
    :param created: when it was created; ``rolled``: when its id was last renewed;
        ``seen``: when it was last used; ``expires``: when it ends at the latest.
    """

    method: str
    claims: Claims
    x5t: str | None
    jkt: str | None
    pop: bool
    created: float
    rolled: float
    seen: float
    expires: float

    def to_bytes(self) -> bytes:
        return json.dumps(
            {"m": self.method, "c": self.claims, "x": self.x5t, "j": self.jkt, "p": self.pop,
             "t": [self.created, self.rolled, self.seen, self.expires]},
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> SessionRecord | None:
        try:
            raw: Any = json.loads(data)
            created, rolled, seen, expires = (float(t) for t in raw["t"])
            return cls(str(raw["m"]), dict(raw["c"]), raw["x"], raw["j"], bool(raw["p"]),
                       created, rolled, seen, expires)
        except (ValueError, KeyError, TypeError, RecursionError):
            return None


@dataclass(frozen=True, slots=True)
class Session:
    """A session in use by this request.

    :param sid: its id; ``record``: what it remembers;
        ``set_cookie``: a ``Set-Cookie`` value to send back (on creation and renewal), if any.
    """

    sid: str
    record: SessionRecord
    set_cookie: str | None = None


class _RedisStore:
    """Sessions in Redis, sealed; Redis trouble is a 503, never a decision."""

    def __init__(self, redis: RedisCache, sealer: Sealer) -> None:
        self._redis = redis
        self._sealer = sealer

    def fetch(self, key: str) -> bytes | None:
        try:
            return self._redis.fetch(key, self._sealer)
        except RedisUnavailable:
            raise TemporarilyUnavailable("the session store is unavailable", retry_after=2) from None

    def store(self, key: str, value: bytes, ttl: float) -> None:
        try:
            self._redis.store(key, self._sealer, value, ttl)
        except RedisUnavailable:
            raise TemporarilyUnavailable("the session store is unavailable", retry_after=2) from None

    def delete(self, key: str) -> None:
        try:
            self._redis.delete(key)
        except RedisUnavailable:
            raise TemporarilyUnavailable("the session store is unavailable", retry_after=2) from None


class Sessions:
    """Creates, loads, renews and destroys sessions.

    :param settings: the ``session_*`` options, and ``cache_l1_size`` (the most sessions kept in process
        when there is no Redis).
    :param redis: the shared Redis cache, if configured.
    :param clock: wall-clock seconds; injectable for tests.
    """

    def __init__(self, settings: Settings, redis: RedisCache | None,
                 clock: Callable[[], float] = time.time) -> None:
        self._settings = settings
        # The secret keys the cookie MAC, the sealing and the namespace: instances with
        # different secrets sharing one Redis cannot use each other's sessions.
        self._sealer = Sealer(settings.session_secret, "session")
        self._store_impl: Store = (
            MemoryStore(settings.cache_l1_size, clock) if redis is None else _RedisStore(redis, self._sealer)
        )
        self._clock = clock
        self._cookie = settings.session_cookie_name

    # -- the store -------------------------------------------------------------------

    def _fetch(self, key: str) -> bytes | None:
        return self._store_impl.fetch(key)

    def _store(self, key: str, value: bytes, ttl: float) -> None:
        self._store_impl.store(key, value, ttl)

    def _delete(self, key: str) -> None:
        self._store_impl.delete(key)

    def _put(self, sid: str, record: SessionRecord) -> None:
        ttl = record.expires - self._clock()
        idle = self._settings.session_idling_timeout
        if idle:
            # An idle session is dead: the store need not keep it past that (touch() extends it).
            ttl = min(ttl, record.seen - self._clock() + idle + 60)
        self._store(self._sealer.key_name("sid", sid), record.to_bytes(), ttl)

    # -- cookies ----------------------------------------------------------------------

    def cookie(self, value: str, max_age: int | None = None, name: str | None = None, *,
               path: str | None = None, same_site: str | None = None) -> str:
        """A ``Set-Cookie`` value with the configured attributes (``path`` and ``same_site`` override them)."""
        s = self._settings
        parts = [f"{name or self._cookie}={value}", f"Path={path or s.session_cookie_path or '/'}"]
        if s.session_cookie_domain:
            parts.append(f"Domain={s.session_cookie_domain}")
        if max_age is not None:
            parts.append(f"Max-Age={max_age}")
        if s.session_cookie_secure:
            parts.append("Secure")
        if s.session_cookie_http_only:
            parts.append("HttpOnly")
        parts.append(f"SameSite={same_site or s.session_cookie_same_site}")
        return "; ".join(parts)

    def clear_cookie(self, name: str | None = None, *, path: str | None = None) -> str:
        return self.cookie("", max_age=0, name=name, path=path)

    def signed(self, value: str) -> str:
        """``value.mac``: what a cookie carries."""
        return f"{value}.{self._sealer.mac(value)}"

    def verified(self, environ: WSGIEnvironment, name: str | None = None) -> str | None:
        """The value of a cookie made by :meth:`signed`, once its MAC is verified; ``None`` when absent or wrong."""
        header = environ.get("HTTP_COOKIE")
        name = name or self._cookie
        if not header or name not in header:
            return None
        raw = read_cookie(header, name)
        if not raw or len(raw) > 256:
            return None
        value, _, mac = raw.rpartition(".")
        if not value or not equal_ascii(mac, self._sealer.mac(value)):
            return None
        return value

    # -- sessions ---------------------------------------------------------------------

    def create(self, method: str, claims: Claims, *, x5t: str | None, jkt: str | None, pop: bool,
               token_exp: float | None) -> Session:
        """A new session with a new id: a login never reuses an id, so there is no fixation."""
        s = self._settings
        now = self._clock()
        expires = now + s.session_absolute_timeout if s.session_absolute_timeout else float("inf")
        if token_exp is not None:
            expires = min(expires, token_exp)
        if expires == float("inf"):
            expires = now + 86400
        record = SessionRecord(method, claims, x5t, jkt, pop, now, now, now, expires)
        sid = secrets.token_urlsafe(32)
        self._put(sid, record)
        return Session(sid, record, self.cookie(self.signed(sid)))

    def load(self, environ: WSGIEnvironment) -> Session | None:
        """The request's live session; ``None`` when there is no valid cookie or no such session.

        Nothing is written: the caller checks the session's proofs first, then calls :meth:`touch`,
        so that a refused request (a stolen cookie) can neither renew nor end the owner's session.

        :raises InvalidToken: the session has expired (its cookie is cleared).
        :raises TemporarilyUnavailable: the session store cannot be asked.
        """
        sid = self.verified(environ)
        if sid is None:
            return None
        data = self._fetch(self._sealer.key_name("sid", sid))
        record = SessionRecord.from_bytes(data) if data is not None else None
        if record is None:
            return None
        s = self._settings
        now = self._clock()
        if (
            now >= record.expires
            or (s.session_idling_timeout and now - record.seen > s.session_idling_timeout)
            or (s.session_rolling_timeout and now - record.rolled > s.session_rolling_timeout)
        ):
            # Expired for everyone, so there is nothing to protect by proof first.
            try:
                self._delete(self._sealer.key_name("sid", sid))
            except TemporarilyUnavailable:
                pass  # the record expires in the store by itself
            raise InvalidToken("the session has expired", headers=[("Set-Cookie", self.clear_cookie())])
        return Session(sid, record)

    def touch(self, session: Session) -> Session:
        """After a successful use: renew the id when due, or record the use.

        :returns: the session to go on with; its ``set_cookie`` is set when the id changed.
        """
        s = self._settings
        record = session.record
        now = self._clock()
        if s.session_rolling_timeout and now - record.rolled > s.session_rolling_timeout / 2:
            # Renew: a new id for the same record; the old id stops working.
            renewed = replace(record, rolled=now, seen=now)
            new_sid = secrets.token_urlsafe(32)
            self._put(new_sid, renewed)
            self._delete(self._sealer.key_name("sid", session.sid))
            return Session(new_sid, renewed, self.cookie(self.signed(new_sid)))
        if now - record.seen > min(60.0, (s.session_idling_timeout or 600) / 10):
            record = replace(record, seen=now)
            self._put(session.sid, record)
            return Session(session.sid, record)
        return session

    def is_live(self, environ: WSGIEnvironment) -> bool:
        """Whether the request carries the cookie of a session that still exists."""
        try:
            return self.load(environ) is not None
        except InvalidToken:
            return False

    def destroy(self, environ: WSGIEnvironment) -> None:
        """End the request's session.

        :raises TemporarilyUnavailable: the store cannot be asked; the session may live on, so do not
            tell the user they are logged out.
        """
        sid = self.verified(environ)
        if sid is not None:
            self._delete(self._sealer.key_name("sid", sid))

    # -- one-time records for the login flow -------------------------------------------

    def put_once(self, name: str, value: dict[str, Any], ttl: float) -> None:
        self._store(self._sealer.key_name("once", name), json.dumps(value).encode(), ttl)

    def take_once(self, name: str) -> dict[str, Any] | None:
        """The value stored under ``name``, removed so that it cannot be used again."""
        key = self._sealer.key_name("once", name)
        data = self._fetch(key)
        if data is None:
            return None
        self._delete(key)
        try:
            value = json.loads(data)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

