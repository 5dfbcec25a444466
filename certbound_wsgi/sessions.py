"""Server-side sessions that remember how they were made.

The cookie carries a session id, a generation, the session's absolute end and a
MAC over all three (keyed by ``session_secret``); the record lives server-side,
sealed in Redis or in process. A record keeps the method that created it and the
binding of the token it came from (``x5t#S256``, ``jkt``), so that a session made
by a bound token demands the same proof on every use: a stolen cookie is as
useless as a stolen token.

A token opens at most one session: its id is an HMAC of the token and its
binding, so a client that never returns the cookie finds the same session on
every request instead of making a new one, and a request whose session exists
writes nothing (this process remembers the sessions it has seen).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from .cache import Store
from .cache.memory import MemoryStore, TTLCache
from .cache.redis import RedisCache, RedisUnavailable
from .cache.seal import Sealer
from .credentials import read_cookie
from .errors import AuthError, InvalidToken, TemporarilyUnavailable
from .jose import equal_ascii
from .settings import Settings
from .types import Claims, WSGIEnvironment

__all__ = ["CookieId", "Session", "SessionRecord", "Sessions", "cookie_name"]

#: The longest session cookie value read; anything longer is not ours.
MAX_COOKIE = 256


def cookie_name(name: str, *, secure: bool, host_only: bool, path: str) -> str:
    """``name`` with the strongest prefix its attributes allow (RFC 6265bis section 4.1.3).

    ``__Host-`` needs ``Secure``, no ``Domain`` and ``Path=/``: the cookie can then be set only by
    this very host over HTTPS, never by a sibling subdomain (no session fixation from there).
    ``__Secure-`` needs ``Secure`` only.
    """
    if not secure:
        return name
    return ("__Host-" if host_only and path == "/" else "__Secure-") + name


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """What a session remembers.

    :param method: the auth method that created it.
    :param claims: the validated claims it was made from.
    :param x5t: the certificate thumbprint its token was bound to (RFC 8705), if any.
    :param jkt: the DPoP key thumbprint its token was bound to (RFC 9449), if any.
    :param pop: whether every use must repeat the proof (false for incompatible methods).
    :param created: when it was created; ``rolled``: when its cookie was last renewed;
        ``seen``: when it was last used; ``expires``: when it ends at the latest.
    :param gen: the generation its cookie must name; renewal changes it, so older cookies stop working.
    :param token: the token it was opened with, kept (sealed) only when it can be introspected again.
    :param scope: the scope granted to a login (RFC 6749 section 5.1); ``None``: the claims' scopes.
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
    gen: str = ""
    token: str | None = None
    scope: str | None = None

    def to_bytes(self) -> bytes:
        return json.dumps(
            {"m": self.method, "c": self.claims, "x": self.x5t, "j": self.jkt, "p": self.pop,
             "t": [self.created, self.rolled, self.seen, self.expires], "g": self.gen, "k": self.token,
             "s": self.scope},
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> SessionRecord | None:
        try:
            raw: Any = json.loads(data)
            created, rolled, seen, expires = (float(t) for t in raw["t"])
            token, scope = raw.get("k"), raw.get("s")
            return cls(str(raw["m"]), dict(raw["c"]), raw["x"], raw["j"], bool(raw["p"]),
                       created, rolled, seen, expires, str(raw["g"]),
                       token if isinstance(token, str) else None, scope if isinstance(scope, str) else None)
        except (ValueError, KeyError, TypeError, RecursionError, AttributeError):
            return None


class CookieId(NamedTuple):
    """What a session cookie names: the record, its generation, and the session's absolute end."""

    sid: str
    gen: str
    end: int

    @property
    def value(self) -> str:
        return f"{self.sid}.{self.gen}.{self.end}"

    @classmethod
    def parse(cls, value: str) -> CookieId | None:
        parts = value.split(".")
        if len(parts) != 3:
            return None
        sid, gen, end = parts
        if not sid or not gen or not (end.isascii() and end.isdigit()) or len(end) > 12:
            return None
        return cls(sid, gen, int(end))


@dataclass(frozen=True, slots=True)
class Session:
    """A session in use by this request.

    :param sid: its id; ``record``: what it remembers;
        ``set_cookie``: a ``Set-Cookie`` value to send back (on creation and renewal), if any.
    """

    sid: str
    record: SessionRecord
    set_cookie: str | None = None


class _Known(NamedTuple):
    """A token's session as this process last saw it: enough to answer a token request without I/O."""

    key: str
    gen: str
    cookie: str  # the signed cookie value
    set_cookie: str


class _RedisStore:
    """Values in Redis, sealed; Redis trouble is a 503, never a decision."""

    def __init__(self, redis: RedisCache, sealer: Sealer) -> None:
        self._redis = redis
        self._sealer = sealer

    def fetch(self, key: str) -> bytes | None:
        try:
            return self._redis.fetch(key, self._sealer)
        except RedisUnavailable:
            raise _unavailable() from None

    def store(self, key: str, value: bytes, ttl: float) -> None:
        try:
            self._redis.store(key, self._sealer, value, ttl)
        except RedisUnavailable:
            raise _unavailable() from None

    def add(self, key: str, value: bytes, ttl: float) -> bool:
        try:
            return self._redis.store(key, self._sealer, value, ttl, only_new=True)
        except RedisUnavailable:
            raise _unavailable() from None

    def delete(self, key: str) -> None:
        try:
            self._redis.delete(key)
        except RedisUnavailable:
            raise _unavailable() from None


def _unavailable() -> TemporarilyUnavailable:
    return TemporarilyUnavailable("the session store is unavailable", retry_after=2, reason="store_unavailable")


class Sessions:
    """Opens, loads, renews and ends sessions.

    :param settings: ``session_*`` options, ``cache_l1_size`` (each in-process bound),
        ``cache_l1_ttl`` (how long this process trusts what it knows of a session in Redis).
    :param redis: the shared Redis cache, if configured.
    :param recheck: validates a kept token again (introspection); raises :class:`InvalidToken` once
        it is revoked. ``None``: no token is kept.
    :param clock: wall-clock seconds; injectable for tests.
    """

    def __init__(self, settings: Settings, redis: RedisCache | None,
                 clock: Callable[[], float] = time.time, *,
                 recheck: Callable[[str], object] | None = None) -> None:
        self._settings = settings
        # The secret keys the cookie MAC, the sealing and the namespace: instances with
        # different secrets sharing one Redis cannot use each other's sessions.
        self._sealer = Sealer(settings.session_secret, "session")
        # A separate key for the ids derived from tokens (domain separation from the cookie MAC).
        self._token_ids = Sealer(settings.session_secret, "session-token")
        self._store_impl: Store = (
            MemoryStore(settings.cache_l1_size, clock) if redis is None else _RedisStore(redis, self._sealer)
        )
        # The hot path of a bearer request: token -> its session id (an HMAC, computed once), and
        # id -> the session as last seen here, so that a repeated token request costs no store I/O
        # and no parsing. Trusted for cache_l1_ttl at most, as another worker may end the session.
        self._sids: TTLCache[str] = TTLCache(settings.cache_l1_size, clock)
        self._known: TTLCache[_Known] = TTLCache(settings.cache_l1_size, clock)
        self._known_ttl = float(settings.cache_l1_ttl)
        self._redis = redis
        # Used login states: their own bound, so that login attempts can never evict sessions.
        self._used_states = MemoryStore(settings.cache_l1_size, clock)
        self._recheck = recheck
        self._clock = clock
        s = settings
        self.cookie_name = cookie_name(s.session_cookie_name, secure=s.session_cookie_secure,
                                       host_only=not s.session_cookie_domain, path=s.session_cookie_path or "/")

    # -- the store -------------------------------------------------------------------

    def _key(self, sid: str) -> str:
        return self._sealer.key_name("sid", sid)

    def _fetch_record(self, sid: str) -> SessionRecord | None:
        data = self._store_impl.fetch(self._key(sid))
        return SessionRecord.from_bytes(data) if data is not None else None

    def _put(self, sid: str, record: SessionRecord, *, only_new: bool = False) -> bool:
        """Store ``record``; with ``only_new``, only if nothing is stored for ``sid`` (whether it was)."""
        ttl = record.expires - self._clock()
        idle = self._settings.session_idling_timeout
        if idle:
            # An idle session is dead: the store need not keep it past that (touch() extends it).
            ttl = min(ttl, record.seen - self._clock() + idle + 60)
        if only_new:
            return self._store_impl.add(self._key(sid), record.to_bytes(), ttl)
        self._store_impl.store(self._key(sid), record.to_bytes(), ttl)
        return True

    def _delete(self, sid: str) -> None:
        self._known.pop(sid)
        self._store_impl.delete(self._key(sid))

    def _deadline(self, record: SessionRecord) -> float:
        """When the record ends unless it is used (or renewed) before."""
        s = self._settings
        deadline = record.expires
        if s.session_idling_timeout:
            deadline = min(deadline, record.seen + s.session_idling_timeout)
        if s.session_rolling_timeout:
            deadline = min(deadline, record.rolled + s.session_rolling_timeout)
        return deadline

    def _ended(self, record: SessionRecord, now: float) -> bool:
        return now >= record.expires or now > self._deadline(record)

    # -- cookies ----------------------------------------------------------------------

    def cookie(self, value: str, max_age: int | None = None, name: str | None = None, *,
               same_site: str | None = None, host_only: bool = False) -> str:
        """A ``Set-Cookie`` value with the configured attributes.

        :param host_only: no ``Domain`` and ``Path=/`` whatever is configured (the login state cookie).
        :param same_site: overrides ``session_cookie_same_site``.
        """
        s = self._settings
        path = "/" if host_only else (s.session_cookie_path or "/")
        parts = [f"{name or self.cookie_name}={value}", f"Path={path}"]
        if s.session_cookie_domain and not host_only:
            parts.append(f"Domain={s.session_cookie_domain}")
        if max_age is not None:
            parts.append(f"Max-Age={max_age}")
        if s.session_cookie_secure:
            parts.append("Secure")
        if s.session_cookie_http_only:
            parts.append("HttpOnly")
        parts.append(f"SameSite={same_site or s.session_cookie_same_site}")
        return "; ".join(parts)

    def clear_cookie(self) -> str:
        return self.cookie("", max_age=0)

    def signed(self, value: str) -> str:
        """``value.mac``: what a cookie carries."""
        return f"{value}.{self._sealer.mac(value)}"

    def verified(self, environ: WSGIEnvironment, name: str | None = None) -> str | None:
        """The value of a cookie made by :meth:`signed`, once its MAC is verified; ``None`` when absent or wrong."""
        header = environ.get("HTTP_COOKIE")
        name = name or self.cookie_name
        if not header or name not in header:
            return None
        raw = read_cookie(header, name)
        if not raw or len(raw) > MAX_COOKIE:
            return None
        value, _, mac = raw.rpartition(".")
        if not value or not equal_ascii(mac, self._sealer.mac(value)):
            return None
        return value

    def presented(self, environ: WSGIEnvironment) -> CookieId | None:
        """What the request's session cookie names, if its MAC verifies (no store I/O)."""
        value = self.verified(environ)
        return CookieId.parse(value) if value is not None else None

    def _set_cookie(self, sid: str, record: SessionRecord) -> str:
        return self.cookie(self.signed(CookieId(sid, record.gen, _end(record)).value))

    def _expired(self) -> InvalidToken:
        return InvalidToken("the session has expired", headers=[("Set-Cookie", self.clear_cookie())],
                            reason="session_invalid")

    # -- sessions ---------------------------------------------------------------------

    def _new_record(self, method: str, claims: Claims, *, x5t: str | None, jkt: str | None, pop: bool,
                    token_exp: float | None, token: str | None = None, scope: str | None = None) -> SessionRecord:
        s = self._settings
        now = self._clock()
        expires = now + s.session_absolute_timeout if s.session_absolute_timeout else float("inf")
        if token_exp is not None:
            expires = min(expires, token_exp)
        if expires == float("inf"):
            expires = now + 86400
        return SessionRecord(method, claims, x5t, jkt, pop, now, now, now, expires, _new_gen(), token, scope)

    def create(self, method: str, claims: Claims, *, x5t: str | None, jkt: str | None, pop: bool,
               token_exp: float | None, scope: str | None = None) -> Session:
        """A new session with a new random id (the browser login): there is no fixation.

        :raises TemporarilyUnavailable: the session store cannot be asked.
        """
        record = self._new_record(method, claims, x5t=x5t, jkt=jkt, pop=pop, token_exp=token_exp, scope=scope)
        sid = secrets.token_urlsafe(32)
        self._put(sid, record)
        return Session(sid, record, self._set_cookie(sid, record))

    def for_token(self, environ: WSGIEnvironment, token: str, method: str, claims: Claims, *,
                  x5t: str | None, jkt: str | None, token_exp: float | None, keep_token: bool) -> str | None:
        """The token's one session, opened if need be: the ``Set-Cookie`` to send, if any.

        Its id is an HMAC of the token and its binding, so every request with this token
        finds the same session. Once this process has seen it, nothing is read, written or
        parsed (trusted for ``cache_l1_ttl`` at most); a cookie naming it is not sent again.

        :raises TemporarilyUnavailable: the session store cannot be asked.
        """
        now = self._clock()
        sid = self._sid_for(token, x5t, jkt, now)
        known = self._known.get(sid)
        if known is not None and self._still_stored(known):
            header = environ.get("HTTP_COOKIE")
            return None if header and known.cookie in header else known.set_cookie
        presented = self.presented(environ)
        record = self._open(sid, now, method, claims, x5t=x5t, jkt=jkt, token_exp=token_exp,
                            token=token if keep_token else None)
        cookie = self.signed(CookieId(sid, record.gen, _end(record)).value)
        # Never past the record's own deadline: a cookie-less client does not keep it alive.
        self._known.put(sid, _Known(self._key(sid), record.gen, cookie, self.cookie(cookie)),
                        min(now + self._known_ttl, self._deadline(record)))
        if presented is not None and presented.sid == sid and equal_ascii(presented.gen, record.gen):
            return None
        return self.cookie(cookie)

    def _sid_for(self, token: str, x5t: str | None, jkt: str | None, now: float) -> str:
        """The token's session id: an HMAC of the token and its binding, remembered per process."""
        sid = self._sids.get(token)
        if sid is None:
            sid = self._token_ids.mac("\x00".join((token, x5t or "", jkt or "")))
            self._sids.put(token, sid, now + self._known_ttl)
        return sid

    def _still_stored(self, known: _Known) -> bool:
        # In process, the record is asked for by a dict look-up: evicted, it is opened again.
        return self._redis is not None or self._store_impl.fetch(known.key) is not None

    def _open(self, sid: str, now: float, method: str, claims: Claims, *, x5t: str | None, jkt: str | None,
              token_exp: float | None, token: str | None) -> SessionRecord:
        """The live record named ``sid``, or a new one stored in its place."""
        record = self._fetch_record(sid)
        if record is not None and not self._ended(record, now):
            return record
        fresh = self._new_record(method, claims, x5t=x5t, jkt=jkt, pop=True, token_exp=token_exp, token=token)
        # SET NX when nothing is there: of two workers opening it at once, one record wins.
        if self._put(sid, fresh, only_new=record is None):
            return fresh
        return self._fetch_record(sid) or fresh

    def load(self, environ: WSGIEnvironment) -> Session | None:
        """The request's live session; ``None`` when there is no valid cookie or no such session.

        Nothing is written: the caller checks the session's proofs first, then calls :meth:`touch`,
        so that a refused request (a stolen cookie) can neither renew nor end the owner's session.

        :raises InvalidToken: the session has expired (its cookie is cleared).
        :raises TemporarilyUnavailable: the session store cannot be asked.
        """
        presented = self.presented(environ)
        if presented is None:
            return None
        now = self._clock()
        if now >= presented.end:
            # Past its absolute end, known from the cookie alone: no store I/O.
            raise self._expired()
        record = self._fetch_record(presented.sid)
        if record is None or not equal_ascii(presented.gen, record.gen):
            return None  # ended, renewed under a newer cookie, or never ours
        if self._ended(record, now):
            # Expired for everyone, so there is nothing to protect by proof first.
            try:
                self._delete(presented.sid)
            except TemporarilyUnavailable:
                pass  # the record expires in the store by itself
            raise self._expired()
        return Session(presented.sid, record)

    def recheck(self, session: Session) -> None:
        """Revocation: ask again about the token a session was opened with (RFC 7662 section 2.2).

        The validator's own cache bounds how often the issuer is asked (``cache_ttl_max``).

        :raises InvalidToken: the token is no longer active; the session is ended.
        :raises TemporarilyUnavailable: the issuer cannot be asked; the session cannot be verified.
        """
        token = session.record.token
        if token is None or self._recheck is None:
            return
        try:
            self._recheck(token)
        except TemporarilyUnavailable:
            raise
        except AuthError:
            try:
                self._delete(session.sid)
            except TemporarilyUnavailable:
                pass  # the check above refuses it on every use until it expires
            raise InvalidToken("the session's token is no longer active",
                               headers=[("Set-Cookie", self.clear_cookie())], reason="token_inactive") from None

    def touch(self, session: Session) -> Session:
        """After a successful use: renew the cookie when due, or record the use.

        :returns: the session to go on with; its ``set_cookie`` is set when the cookie changed.
        """
        s = self._settings
        record = session.record
        now = self._clock()
        if s.session_rolling_timeout and now - record.rolled > s.session_rolling_timeout / 2:
            # Renew: a new generation for the same record; the cookie naming the old one stops working.
            renewed = replace(record, rolled=now, seen=now, gen=_new_gen())
            self._put(session.sid, renewed)
            self._known.pop(session.sid)
            return Session(session.sid, renewed, self._set_cookie(session.sid, renewed))
        if now - record.seen > min(60.0, (s.session_idling_timeout or 600) / 10):
            record = replace(record, seen=now)
            self._put(session.sid, record)
            return Session(session.sid, record)
        return session

    def end(self, session: Session) -> None:
        """Delete ``session``.

        :raises TemporarilyUnavailable: the store cannot be asked; the session may live on, so do not
            tell the user they are logged out.
        """
        self._delete(session.sid)

    # -- used login states ----------------------------------------------------------

    def first_use(self, name: str, ttl: float) -> bool:
        """Mark ``name`` used, atomically: True for the one caller that marked it first.

        Redis ``SET NX`` when configured, so that of simultaneous callbacks on any worker exactly
        one wins; otherwise this process's own bounded store of used names.

        :raises TemporarilyUnavailable: Redis cannot be asked.
        """
        key = self._sealer.key_name("used", name)
        if self._redis is None:
            return self._used_states.add(key, b"1", ttl)
        added = self._redis.add_once(key, ttl)
        if added is None:
            raise _unavailable()
        return added


def _new_gen() -> str:
    return secrets.token_urlsafe(12)


def _end(record: SessionRecord) -> int:
    # Rounded up, so that the cookie never ends a session the record still allows.
    return int(-(-record.expires // 1))
