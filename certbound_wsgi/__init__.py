"""certbound-wsgi: WSGI middleware that makes stolen OAuth access tokens worthless.

An access token is accepted only from the client whose TLS certificate it was
bound to (RFC 8705).
"""

from __future__ import annotations

from .authenticator import Identity
from .certificates import thumbprint_from_pem
from .errors import (
    AuthError,
    ConfigurationError,
    InsufficientScope,
    InvalidRequest,
    InvalidToken,
    TemporarilyUnavailable,
)
from .middleware import CertBoundMiddleware
from .settings import Settings

__all__ = [
    "AuthError",
    "CertBoundMiddleware",
    "ConfigurationError",
    "Identity",
    "InsufficientScope",
    "InvalidRequest",
    "InvalidToken",
    "Settings",
    "TemporarilyUnavailable",
    "thumbprint_from_pem",
]

__version__ = "0.1.0"
