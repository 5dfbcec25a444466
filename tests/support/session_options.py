"""Settings that turn sessions and the browser login on, for the tests of the request path."""

from __future__ import annotations

from typing import Any

__all__ = ["LOGIN", "SECRET", "SESSION"]

SECRET = "session-secret-0123456789abcdefghij"
SESSION: dict[str, Any] = {"auth_methods": ("bearer", "session"), "session_secret": SECRET}
#: ``SESSION`` plus the authorization code flow (no proof-of-possession check of the methods).
LOGIN: dict[str, Any] = {
    "auth_methods": ("bearer", "session", "authorization_code"),
    "session_secret": SECRET,
    "proof_of_possession_auth_methods_validation": False,
    "redirect_uri": "https://app.test/callback",
    "client_id": "app",
    "client_secret": "client-secret-0123456789abcdef",
    "scopes": ("openid", "profile"),
}
