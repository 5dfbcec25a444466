"""``public_paths``: the paths that pass without a token (health checks, static files).

An entry is a literal path, never a pattern: ``/healthz`` matches exactly that
path, and an entry ending in ``/`` (``/static/``) matches every path under it.
A path is public only when it is already in canonical form: one ``/`` between
segments, no ``.`` or ``..`` segment, no backslash, no ``%`` left after the
server's decoding (a double-encoded ``%252F``), no ``;`` parameters and no
control characters. Whatever the application or a later proxy then does to
normalize it, it routes exactly the path that matched; any other spelling of a
public path (``//healthz``, ``/static/../admin``) is simply not public and goes
through authentication, so a trick can only fail closed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

from .http import request_path
from .types import WSGIEnvironment

__all__ = ["PublicPaths", "is_canonical"]

# A segment may not be empty (//), "." or ".."; the whole path may hold no
# character some server or framework treats as a separator or an escape:
# backslash (IIS, some static handlers), "%" (a second decoding), ";" (path
# parameters, RFC 3986 section 3.3), and no control character or space.
_FORBIDDEN: Final = re.compile(r"[\x00-\x20\x7f\\%;]")


def is_canonical(path: str) -> bool:
    """Whether ``path`` is absolute and has one spelling only (see the module docstring)."""
    if not path.startswith("/") or _FORBIDDEN.search(path):
        return False
    *inner, last = path[1:].split("/")
    # A trailing "/" (an empty last segment) is a spelling of its own, not an alias.
    return last not in (".", "..") and not any(segment in ("", ".", "..") for segment in inner)


def _check_entry(entry: str) -> str:
    if not isinstance(entry, str) or not entry.startswith("/"):
        raise ValueError(f"public path {entry!r} must start with '/'")
    if "*" in entry or "?" in entry or "#" in entry:
        raise ValueError(f"public path {entry!r} is a literal path, not a pattern or a URL")
    if entry == "/":
        raise ValueError("public path '/' would make every path public")
    if not is_canonical(entry.rstrip("/") if entry.endswith("/") else entry):
        raise ValueError(f"public path {entry!r} is not canonical (no '//', '.', '..', '%', ';' or '\\\\')")
    return entry


class PublicPaths:
    """Decides whether a request's path is public.

    :param entries: literal paths; one ending in ``/`` is a prefix (``/static/``), any
        other matches exactly (``/healthz``, not ``/healthz/`` nor ``/healthz/x``).
    :raises ValueError: an entry is not an absolute canonical path, or is ``/``.
    """

    def __init__(self, entries: Iterable[str]) -> None:
        exact: set[str] = set()
        prefixes: list[str] = []
        for entry in map(_check_entry, entries):
            if entry.endswith("/"):
                prefixes.append(entry)
            else:
                exact.add(entry)
        self._exact = frozenset(exact)
        self._prefixes = tuple(sorted(prefixes))

    def __bool__(self) -> bool:
        return bool(self._exact or self._prefixes)

    def matches(self, path: str) -> bool:
        """Whether ``path`` (decoded, as in ``PATH_INFO``) is public."""
        if path in self._exact:
            return True  # an exact entry is canonical, so equality needs no further check
        return path.startswith(self._prefixes) and is_canonical(path)

    def __call__(self, environ: WSGIEnvironment) -> bool:
        """Whether the request in ``environ`` is for a public path (``SCRIPT_NAME`` + ``PATH_INFO``)."""
        if not (self._exact or self._prefixes):
            return False
        path = request_path(environ)
        return isinstance(path, str) and self.matches(path)
