"""Type aliases shared across the package."""

from __future__ import annotations

from typing import Any, TypeAlias
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

Claims: TypeAlias = dict[str, Any]

__all__ = ["Claims", "StartResponse", "WSGIApplication", "WSGIEnvironment"]
