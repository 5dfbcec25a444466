"""Every key this package derives, and sealed cache entries: AES-256-GCM, keyed by HKDF (RFC 5869).

Whoever can write to Redis must not be able to make a stolen token work. Each
entry is encrypted and authenticated with the entry's own key name as
associated data, so an entry can be neither forged, altered, nor moved to
another token's key: any of these opens as ``None``, a cache miss. Key names
are HMACs of the token, so Redis never sees a token, and the namespace is
derived from the secret, so instances with different secrets never meet.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["Sealer", "derive_key"]

_NONCE = 12


def derive_key(secret: str | None, purpose: str, length: int = 32) -> bytes:
    """``length`` bytes for ``purpose`` from ``secret`` (HKDF-SHA256, RFC 5869 section 2).

    The purpose goes in HKDF's ``info``, so that keys for different uses never coincide
    (RFC 5869 section 3.2). ``None`` or an empty secret gives a random per-process key.
    """
    material = secret.encode() if secret else os.urandom(32)
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None,
                info=b"certbound-wsgi/v1/" + purpose.encode()).derive(material)


class Sealer:
    """Seals and opens cache entries, and names their keys.

    :param secret: the shared secret (``cache_secret`` or ``client_secret``); ``None``
        for a random per-process secret (an in-process cache needs nothing shared).
    :param purpose: separates key material of different uses (``intro``, ``session``...).
    """

    def __init__(self, secret: str | None, purpose: str) -> None:
        okm = derive_key(secret, purpose, 64)
        self._aead = AESGCM(okm[:32])
        self._mac_key = okm[32:]
        self.namespace = hmac.new(self._mac_key, b"namespace", hashlib.sha256).hexdigest()[:16]
        self._prefix = f"certbound:{self.namespace}:{purpose}:"

    def key_name(self, *parts: str) -> str:
        """The Redis key for ``parts`` (e.g. endpoint and token): an HMAC, never the token itself."""
        data = "\x00".join(parts).encode("utf-8", "surrogatepass")
        digest = hmac.new(self._mac_key, data, hashlib.sha256).hexdigest()
        return self._prefix + digest

    def mac(self, value: str) -> str:
        """A base64url HMAC-SHA256 of ``value``, e.g. to authenticate a cookie."""
        digest = hmac.new(self._mac_key, b"mac\x00" + value.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")

    def seal(self, name: str, plaintext: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        return nonce + self._aead.encrypt(nonce, plaintext, name.encode())

    def open(self, name: str, blob: bytes) -> bytes | None:
        """The plaintext, or ``None`` when ``blob`` is foreign, altered or was sealed for another key."""
        if len(blob) < _NONCE + 16:
            return None
        try:
            return self._aead.decrypt(blob[:_NONCE], blob[_NONCE:], name.encode())
        except InvalidTag:
            return None
